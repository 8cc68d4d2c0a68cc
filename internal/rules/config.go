package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/nfmasq/nfmasq/internal/mark"
)

// Family is an IP address family. Each family has its own tables, tools
// and ipset.
type Family uint8

const (
	// IPv4 selects iptables and the IPv4 prefixes of a Config.
	IPv4 Family = 4
	// IPv6 selects ip6tables and the IPv6 prefixes of a Config.
	IPv6 Family = 6
)

// String returns "IPv4" or "IPv6".
func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

func (f Family) holds(p netip.Prefix) bool { return p.Addr().Is6() == (f == IPv6) }

// Defaults for the fields of a Config. DefaultQueueNum avoids 100,
// kube-network-policies' default queue: two agents cannot bind one queue.
const (
	DefaultQueueNum       = 150
	DefaultToPorts        = "32768-65535"
	DefaultIPSetThreshold = 64
)

// Config is everything the rule set depends on.
type Config struct {
	// PodCIDRs are the pod ranges of the node, both families. Only
	// traffic from them is queued or masqueraded; each family's rules get
	// only its own prefixes.
	PodCIDRs []netip.Prefix
	// NonMasquerade4 and NonMasquerade6 are the canonical, sorted
	// destination sets the fallback leaves unmasqueraded. They may hold
	// a /0, which turns the fallback into "never masquerade".
	NonMasquerade4 []netip.Prefix
	NonMasquerade6 []netip.Prefix
	// EnableIPv6 installs the ip6tables half. Without it, IPv6 pod CIDRs
	// are an error and any IPv6 rules left by an earlier run are removed.
	EnableIPv6 bool
	// Mark holds the mark values, usually from mark.Parse.
	Mark mark.Layout
	// QueueNum is the first NFQUEUE number; Queues > 1 balances flows
	// over QueueNum … QueueNum+Queues-1.
	QueueNum uint16
	Queues   uint16
	// RandomFully adds --random-fully to MASQUERADE.
	RandomFully bool
	// ToPorts is the MASQUERADE source port range for TCP, UDP and SCTP
	// ("" for the kernel's choice), as ip-masq-agent's "32768-65535".
	ToPorts string
	// IPSetThreshold is the longest non-masquerade list the fallback
	// matches with one rule per prefix; longer lists go into an ipset
	// (hash:net), whose cost does not grow with the list. 0 means always
	// an ipset.
	IPSetThreshold int
	// QueueEnabled false installs only the kernel fallback (no queue, no
	// marks): ip-masq-agent's behaviour, the anchor for benchmarks.
	QueueEnabled bool
	// QueuePaused keeps the whole queue layout but sends nothing to the
	// queue: the agent's shutdown state. Every new flow then goes to the
	// fallback, which still marks it (so conntrack records who decided),
	// and nothing waits in a queue whose reader is about to close.
	QueuePaused bool
	// PolicySets are the kernel fallback of the MasqueradePolicies: one
	// per distinct set of policies selecting a pod the agent knows,
	// decided ahead of the node policy.
	PolicySets []PolicySet
}

// DefaultConfig returns a Config with every default set and no prefixes.
func DefaultConfig() Config {
	return Config{
		Mark:           mark.Default,
		QueueNum:       DefaultQueueNum,
		Queues:         1,
		RandomFully:    true,
		ToPorts:        DefaultToPorts,
		IPSetThreshold: DefaultIPSetThreshold,
		QueueEnabled:   true,
	}
}

// Validate reports the first problem that would make the rule set wrong or
// unloadable.
func (c *Config) Validate() error {
	if len(c.PodCIDRs) == 0 {
		return errors.New("no pod CIDR: nfmasq only handles traffic from pod CIDRs")
	}
	for _, p := range c.PodCIDRs {
		if err := checkPrefix("pod CIDR", p); err != nil {
			return err
		}
		if p.Addr().Is6() && !c.EnableIPv6 {
			return fmt.Errorf("pod CIDR %s is IPv6 but IPv6 is not enabled", p)
		}
	}
	for _, fam := range []Family{IPv4, IPv6} {
		for _, p := range c.nonMasquerade(fam) {
			if err := checkPrefix("non-masquerade CIDR", p); err != nil {
				return err
			}
			if !fam.holds(p) {
				return fmt.Errorf("non-masquerade CIDR %s is in the %s list", p, fam)
			}
		}
	}
	if c.QueueEnabled {
		if err := c.Mark.Validate(); err != nil {
			return err
		}
		if c.Queues == 0 {
			return errors.New("queues must be at least 1")
		}
		if int(c.QueueNum)+int(c.Queues)-1 > 65535 {
			return fmt.Errorf("queues %d … %d go past 65535", c.QueueNum, int(c.QueueNum)+int(c.Queues)-1)
		}
	}
	if err := checkPorts(c.ToPorts); err != nil {
		return err
	}
	if c.IPSetThreshold < 0 {
		return fmt.Errorf("ipset threshold %d is negative", c.IPSetThreshold)
	}
	ids := map[string]bool{}
	for _, ps := range c.PolicySets {
		if !validPolicySetID(ps.ID) || ids[ps.ID] {
			return fmt.Errorf("MasqueradePolicy set id %q: want 8 hex digits, unique", ps.ID)
		}
		ids[ps.ID] = true
		for _, a := range ps.Pods {
			if !a.IsValid() || a.Zone() != "" || a.Is4In6() || a.Is6() && !c.EnableIPv6 {
				return fmt.Errorf("MasqueradePolicy set %s: pod address %s", ps.ID, a)
			}
		}
		for _, d := range ps.Destinations {
			if err := checkPrefix("MasqueradePolicy destination", d.Prefix); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkPrefix(what string, p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("%s %s is not a valid prefix", what, p)
	}
	if p.Addr().Zone() != "" || p.Addr().Is4In6() {
		return fmt.Errorf("%s %s must be a plain IPv4 or IPv6 prefix", what, p)
	}
	if p != p.Masked() {
		return fmt.Errorf("%s %s has host bits set (did you mean %s?)", what, p, p.Masked())
	}
	return nil
}

// checkPorts accepts "", "N" and "N-M" with 1 ≤ N ≤ M ≤ 65535, the forms
// MASQUERADE --to-ports takes.
func checkPorts(s string) error {
	if s == "" {
		return nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	a, errA := strconv.ParseUint(lo, 10, 16)
	b, errB := strconv.ParseUint(hi, 10, 16)
	if errA != nil || errB != nil || a == 0 || a > b {
		return fmt.Errorf("to-ports %q: want a port or a range like 32768-65535", s)
	}
	return nil
}

func (c *Config) nonMasquerade(fam Family) []netip.Prefix {
	if fam == IPv6 {
		return c.NonMasquerade6
	}
	return c.NonMasquerade4
}

func (c *Config) podCIDRs(fam Family) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range c.PodCIDRs {
		if fam.holds(p) {
			out = append(out, p)
		}
	}
	return out
}

// families lists the families the Config installs.
func (c *Config) families() []Family {
	if c.EnableIPv6 {
		return []Family{IPv4, IPv6}
	}
	return []Family{IPv4}
}

// usesSet reports whether the family's fallback matches an ipset. A /0
// anywhere makes every destination non-masquerade: one RETURN rule, no set
// (hash:net cannot hold a /0 anyway).
func (c *Config) usesSet(fam Family) bool {
	list := c.nonMasquerade(fam)
	return len(list) > c.IPSetThreshold && !hasDefaultRoute(list)
}

func hasDefaultRoute(list []netip.Prefix) bool {
	for _, p := range list {
		if p.Bits() == 0 {
			return true
		}
	}
	return false
}
