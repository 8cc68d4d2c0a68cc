//go:build !unix

package cputime

import "time"

// Process is unknown here: 0, and benchmarks report 0 CPU per operation.
func Process() time.Duration { return 0 }
