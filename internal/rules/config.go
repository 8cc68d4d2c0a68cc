package rules

import (
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"strconv"
	"strings"
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

// Marks are the packet and connection mark values that carry a flow's
// decision. Each value is compared under Mask only, so the other bits of
// the mark stay free for kube-proxy, Calico and the rest.
type Marks struct {
	// Mask selects the bits nfmasq owns.
	Mask uint32
	// Masquerade is the agent's "masquerade" verdict.
	Masquerade uint32
	// Passthrough is the agent's "keep the pod address" verdict.
	Passthrough uint32
	// Fallback records that the kernel fallback chain decided the flow,
	// so that later packets skip the queue and conntrack shows who
	// decided.
	Fallback uint32
}

// DefaultMarkMask is the default --mark-mask. It avoids kube-proxy's
// 0x4000 (masquerade) and 0x8000 (drop) and Calico's 0xffff0000.
const DefaultMarkMask = 0x3000

// reservedMarkBits are mark bits other node agents are known to own.
const (
	kubeProxyMarkBits = 0x4000 | 0x8000
	calicoMarkBits    = 0xffff0000
)

// DefaultMarks are the marks derived from DefaultMarkMask.
var DefaultMarks = Marks{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0x3000}

// MarksFromMask derives the marks from a mask: Masquerade is its lowest set
// bit, Passthrough the next one and Fallback both. The mask must have at
// least two bits and stay clear of kube-proxy's and Calico's bits.
func MarksFromMask(mask uint32) (Marks, error) {
	if bits.OnesCount32(mask) < 2 {
		return Marks{}, fmt.Errorf("mark mask %#x has fewer than 2 bits set: nfmasq needs one bit for masquerade and one for passthrough", mask)
	}
	if mask&kubeProxyMarkBits != 0 {
		return Marks{}, fmt.Errorf("mark mask %#x overlaps kube-proxy's mark bits %#x", mask, mask&kubeProxyMarkBits)
	}
	if mask&calicoMarkBits != 0 {
		return Marks{}, fmt.Errorf("mark mask %#x overlaps Calico's mark bits %#x", mask, mask&calicoMarkBits)
	}
	masq := mask & -mask
	rest := mask &^ masq
	pass := rest & -rest
	return Marks{Mask: mask, Masquerade: masq, Passthrough: pass, Fallback: masq | pass}, nil
}

// ParseMarkMask parses a --mark-mask value (hexadecimal with 0x, octal
// with 0, or decimal) and derives the marks as MarksFromMask does.
func ParseMarkMask(s string) (Marks, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 0, 32)
	if err != nil {
		return Marks{}, fmt.Errorf("mark mask %q: %w", s, err)
	}
	return MarksFromMask(uint32(v))
}

func (m Marks) validate() error {
	if bits.OnesCount32(m.Mask) < 2 {
		return fmt.Errorf("mark mask %#x has fewer than 2 bits set", m.Mask)
	}
	vals := []struct {
		name string
		v    uint32
	}{{"masquerade", m.Masquerade}, {"passthrough", m.Passthrough}, {"fallback", m.Fallback}}
	for i, a := range vals {
		if a.v == 0 || a.v&^m.Mask != 0 {
			return fmt.Errorf("%s mark %#x must be non-zero and inside the mask %#x", a.name, a.v, m.Mask)
		}
		for _, b := range vals[:i] {
			if a.v == b.v {
				return fmt.Errorf("%s and %s marks are both %#x", b.name, a.name, a.v)
			}
		}
	}
	return nil
}

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
	// Mark holds the mark values, usually from ParseMarkMask.
	Mark Marks
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
}

// DefaultConfig returns a Config with every default set and no prefixes.
func DefaultConfig() Config {
	return Config{
		Mark:           DefaultMarks,
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
		if err := c.Mark.validate(); err != nil {
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
