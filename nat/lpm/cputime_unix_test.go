//go:build unix

package lpm

import (
	"syscall"
	"time"
)

// processCPUTime is the user+system CPU time of the whole process (all
// threads, so the GC's background work counts). On a machine shared with
// other jobs it is steadier than wall time.
func processCPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
