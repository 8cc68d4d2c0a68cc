//go:build race

package who

// raceEnabled: the race detector slows the scan about tenfold, so the
// long streaming test reads less.
const raceEnabled = true
