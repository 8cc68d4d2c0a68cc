package conntrack

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// Builders of ctnetlink messages, in the kernel's layout.

const nlaFNested = 0x8000

func attr(typ uint16, data ...byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(nl.AttrHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func nest(typ uint16, children ...[]byte) []byte {
	var data []byte
	for _, c := range children {
		data = append(data, c...)
	}
	return attr(typ|nlaFNested, data...)
}

func attr16(typ, v uint16) []byte { return attr(typ, binary.BigEndian.AppendUint16(nil, v)...) }
func attr32(typ uint16, v uint32) []byte {
	return attr(typ, binary.BigEndian.AppendUint32(nil, v)...)
}
func attr64(typ uint16, v uint64) []byte {
	return attr(typ, binary.BigEndian.AppendUint64(nil, v)...)
}

// ctMsg is a ctnetlink message of type IPCTNL_MSG_CT_<msgType>.
func ctMsg(msgType uint8, flags uint16, attrs ...[]byte) []byte {
	b := make([]byte, nl.HdrLen, 256)
	binary.NativeEndian.PutUint16(b[4:], subsysCTNetlink<<8|uint16(msgType))
	binary.NativeEndian.PutUint16(b[6:], flags)
	b = append(b, 2, 0, 0, 0) // nfgenmsg: AF_INET, version 0, resource id 0
	for _, a := range attrs {
		b = append(b, a...)
	}
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	return b
}

// tupleNest is a CTA_TUPLE_* nest for a port protocol.
func tupleNest(typ uint16, proto uint8, src, dst netip.AddrPort) []byte {
	srcType, dstType := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if src.Addr().Is6() {
		srcType, dstType = ctaIPv6Src, ctaIPv6Dst
	}
	return nest(typ,
		nest(ctaTupleIP, attr(srcType, src.Addr().AsSlice()...), attr(dstType, dst.Addr().AsSlice()...)),
		nest(ctaTupleProto, attr(ctaProtoNum, proto), attr16(ctaProtoSrcPort, src.Port()), attr16(ctaProtoDstPort, dst.Port())),
	)
}

func counters(typ uint16, packets, bytes uint64) []byte {
	return nest(typ, attr64(ctaCountersPackets, packets), attr64(ctaCountersBytes, bytes))
}

const newFlags = 0x400 | 0x200 // NLM_F_CREATE | NLM_F_EXCL

var (
	ap        = netip.MustParseAddrPort
	tsStart   = time.Unix(1700000000, 123456789)
	podUDP    = ap("10.244.0.2:4000")
	remoteUDP = ap("11.0.0.10:53")
	nodeUDP   = ap("192.168.77.1:61000")
)

// masqueradedUDP is the destroy event of a masqueraded UDP flow, with
// every attribute the flow log reads and some it does not.
func masqueradedUDP(extra ...[]byte) []byte {
	attrs := [][]byte{
		tupleNest(ctaTupleOrig, 17, podUDP, remoteUDP),
		tupleNest(ctaTupleReply, 17, remoteUDP, nodeUDP),
		attr32(ctaStatus, 0x1be),
		attr32(ctaMark, 0x1000),
		counters(ctaCountersOrig, 2, 256),
		counters(ctaCountersReply, 1, 128),
		attr32(11, 1), // CTA_USE
		attr32(ctaID, 42),
		nest(ctaTimestamp, attr64(ctaTimestampStart, uint64(tsStart.UnixNano())), attr64(ctaTimestampStop, uint64(tsStart.Add(time.Second).UnixNano()))),
	}
	return ctMsg(msgCTDelete, 0, append(attrs, extra...)...)
}

var wantMasqueradedUDP = Flow{
	ID: 42, Proto: 17, Mark: 0x1000, Status: 0x1be,
	Orig:      Tuple{podUDP, remoteUDP},
	Reply:     Tuple{remoteUDP, nodeUDP},
	Accounted: true, OrigCounters: Counters{2, 256}, ReplyCounters: Counters{1, 128},
	Start: tsStart, Stop: tsStart.Add(time.Second),
}

// fields formats every field of an event (Flow.String leaves some out).
func fields(ev Event) string {
	type plain Flow
	return fmt.Sprintf("%v %+v", ev.Type, plain(ev.Flow))
}

func TestDecodeEvent(t *testing.T) {
	v6 := netip.MustParseAddr("fd00:10:244::2")
	remote6 := netip.MustParseAddr("2001:db8::1")
	icmp6 := func(typ uint16, src, dst netip.Addr, icmpType uint8) []byte {
		return nest(typ,
			nest(ctaTupleIP, attr(ctaIPv6Src, src.AsSlice()...), attr(ctaIPv6Dst, dst.AsSlice()...)),
			nest(ctaTupleProto, attr(ctaProtoNum, protoICMPv6), attr16(ctaProtoICMPv6ID, 9), attr(ctaProtoICMPv6Type, icmpType), attr(ctaProtoICMPv6Code, 0)),
		)
	}
	mapped := netip.AddrPortFrom(netip.AddrFrom16(podUDP.Addr().As16()), podUDP.Port())
	withFlow := func(f func(*Flow)) Flow { g := wantMasqueradedUDP; f(&g); return g }

	tests := []struct {
		name string
		msg  []byte
		ok   bool
		want Event
	}{
		{"masqueraded udp destroy", masqueradedUDP(), true, Event{EventDestroy, wantMasqueradedUDP}},
		{"new icmpv6 in a zone", ctMsg(msgCTNew, newFlags,
			icmp6(ctaTupleOrig, v6, remote6, 128), icmp6(ctaTupleReply, remote6, v6, 129),
			attr16(ctaZone, 7), attr32(ctaID, 5),
		), true, Event{EventNew, Flow{
			ID: 5, Proto: 58, Zone: 7,
			Orig:  Tuple{netip.AddrPortFrom(v6, 0), netip.AddrPortFrom(remote6, 0)},
			Reply: Tuple{netip.AddrPortFrom(remote6, 0), netip.AddrPortFrom(v6, 0)},
			ICMP:  ICMP{Type: 128, ID: 9},
		}}},
		{"new with only NLM_F_CREATE", ctMsg(msgCTNew, 0x400, attr32(ctaID, 5)), true, Event{EventNew, Flow{ID: 5}}},
		{"update", ctMsg(msgCTNew, 0, attr32(ctaID, 5)), true, Event{0, Flow{ID: 5}}},
		{"32-bit counters", ctMsg(msgCTDelete, 0, nest(ctaCountersOrig, attr32(ctaCounters32Packets, 3), attr32(ctaCounters32Bytes, 300))), true,
			Event{EventDestroy, Flow{Accounted: true, OrigCounters: Counters{3, 300}}}},
		{"unknown attributes skipped", masqueradedUDP(attr(99, 1, 2, 3), nest(ctaTimestamp, attr(3, 0, 0, 0, 0))), true, Event{EventDestroy, wantMasqueradedUDP}},
		{"v4-mapped address unmapped", ctMsg(msgCTDelete, 0, tupleNest(ctaTupleOrig, 17, mapped, remoteUDP)), true,
			Event{EventDestroy, Flow{Proto: 17, Orig: Tuple{podUDP, remoteUDP}}}},
		{"later attribute wins", masqueradedUDP(attr32(ctaMark, 0x2000)), true,
			Event{EventDestroy, withFlow(func(f *Flow) { f.Mark = 0x2000 })}},
		{"later ip nest replaces both addresses", masqueradedUDP(nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Dst, 1, 2, 3, 4)))), true,
			Event{EventDestroy, withFlow(func(f *Flow) {
				f.Orig = Tuple{netip.AddrPortFrom(netip.Addr{}, podUDP.Port()), ap("1.2.3.4:53")}
			})}},
		{"truncated attribute ends the run", append(masqueradedUDP(), 0xff, 0, 8, 0), true, Event{EventDestroy, wantMasqueradedUDP}},

		{"empty", nil, false, Event{}},
		{"no nfgenmsg", ctMsg(msgCTDelete, 0)[:nl.HdrLen+2], false, Event{}},
		{"expectation", func() []byte { m := ctMsg(msgCTDelete, 0); m[5] = 2; return m }(), false, Event{}},
		{"get", ctMsg(1, 0, attr32(ctaID, 5)), false, Event{}},
		{"short mark", masqueradedUDP(attr16(ctaMark, 1)), false, Event{}},
		{"long zone", masqueradedUDP(attr32(ctaZone, 1)), false, Event{}},
		{"bad address", ctMsg(msgCTDelete, 0, nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Src, 1, 2, 3)))), false, Event{}},
		{"bad port", ctMsg(msgCTDelete, 0, nest(ctaTupleReply, nest(ctaTupleProto, attr32(ctaProtoDstPort, 1)))), false, Event{}},
		{"bad counter", ctMsg(msgCTDelete, 0, nest(ctaCountersReply, attr32(ctaCountersBytes, 1))), false, Event{}},
		{"bad timestamp", ctMsg(msgCTDelete, 0, nest(ctaTimestamp, attr32(ctaTimestampStop, 1))), false, Event{}},
	}
	for _, tt := range tests {
		var got Event
		ok := decodeEvent(tt.msg, &got)
		if ok != tt.ok || ok && got != tt.want {
			t.Errorf("%s: decodeEvent = %v\n got %s\nwant %s", tt.name, ok, fields(got), fields(tt.want))
		}
	}
}

func TestDecodeEventAllocs(t *testing.T) {
	msg := masqueradedUDP()
	var ev Event
	if n := testing.AllocsPerRun(100, func() { decodeEvent(msg, &ev) }); n != 0 {
		t.Errorf("decodeEvent allocates %v times per event", n)
	}
	l := &Listener{events: make(chan Event, 1)}
	if n := testing.AllocsPerRun(100, func() { l.receive(msg) }); n != 0 {
		t.Errorf("Listener.receive allocates %v times per event", n)
	}
}

// TestReceive drives the reader's decoding without a socket: every
// message of a datagram is decoded, and what does not decode is counted.
func TestReceive(t *testing.T) {
	pad := func(b []byte) []byte { return append(b, make([]byte, nl.Align(len(b))-len(b))...) }
	join := func(msgs ...[]byte) []byte {
		var b []byte
		for _, m := range msgs {
			b = append(b, pad(m)...)
		}
		return b
	}
	ev := masqueradedUDP()
	tests := []struct {
		name  string
		dgram []byte
		want  Stats
	}{
		{"one event", ev, Stats{Received: 1, Delivered: 1}},
		{"two events", join(ev, ev), Stats{Received: 2, Delivered: 2}},
		{"update ignored", ctMsg(msgCTNew, 0), Stats{}},
		{"not an event", join(ctMsg(1, 0), ev), Stats{Received: 1, Delivered: 1, DecodeErrors: 1}},
		{"cut short", join(ev, ev[:len(ev)-8]), Stats{Received: 1, Delivered: 1, DecodeErrors: 1}},
		{"garbage", []byte{1, 2, 3}, Stats{DecodeErrors: 1}},
	}
	for _, tt := range tests {
		l := &Listener{events: make(chan Event, 4)}
		l.receive(tt.dgram)
		if got := l.Stats(); got != tt.want {
			t.Errorf("%s: stats %+v, want %+v", tt.name, got, tt.want)
		}
		for range tt.want.Delivered {
			if got := <-l.events; got != (Event{EventDestroy, wantMasqueradedUDP}) {
				t.Errorf("%s: delivered %+v", tt.name, got)
			}
		}
	}
}
