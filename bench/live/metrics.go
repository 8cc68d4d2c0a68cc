package main

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
)

// metricSum returns the sum of every sample of the named metric in a
// Prometheus text exposition whose labels include all of want ("k=v"
// pairs as the exposition spells them, e.g. `kind="decision"`). Histogram
// and summary series (name_bucket, name_sum…) are not samples of name.
func metricSum(exposition []byte, name string, want ...string) (sum float64, found bool) {
	sc := bufio.NewScanner(bytes.NewReader(exposition))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' || !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		var labels string
		switch {
		case strings.HasPrefix(rest, "{"):
			end := strings.LastIndexByte(rest, '}')
			if end < 0 {
				continue
			}
			labels, rest = rest[1:end], rest[end+1:]
		case strings.HasPrefix(rest, " "):
		default:
			continue // a longer name sharing the prefix
		}
		if !hasLabels(labels, want) {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	return sum, found
}

func hasLabels(labels string, want []string) bool {
	for _, w := range want {
		if !strings.Contains(","+labels+",", ","+w+",") {
			return false
		}
	}
	return true
}
