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
