//go:build unix

// Package cputime reads the CPU time the process has used, for the
// benchmarks that report cost per CPU second: on a machine shared with
// other work it is steadier than wall time.
package cputime

import (
	"syscall"
	"time"
)

// Process returns the user and system CPU time of the whole process (all
// threads, so work on other goroutines, the GC's and the kernel's on the
// process's behalf count), or 0 if it cannot be read.
func Process() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
