package conntrack

import (
	"bytes"
	"fmt"
	"os"

	"github.com/nfmasq/nfmasq/internal/netns"
)

// accountingSysctls are what the flow log needs from conntrack, per
// network namespace:
//   - nf_conntrack_acct: packet and byte counters;
//   - nf_conntrack_timestamp: start and stop times;
//   - nf_conntrack_events=1: events for every flow. The default, 2, adds
//     the event extension only to flows created while some process listens,
//     so flows the kernel fallback decided while the agent was down would
//     end without a destroy event: a silent hole in the trail.
//
// Each takes effect for flows created after it is set.
var accountingSysctls = []string{
	"net/netfilter/nf_conntrack_acct",
	"net/netfilter/nf_conntrack_timestamp",
	"net/netfilter/nf_conntrack_events",
}

// EnableAccounting sets the conntrack sysctls the flow log relies on to 1
// in the network namespace nsFD (0: the caller's) where they are not already, and returns the
// dotted names of those it changed, for the start-up log. The conntrack
// module must be loaded (the agent's rules load it).
func EnableAccounting(nsFD int) (changed []string, err error) {
	err = netns.Do(nsFD, func() error {
		for _, key := range accountingSysctls {
			path := "/proc/sys/" + key
			cur, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read sysctl: %w", err)
			}
			if string(bytes.TrimSpace(cur)) == "1" {
				continue
			}
			if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
				return fmt.Errorf("write sysctl: %w", err)
			}
			changed = append(changed, dotted(key))
		}
		return nil
	})
	return changed, err
}

func dotted(key string) string {
	b := []byte(key)
	for i, c := range b {
		if c == '/' {
			b[i] = '.'
		}
	}
	return string(b)
}
