package conntrack

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// ErrUnsupported is returned on systems without Linux conntrack.
var ErrUnsupported = errors.New("conntrack is only supported on linux")

// Tuple is one direction of a flow. Ports are zero for protocols without
// ports; ICMP's identifier, type and code are in Flow.ICMP.
type Tuple struct {
	Src, Dst netip.AddrPort
}

// ICMP holds the ICMP or ICMPv6 fields of a flow's original tuple.
type ICMP struct {
	Type, Code uint8
	ID         uint16
}

// Counters are the packets and bytes (IP headers included) one direction
// of a flow carried.
type Counters struct {
	Packets, Bytes uint64
}

// Flow is a conntrack entry.
type Flow struct {
	// ID is the kernel's identifier of the entry, unique while it exists.
	ID    uint32
	Proto uint8
	// Orig is the flow as its initiator sent it; Reply is what the kernel
	// expects back. For a masqueraded flow, Reply.Dst is the translated
	// source: the node address and port the remote side saw.
	Orig, Reply Tuple
	ICMP        ICMP
	// Mark is the connmark.
	Mark uint32
	Zone uint16
	// Status holds the IPS_* status bits (seen reply, assured, NAT...).
	Status uint32
	// Accounted says the counters are known: nf_conntrack_acct was on when
	// the flow was created.
	Accounted                   bool
	OrigCounters, ReplyCounters Counters
	// Start and Stop are the kernel's timestamps (nf_conntrack_timestamp);
	// zero when timestamps were off when the flow was created. Stop is set
	// on destroyed flows only.
	Start, Stop time.Time
}

// Masqueraded reports whether the flow's source was replaced: the reply
// goes to an address other than the one the flow came from.
func (f *Flow) Masqueraded() bool {
	return f.Reply.Dst.Addr().IsValid() && f.Reply.Dst.Addr().Unmap() != f.Orig.Src.Addr().Unmap()
}

// Translated returns the source address and port the remote side saw: the
// destination of the reply tuple. It equals Orig.Src for a flow that kept
// its source.
func (f *Flow) Translated() netip.AddrPort { return f.Reply.Dst }

// Duration returns how long the flow lived: Stop - Start for a destroyed
// flow, now - Start for a live one, zero without timestamps.
func (f *Flow) Duration(now time.Time) time.Duration {
	switch {
	case f.Start.IsZero():
		return 0
	case !f.Stop.IsZero():
		return f.Stop.Sub(f.Start)
	default:
		return now.Sub(f.Start)
	}
}

// String formats the flow like conntrack -L, for logs and test failures.
func (f Flow) String() string {
	return fmt.Sprintf("id=%d proto=%d %v->%v reply %v->%v mark=%#x orig=%d/%dB reply=%d/%dB",
		f.ID, f.Proto, f.Orig.Src, f.Orig.Dst, f.Reply.Src, f.Reply.Dst, f.Mark,
		f.OrigCounters.Packets, f.OrigCounters.Bytes, f.ReplyCounters.Packets, f.ReplyCounters.Bytes)
}

// InPrefixes reports whether a is inside one of prefixes. An empty list
// holds every address.
func InPrefixes(prefixes []netip.Prefix, a netip.Addr) bool {
	if len(prefixes) == 0 {
		return true
	}
	a = a.Unmap()
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

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
	// the tuples (Flow.Masqueraded).
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

// MarkLayout is where the decision sits in the packet mark and connmark.
// Mask selects the decision bits; the other fields are the values under
// the mask.
type MarkLayout struct {
	Mask, Masquerade, Passthrough, Fallback uint32
}

// DefaultMarks is the default layout: bits 12 and 13, clear of kube-proxy
// (0x4000, 0x8000) and Calico (0xffff0000).
var DefaultMarks = MarkLayout{Mask: 0x3000, Masquerade: 0x1000, Passthrough: 0x2000, Fallback: 0x3000}

// Validate checks that the three values are distinct, non-zero and inside
// the mask.
func (m MarkLayout) Validate() error {
	vals := [3]uint32{m.Masquerade, m.Passthrough, m.Fallback}
	for i, v := range vals {
		if v == 0 || v&^m.Mask != 0 {
			return fmt.Errorf("mark %#x is zero or outside mask %#x", v, m.Mask)
		}
		for _, w := range vals[:i] {
			if v == w {
				return fmt.Errorf("mark %#x used twice in layout %+v", v, m)
			}
		}
	}
	return nil
}

// Classify reads who decided a flow from its connmark.
func (m MarkLayout) Classify(connmark uint32) Decider {
	switch connmark & m.Mask {
	case 0:
		return Undecided
	case m.Masquerade:
		return AgentMasquerade
	case m.Passthrough:
		return AgentPassthrough
	case m.Fallback:
		return KernelFallback
	default:
		return UnknownMark
	}
}
