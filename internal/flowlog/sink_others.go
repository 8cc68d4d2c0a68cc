//go:build !unix

package flowlog

import (
	"io"
	"os"
)

// openStdout returns standard output itself, never closed by the Logger:
// only Unix kills a process for writing to a closed pipe on descriptor 1.
func openStdout() (io.Writer, io.Closer, error) {
	return os.Stdout, nil, nil
}
