package agent

import (
	"errors"
	"fmt"
	"net/netip"

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
