package agent

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// The conntrack table of the agent's network namespace. A full table drops
// new flows before they reach the queue or the fallback chain, so no other
// counter of the agent would show it.
const (
	procConntrackCount = "/proc/sys/net/netfilter/nf_conntrack_count"
	procConntrackMax   = "/proc/sys/net/netfilter/nf_conntrack_max"
	procConntrackStat  = "/proc/net/stat/nf_conntrack"
)

// readConntrackStat sums the per-CPU rows of /proc/net/stat/nf_conntrack
// (a header of column names, then one row of hexadecimal counters per
// CPU) by column name.
func readConntrackStat(r io.Reader) (map[string]uint64, error) {
	sc := bufio.NewScanner(r)
	if !sc.Scan() {
		return nil, fmt.Errorf("conntrack stat: no header: %w", sc.Err())
	}
	names := strings.Fields(sc.Text())
	sums := make(map[string]uint64, len(names))
	for sc.Scan() {
		row := strings.Fields(sc.Text())
		if len(row) != len(names) {
			return nil, fmt.Errorf("conntrack stat: row of %d fields under a header of %d", len(row), len(names))
		}
		for i, field := range row {
			v, err := strconv.ParseUint(field, 16, 64)
			if err != nil {
				return nil, fmt.Errorf("conntrack stat %s: %w", names[i], err)
			}
			sums[names[i]] += v
		}
	}
	return sums, sc.Err()
}
