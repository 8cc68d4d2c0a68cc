package main

import (
	"bufio"
	"strconv"
	"strings"
)

// ruleCounter is one rule of iptables-save -c output with its packet count.
type ruleCounter struct {
	Spec    string // the rule after "-A CHAIN "
	Packets uint64
}

// ruleCounters returns the rules of chain in iptables-save -c output, in
// order, with their packet counters ("[packets:bytes] -A CHAIN spec").
func ruleCounters(save, chain string) []ruleCounter {
	var out []ruleCounter
	prefix := "-A " + chain + " "
	sc := bufio.NewScanner(strings.NewReader(save))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "[") {
			continue
		}
		end := strings.IndexByte(line, ']')
		if end < 0 {
			continue
		}
		pkts, _, ok := strings.Cut(line[1:end], ":")
		rule := strings.TrimSpace(line[end+1:])
		if !ok || !strings.HasPrefix(rule, prefix) {
			continue
		}
		n, err := strconv.ParseUint(pkts, 10, 64)
		if err != nil {
			continue
		}
		out = append(out, ruleCounter{Spec: rule[len(prefix):], Packets: n})
	}
	return out
}

// counterOf sums the packets of the rules whose spec contains every one
// of parts.
func counterOf(rules []ruleCounter, parts ...string) uint64 {
	var n uint64
next:
	for _, r := range rules {
		for _, p := range parts {
			if !strings.Contains(r.Spec, p) {
				continue next
			}
		}
		n += r.Packets
	}
	return n
}

// devRxPackets returns the received packets of iface from /proc/net/dev
// text.
func devRxPackets(procNetDev, iface string) (uint64, bool) {
	for _, line := range strings.Split(procNetDev, "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(name) != iface {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 2 {
			return 0, false
		}
		n, err := strconv.ParseUint(f[1], 10, 64)
		return n, err == nil
	}
	return 0, false
}
