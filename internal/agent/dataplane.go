package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
)

// Dataplane is what shapes the kernel rule set besides the policy: `nfmasq
// rules` and the agent build it from the same flags, so the printed
// payload is the one the agent installs.
type Dataplane struct {
	// PodCIDRs are the node's pod ranges; only their traffic is queued or
	// masqueraded.
	PodCIDRs []netip.Prefix
	// Marks is the mark layout (--mark-mask).
	Marks mark.Layout
	// QueueNum is the first NFQUEUE number, Queues how many there are.
	QueueNum, Queues uint16
	// RandomFully and ToPorts shape MASQUERADE.
	RandomFully bool
	ToPorts     string
	// IPSetThreshold is the list length above which the fallback matches
	// an ipset instead of one rule per prefix.
	IPSetThreshold int
}

// QueueNums lists the queue numbers the agent binds.
func (d Dataplane) QueueNums() []uint16 {
	nums := make([]uint16, 0, d.Queues)
	for i := uint16(0); i < d.Queues; i++ {
		nums = append(nums, d.QueueNum+i)
	}
	return nums
}

// RulesConfig combines the dataplane with the policy's non-masquerade
// sets into the rule set to install.
func (d Dataplane) RulesConfig(pol *nat.Policy) (rules.Config, error) {
	if len(d.PodCIDRs) == 0 {
		return rules.Config{}, errors.New("--pod-cidr is required: only traffic from the node's pod CIDRs is handled")
	}
	cfg := rules.DefaultConfig()
	for _, p := range d.PodCIDRs {
		if p.Addr().Is6() && !pol.IPv6Enabled() {
			return rules.Config{}, fmt.Errorf("--pod-cidr %s is IPv6: add --enable-ipv6", p)
		}
	}
	cfg.PodCIDRs = d.PodCIDRs
	cfg.EnableIPv6 = pol.IPv6Enabled()
	cfg.NonMasquerade4 = pol.NonMasquerade(false)
	cfg.NonMasquerade6 = pol.NonMasquerade(true)
	cfg.Mark = d.Marks
	cfg.QueueNum, cfg.Queues = d.QueueNum, d.Queues
	cfg.RandomFully, cfg.ToPorts = d.RandomFully, d.ToPorts
	cfg.IPSetThreshold = d.IPSetThreshold
	if err := cfg.Validate(); err != nil {
		return rules.Config{}, err
	}
	return cfg, nil
}

// PolicySets returns the kernel fallback of the per-pod decisions: one
// rules.PolicySet per distinct set of MasqueradePolicies, with the known
// pods it applies to (IPv6 pods only with IPv6 enabled), sorted by ID.
func PolicySets(wl *nat.Workloads, enableIPv6 bool) []rules.PolicySet {
	bySet := map[*nat.PolicySet][]netip.Addr{}
	wl.Each(func(a netip.Addr, s *nat.PolicySet) {
		if s != nil && (a.Is4() || enableIPv6) {
			bySet[s] = append(bySet[s], a)
		}
	})
	out := make([]rules.PolicySet, 0, len(bySet))
	for s, pods := range bySet {
		slices.SortFunc(pods, netip.Addr.Compare)
		ps := rules.PolicySet{ID: policySetID(s.Key()), Pods: pods}
		for _, e := range s.Entries() {
			if e.Prefix.Addr().Is6() && !enableIPv6 {
				continue
			}
			ps.Destinations = append(ps.Destinations, rules.PolicyDestination{Prefix: e.Prefix, Decides: e.Decides, Masquerade: e.Action == nat.Masquerade})
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(x, y rules.PolicySet) int { return strings.Compare(x.ID, y.ID) })
	return out
}

// policySetID names a set of policies in the kernel: 8 hex digits of the
// SHA-256 of its policy names. Two sets colliding would share ipsets; with
// the handful of sets a node has the odds are about n²/2³³.
func policySetID(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:4])
}

func samePolicySet(x, y rules.PolicySet) bool {
	return x.ID == y.ID && slices.Equal(x.Pods, y.Pods) && slices.Equal(x.Destinations, y.Destinations)
}
