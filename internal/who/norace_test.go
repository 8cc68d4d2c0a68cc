//go:build !race

package who

const raceEnabled = false
