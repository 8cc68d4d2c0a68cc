//go:build unix

package flowlog

import (
	"fmt"
	"io"
	"os"
	"syscall"
)

// openStdout returns a duplicate of file descriptor 1. Writing through a
// different descriptor number matters: the Go runtime kills the process
// with SIGPIPE when a write to descriptor 1 or 2 hits a closed pipe, but
// returns EPIPE for any other descriptor, and a vanished log reader must
// cost records (counted), never the node's NAT agent.
func openStdout() (io.Writer, io.Closer, error) {
	fd, err := syscall.Dup(int(os.Stdout.Fd()))
	if err != nil {
		return nil, nil, fmt.Errorf("duplicate stdout: %w", err)
	}
	syscall.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "stdout")
	return f, f, nil
}
