package netnstest

import (
	"testing"
	"time"
)

// Poll checks cond every `every` until it holds and returns when it first
// did; it fails t when timeout passes first. Tests wait on a condition
// under a deadline this way, never on a sleep.
func Poll(t testing.TB, timeout, every time.Duration, what string, cond func() bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(every) // polling a condition under a deadline
	}
}
