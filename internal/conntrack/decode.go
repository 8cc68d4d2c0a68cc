package conntrack

import (
	"encoding/binary"
	"net/netip"
	"time"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// Decoding of ctnetlink event messages (linux/netfilter/nfnetlink_conntrack.h)
// straight into Event. Every flow pays for one destroy event, so this is a
// hot path: it reads the attributes in place and allocates nothing, where
// mdlayher/netlink and ti-mo/conntrack copy every attribute and build a
// ct.Flow on the heap. It is plain byte parsing, apart from the socket
// code, so that it is tested and fuzzed on any platform against
// ti-mo/conntrack as the reference.
const (
	nfgenHdrLen     = 4 // struct nfgenmsg
	subsysCTNetlink = 1 // NFNL_SUBSYS_CTNETLINK, the message type's high byte
	msgCTNew        = 0 // IPCTNL_MSG_CT_NEW
	msgCTDelete     = 2 // IPCTNL_MSG_CT_DELETE
	// NLM_F_CREATE and NLM_F_EXCL: the kernel marks a new entry's event
	// with both. ti-mo takes either as new, and a NEW message with
	// neither as an update; so does decodeEvent.
	nlmFNewEvent = 0x400 | 0x200

	// enum ctattr_type
	ctaTupleOrig     = 1
	ctaTupleReply    = 2
	ctaStatus        = 3
	ctaMark          = 8
	ctaCountersOrig  = 9
	ctaCountersReply = 10
	ctaID            = 12
	ctaZone          = 18
	ctaTimestamp     = 20

	// enum ctattr_tuple
	ctaTupleIP    = 1
	ctaTupleProto = 2

	// enum ctattr_ip
	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	// enum ctattr_l4proto
	ctaProtoNum        = 1
	ctaProtoSrcPort    = 2
	ctaProtoDstPort    = 3
	ctaProtoICMPID     = 4
	ctaProtoICMPType   = 5
	ctaProtoICMPCode   = 6
	ctaProtoICMPv6ID   = 7
	ctaProtoICMPv6Type = 8
	ctaProtoICMPv6Code = 9

	// enum ctattr_counters
	ctaCountersPackets   = 1
	ctaCountersBytes     = 2
	ctaCounters32Packets = 3
	ctaCounters32Bytes   = 4

	// enum ctattr_tstamp
	ctaTimestampStart = 1
	ctaTimestampStop  = 2

	protoICMP   = 1
	protoICMPv6 = 58
)

// decodeEvent decodes one ctnetlink event message (from nl.NextMessage,
// netlink header included) into ev. It reports false for a message that
// is not a conntrack entry event, or whose attributes the flow needs have
// the wrong size. An update (a NEW message with neither NLM_F_CREATE nor
// NLM_F_EXCL; the Listener does not subscribe to them) decodes with
// ev.Type zero.
//
// Attributes are walked as the kernel's nla_for_each_attr does, so a
// malformed one ends its run; unknown attributes are skipped. A repeated
// attribute overrides the earlier one the way ti-mo/conntrack's decoder
// does, so that the two agree on every input it accepts.
//
// Each attribute iterator is declared before its loop: declared in the
// for statement, it is copied into a fresh variable every iteration (Go
// 1.22 loop variables; it is addressed by its methods), which made the
// walk four times slower.
func decodeEvent(msg []byte, ev *Event) bool {
	if len(msg) < nl.HdrLen+nfgenHdrLen {
		return false
	}
	typ := nl.MessageType(msg)
	if typ>>8 != subsysCTNetlink {
		return false
	}
	var et EventType
	switch typ & 0xff {
	case msgCTNew:
		if nl.MessageFlags(msg)&nlmFNewEvent != 0 {
			et = EventNew
		}
	case msgCTDelete:
		et = EventDestroy
	default:
		return false
	}
	var f flowAttrs
	if !f.decode(msg[nl.HdrLen+nfgenHdrLen:]) {
		return false
	}
	ev.Type = et
	f.fill(&ev.Flow)
	return true
}

// flowAttrs holds what decodeEvent reads, in the shape of the attributes:
// a tuple's addresses and its protocol part arrive in separate nests, and
// either may be repeated.
type flowAttrs struct {
	orig, reply                 tupleAttrs
	id, mark, status            uint32
	zone                        uint16
	origCounters, replyCounters Counters
	start, stop                 time.Time
}

type tupleAttrs struct {
	src, dst netip.Addr
	proto    protoAttrs
}

type protoAttrs struct {
	num              uint8
	srcPort, dstPort uint16
	// icmp is set once the protocol was ICMP or ICMPv6, as ti-mo sets its
	// ICMPv4 and ICMPv6 flags: a later protocol number does not clear it.
	icmp      bool
	icmpType  uint8
	icmpCode  uint8
	icmpIdent uint16
}

func (f *flowAttrs) decode(b []byte) bool {
	ok := true
	a := nl.NewAttrs(b)
	for ok && a.Next() {
		d := a.Data()
		switch a.Type() {
		case ctaTupleOrig:
			ok = f.orig.decode(d)
		case ctaTupleReply:
			ok = f.reply.decode(d)
		case ctaStatus:
			f.status, ok = be32(d)
		case ctaMark:
			f.mark, ok = be32(d)
		case ctaID:
			f.id, ok = be32(d)
		case ctaZone:
			f.zone, ok = be16(d)
		case ctaCountersOrig:
			ok = decodeCounters(d, &f.origCounters)
		case ctaCountersReply:
			ok = decodeCounters(d, &f.replyCounters)
		case ctaTimestamp:
			ok = f.decodeTimestamp(d)
		}
	}
	return ok
}

// decode reads a CTA_TUPLE_* nest. A CTA_TUPLE_IP or CTA_TUPLE_PROTO
// replaces what an earlier one set; CTA_TUPLE_ZONE is not needed (the
// entry's zone is CTA_ZONE).
func (t *tupleAttrs) decode(b []byte) bool {
	a := nl.NewAttrs(b)
	for a.Next() {
		switch a.Type() {
		case ctaTupleIP:
			t.src, t.dst = netip.Addr{}, netip.Addr{}
			ip := a.Nested()
			for ip.Next() {
				// ti-mo takes either address length under either
				// family's type; so does this, to agree with it.
				addr, ok := netip.AddrFromSlice(ip.Data())
				if !ok {
					return false
				}
				switch ip.Type() {
				case ctaIPv4Src, ctaIPv6Src:
					t.src = addr.Unmap()
				case ctaIPv4Dst, ctaIPv6Dst:
					t.dst = addr.Unmap()
				}
			}
		case ctaTupleProto:
			t.proto = protoAttrs{}
			if !t.proto.decode(a.Nested()) {
				return false
			}
		}
	}
	return true
}

func (p *protoAttrs) decode(a nl.Attrs) bool {
	ok := true
	for ok && a.Next() {
		d := a.Data()
		switch a.Type() {
		case ctaProtoNum:
			p.num, ok = u8(d)
			p.icmp = p.icmp || p.num == protoICMP || p.num == protoICMPv6
		case ctaProtoSrcPort:
			p.srcPort, ok = be16(d)
		case ctaProtoDstPort:
			p.dstPort, ok = be16(d)
		case ctaProtoICMPID, ctaProtoICMPv6ID:
			p.icmpIdent, ok = be16(d)
		case ctaProtoICMPType, ctaProtoICMPv6Type:
			p.icmpType, ok = u8(d)
		case ctaProtoICMPCode, ctaProtoICMPv6Code:
			p.icmpCode, ok = u8(d)
		}
	}
	return ok
}

// decodeCounters reads a CTA_COUNTERS_* nest. Kernels send 64-bit
// counters; the 32-bit attributes are from older ones.
func decodeCounters(b []byte, c *Counters) bool {
	ok := true
	a := nl.NewAttrs(b)
	for ok && a.Next() {
		d := a.Data()
		switch a.Type() {
		case ctaCountersPackets:
			c.Packets, ok = be64(d)
		case ctaCountersBytes:
			c.Bytes, ok = be64(d)
		case ctaCounters32Packets:
			var v uint32
			v, ok = be32(d)
			c.Packets = uint64(v)
		case ctaCounters32Bytes:
			var v uint32
			v, ok = be32(d)
			c.Bytes = uint64(v)
		}
	}
	return ok
}

// decodeTimestamp reads CTA_TIMESTAMP: nanoseconds since the epoch.
func (f *flowAttrs) decodeTimestamp(b []byte) bool {
	a := nl.NewAttrs(b)
	for a.Next() {
		var t *time.Time
		switch a.Type() {
		case ctaTimestampStart:
			t = &f.start
		case ctaTimestampStop:
			t = &f.stop
		default:
			continue
		}
		ns, ok := be64(a.Data())
		if !ok {
			return false
		}
		*t = time.Unix(0, int64(ns))
	}
	return true
}

// fill writes the flow as the flow log sees it.
func (f *flowAttrs) fill(out *Flow) {
	*out = Flow{
		ID:     f.id,
		Proto:  f.orig.proto.num,
		Orig:   f.orig.tuple(),
		Reply:  f.reply.tuple(),
		Mark:   f.mark,
		Zone:   f.zone,
		Status: f.status,
		// With accounting on, every entry has seen its first packet.
		Accounted:     f.origCounters.Packets != 0,
		OrigCounters:  f.origCounters,
		ReplyCounters: f.replyCounters,
		Start:         f.start,
		Stop:          f.stop,
	}
	if p := f.orig.proto; p.icmp {
		out.ICMP = ICMP{Type: p.icmpType, Code: p.icmpCode, ID: p.icmpIdent}
	}
}

func (t *tupleAttrs) tuple() Tuple {
	return Tuple{
		Src: netip.AddrPortFrom(t.src, t.proto.srcPort),
		Dst: netip.AddrPortFrom(t.dst, t.proto.dstPort),
	}
}

// Fixed-size payloads, in network byte order. A payload of another size
// is malformed (as it is to ti-mo/conntrack).

func u8(d []byte) (uint8, bool) {
	if len(d) != 1 {
		return 0, false
	}
	return d[0], true
}

func be16(d []byte) (uint16, bool) {
	if len(d) != 2 {
		return 0, false
	}
	return binary.BigEndian.Uint16(d), true
}

func be32(d []byte) (uint32, bool) {
	if len(d) != 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(d), true
}

func be64(d []byte) (uint64, bool) {
	if len(d) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(d), true
}
