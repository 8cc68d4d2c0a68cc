// Package mark is the one description of the packet and connection mark
// bits that carry a flow's NAT decision. The queue writes them in its
// verdicts, the rules match and save them, and conntrack reads them back
// to say who decided a flow.
//
// Every value is compared under Mask only, so the mark's other bits stay
// free for kube-proxy (0x4000, 0x8000), Calico (0xffff0000) and the rest.
// A Layout is a plain value, safe to copy and share.
package mark

import (
	"fmt"
	"math/bits"
	"strconv"
	"strings"
)

// Layout is where the decision sits in the mark: Mask selects nfmasq's
// bits, the other fields are the values under the mask. Zero under the
// mask means undecided.
type Layout struct {
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

// DefaultMask is the default --mark-mask: bits 12 and 13, clear of
// kube-proxy's and Calico's bits.
const DefaultMask = 0x3000

// Default is the layout derived from DefaultMask.
var Default = Layout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0x3000}

// Mark bits other node agents are known to own.
const (
	kubeProxyBits = 0x4000 | 0x8000
	calicoBits    = 0xffff0000
)

// FromMask derives the layout from a mask: Masquerade is its lowest set
// bit, Passthrough the next one and Fallback both. The mask must have at
// least two bits and stay clear of kube-proxy's and Calico's bits.
func FromMask(mask uint32) (Layout, error) {
	if bits.OnesCount32(mask) < 2 {
		return Layout{}, fmt.Errorf("mark mask %#x has fewer than 2 bits set: nfmasq needs one bit for masquerade and one for passthrough", mask)
	}
	if mask&kubeProxyBits != 0 {
		return Layout{}, fmt.Errorf("mark mask %#x overlaps kube-proxy's mark bits %#x", mask, mask&kubeProxyBits)
	}
	if mask&calicoBits != 0 {
		return Layout{}, fmt.Errorf("mark mask %#x overlaps Calico's mark bits %#x", mask, mask&calicoBits)
	}
	masq := mask & -mask
	rest := mask &^ masq
	pass := rest & -rest
	return Layout{Mask: mask, Masquerade: masq, Passthrough: pass, Fallback: masq | pass}, nil
}

// Parse parses a --mark-mask value (hexadecimal with 0x, octal with 0, or
// decimal) and derives the layout as FromMask does.
func Parse(s string) (Layout, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 0, 32)
	if err != nil {
		return Layout{}, fmt.Errorf("mark mask %q: %w", s, err)
	}
	return FromMask(uint32(v))
}

// Validate checks that the three values are non-zero (zero means
// undecided), inside the mask and distinct.
func (l Layout) Validate() error {
	if bits.OnesCount32(l.Mask) < 2 {
		return fmt.Errorf("mark mask %#x has fewer than 2 bits set", l.Mask)
	}
	vals := [...]struct {
		name string
		v    uint32
	}{{"masquerade", l.Masquerade}, {"passthrough", l.Passthrough}, {"fallback", l.Fallback}}
	for i, a := range vals {
		if a.v == 0 || a.v&^l.Mask != 0 {
			return fmt.Errorf("%s mark %#x must be non-zero and inside the mask %#x", a.name, a.v, l.Mask)
		}
		for _, b := range vals[:i] {
			if a.v == b.v {
				return fmt.Errorf("%s and %s marks are both %#x", b.name, a.name, a.v)
			}
		}
	}
	return nil
}

// Apply returns mark old with nfmasq's bits replaced by v: the kernel sets
// skb->mark to exactly the NFQA_MARK of a verdict, so the other agents'
// bits must be carried over.
func (l Layout) Apply(old, v uint32) uint32 { return old&^l.Mask | v }

// Decider says who decided a flow's NAT, as its connmark records it.
type Decider uint8

// Deciders.
const (
	// Undecided: no decision bits. The flow never reached the agent's
	// chains (not from a pod, local destination), or predates them.
	Undecided Decider = iota
	// AgentMasquerade: the agent's verdict was masquerade.
	AgentMasquerade
	// AgentPassthrough: the agent's verdict was passthrough.
	AgentPassthrough
	// KernelFallback: the static fallback chain decided, because the agent
	// was down, bypassed or overloaded. Whether it masqueraded shows in
	// the conntrack tuples.
	KernelFallback
	// UnknownMark: decision bits that match no value of the layout.
	UnknownMark
)

var deciderNames = [...]string{"undecided", "agent-masquerade", "agent-passthrough", "kernel-fallback", "unknown-mark"}

// String returns a lower-case name.
func (d Decider) String() string {
	if int(d) < len(deciderNames) {
		return deciderNames[d]
	}
	return "unknown-mark"
}

// ByAgent reports whether the agent decided the flow.
func (d Decider) ByAgent() bool { return d == AgentMasquerade || d == AgentPassthrough }

// Classify reads who decided a flow from its connmark.
func (l Layout) Classify(connmark uint32) Decider {
	switch connmark & l.Mask {
	case 0:
		return Undecided
	case l.Masquerade:
		return AgentMasquerade
	case l.Passthrough:
		return AgentPassthrough
	case l.Fallback:
		return KernelFallback
	default:
		return UnknownMark
	}
}
