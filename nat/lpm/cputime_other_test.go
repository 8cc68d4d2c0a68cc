//go:build !unix

package lpm

import "time"

// processCPUTime is unknown here; benchmarks then omit the cpu-ns/op metric.
func processCPUTime() time.Duration { return 0 }
