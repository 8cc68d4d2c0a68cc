package conntrack

import (
	"encoding/binary"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// referenceDecode is how the listener decoded a message before
// decodeEvent: ti-mo/conntrack's Event.Unmarshal, then fromCT. It reports
// false where the listener counted a decode error; an update has Type 0.
func referenceDecode(msg []byte) (Event, bool) {
	m := netlink.Message{
		Header: netlink.Header{
			Length: uint32(len(msg)),
			Type:   netlink.HeaderType(nl.MessageType(msg)),
			Flags:  netlink.HeaderFlags(nl.MessageFlags(msg)),
		},
		Data: msg[nl.HdrLen:],
	}
	var ev ct.Event
	if err := ev.Unmarshal(m); err != nil || ev.Flow == nil {
		return Event{}, false
	}
	out := Event{Flow: fromCT(ev.Flow)}
	switch ev.Type {
	case ct.EventNew:
		out.Type = EventNew
	case ct.EventDestroy:
		out.Type = EventDestroy
	}
	return out, true
}

// Levels of a ctnetlink message that both decoders read.
const (
	levelFlow = iota
	levelTuple
	levelLeaf // addresses, protocol, counters, timestamps
)

// kernelShaped reports whether the attributes both decoders read are
// shaped as the kernel makes them: each passes nla_ok (ti-mo reads a
// zero-length attribute as empty and goes on, where the kernel and
// nl.Attrs stop), and each type fits in 8 bits (ti-mo converts types to
// uint8, so it reads type 0x101 as 1; the kernel's are all below 32).
func kernelShaped(b []byte, level int) bool {
	for len(b) >= nl.AttrHdrLen {
		n := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & 0x3fff
		if n < nl.AttrHdrLen || n > len(b) || typ > 0xff {
			return false
		}
		data := b[nl.AttrHdrLen:n]
		switch {
		case level == levelFlow && (typ == ctaTupleOrig || typ == ctaTupleReply):
			if !kernelShaped(data, levelTuple) {
				return false
			}
		case level == levelFlow && (typ == ctaCountersOrig || typ == ctaCountersReply || typ == ctaTimestamp),
			level == levelTuple && (typ == ctaTupleIP || typ == ctaTupleProto):
			if !kernelShaped(data, levelLeaf) {
				return false
			}
		}
		b = b[min(nl.Align(n), len(b)):]
	}
	return true
}

// synthesizedEvents are events built with ti-mo/netfilter's encoder,
// with the attributes the kernel sends that no captured seed has (labels,
// a helper, a security context, sequence adjustment, a master tuple).
func synthesizedEvents(tb testing.TB) [][]byte {
	tb.Helper()
	ip := func(src, dst string) netfilter.Attribute {
		s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
		st, dt := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
		if s.Is6() {
			st, dt = ctaIPv6Src, ctaIPv6Dst
		}
		return netfilter.Attribute{Type: ctaTupleIP, Nested: true, Children: []netfilter.Attribute{
			{Type: st, Data: s.AsSlice()}, {Type: dt, Data: d.AsSlice()},
		}}
	}
	ports := func(proto uint8, sport, dport uint16) netfilter.Attribute {
		return netfilter.Attribute{Type: ctaTupleProto, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaProtoNum, Data: []byte{proto}},
			{Type: ctaProtoSrcPort, Data: netfilter.Uint16Bytes(sport)},
			{Type: ctaProtoDstPort, Data: netfilter.Uint16Bytes(dport)},
		}}
	}
	tuple := func(typ uint16, children ...netfilter.Attribute) netfilter.Attribute {
		return netfilter.Attribute{Type: typ, Nested: true, Children: children}
	}
	count := func(typ uint16, p, b uint64) netfilter.Attribute {
		return netfilter.Attribute{Type: typ, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaCountersPackets, Data: netfilter.Uint64Bytes(p)},
			{Type: ctaCountersBytes, Data: netfilter.Uint64Bytes(b)},
		}}
	}
	ftp := []netfilter.Attribute{
		tuple(ctaTupleOrig, ip("10.244.0.2", "11.0.0.10"), ports(6, 40000, 21)),
		tuple(ctaTupleReply, ip("11.0.0.10", "192.168.77.1"), ports(6, 21, 40000), netfilter.Attribute{Type: 3, Data: netfilter.Uint16Bytes(4)}),
		{Type: ctaStatus, Data: netfilter.Uint32Bytes(0x1be)},
		{Type: 4, Nested: true, Children: []netfilter.Attribute{ // CTA_PROTOINFO
			{Type: 1, Nested: true, Children: []netfilter.Attribute{{Type: 1, Data: []byte{7}}}},
		}},
		{Type: 5, Nested: true, Children: []netfilter.Attribute{{Type: 1, Data: []byte("ftp\x00")}}}, // CTA_HELP
		{Type: 7, Data: netfilter.Uint32Bytes(120)},                                                  // CTA_TIMEOUT
		{Type: ctaMark, Data: netfilter.Uint32Bytes(0x1000)},
		count(ctaCountersOrig, 12, 900), count(ctaCountersReply, 10, 4000),
		{Type: ctaID, Data: netfilter.Uint32Bytes(77)},
		{Type: 15, Nested: true, Children: []netfilter.Attribute{ // CTA_SEQ_ADJ_ORIG
			{Type: 1, Data: netfilter.Uint32Bytes(1)}, {Type: 2, Data: netfilter.Uint32Bytes(2)}, {Type: 3, Data: netfilter.Uint32Bytes(3)},
		}},
		{Type: ctaZone, Data: netfilter.Uint16Bytes(4)},
		{Type: 19, Nested: true, Children: []netfilter.Attribute{{Type: 1, Data: []byte("system_u:object_r:unlabeled_t:s0\x00")}}}, // CTA_SECCTX
		{Type: ctaTimestamp, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaTimestampStart, Data: netfilter.Uint64Bytes(1700000000000000000)},
			{Type: ctaTimestampStop, Data: netfilter.Uint64Bytes(1700000001000000000)},
		}},
		{Type: 22, Data: make([]byte, 16)}, // CTA_LABELS
	}
	data := tuple(14, ip("10.244.0.2", "11.0.0.10"), ports(6, 39999, 21)) // CTA_TUPLE_MASTER
	icmp6 := []netfilter.Attribute{
		tuple(ctaTupleOrig, ip("fd00:10:244::2", "2001:db8::1"), netfilter.Attribute{Type: ctaTupleProto, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaProtoNum, Data: []byte{58}}, {Type: ctaProtoICMPv6ID, Data: netfilter.Uint16Bytes(9)},
			{Type: ctaProtoICMPv6Type, Data: []byte{128}}, {Type: ctaProtoICMPv6Code, Data: []byte{0}},
		}}),
		tuple(ctaTupleReply, ip("2001:db8::1", "fd00:77::1"), netfilter.Attribute{Type: ctaTupleProto, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaProtoNum, Data: []byte{58}}, {Type: ctaProtoICMPv6ID, Data: netfilter.Uint16Bytes(9)},
			{Type: ctaProtoICMPv6Type, Data: []byte{129}}, {Type: ctaProtoICMPv6Code, Data: []byte{0}},
		}}),
		{Type: ctaID, Data: netfilter.Uint32Bytes(78)},
	}
	var out [][]byte
	for _, m := range []struct {
		typ   netfilter.MessageType
		flags netlink.HeaderFlags
		attrs []netfilter.Attribute
	}{
		{msgCTDelete, 0, ftp},
		{msgCTNew, netlink.Create | netlink.Excl, append(ftp[:len(ftp):len(ftp)], data)},
		{msgCTDelete, 0, icmp6},
		{msgCTNew, 0, icmp6},
	} {
		nm, err := netfilter.MarshalNetlink(netfilter.Header{SubsystemID: netfilter.NFSubsysCTNetlink, MessageType: m.typ, Family: netfilter.ProtoIPv4, Flags: m.flags}, m.attrs)
		if err != nil {
			tb.Fatal(err)
		}
		nm.Header.Length = uint32(nl.HdrLen + len(nm.Data))
		b, err := nm.MarshalBinary()
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// TestDecodeMatchesReference checks the two decoders on the synthesized
// events (the fuzz target checks the committed kernel captures).
func TestDecodeMatchesReference(t *testing.T) {
	for _, msg := range synthesizedEvents(t) {
		checkDecode(t, msg)
	}
}

// FuzzDecodeEvent: no input makes decoding panic, and every message
// ti-mo/conntrack decodes (shaped as the kernel makes them) decodes to the
// same event.
func FuzzDecodeEvent(f *testing.F) {
	for _, msg := range synthesizedEvents(f) {
		f.Add(msg)
	}
	f.Add(masqueradedUDP())
	f.Fuzz(func(t *testing.T, dgram []byte) {
		var ev Event
		decodeEvent(dgram, &ev)
		l := &Listener{events: make(chan Event, 8)}
		l.receive(dgram)

		// Compare on the input as one message whatever its length
		// field says: inserting or deleting bytes then still makes a
		// message both decoders read.
		if len(dgram) < nl.HdrLen+nfgenHdrLen {
			return
		}
		msg := slices.Clone(dgram)
		binary.NativeEndian.PutUint32(msg, uint32(len(msg)))
		want, ok := referenceDecode(msg)
		if !ok || !kernelShaped(msg[nl.HdrLen+nfgenHdrLen:], levelFlow) {
			return
		}
		var got Event
		if !decodeEvent(msg, &got) || got != want {
			t.Fatalf("decodeEvent(%x):\n got %s\nwant %s", msg, fields(got), fields(want))
		}
	})
}

// corpusMessage reads a seed of the committed corpus.
func corpusMessage(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzDecodeEvent", name))
	if err != nil {
		tb.Fatal(err)
	}
	_, v, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(v, "[]byte("), ")"))
	if err != nil {
		tb.Fatalf("seed %s: %v", name, err)
	}
	return []byte(s)
}

// BenchmarkDecode compares the cost of decoding one destroy event the
// kernel sent: ti-mo's decoder and fromCT (old) against decodeEvent (new).
// The old path's socket read (mdlayher/netlink's Receive, which also
// copies) is not included; BenchmarkKernelDestroy measures the whole
// reader.
func BenchmarkDecode(b *testing.B) {
	for _, seed := range []string{"kernel-destroy-udp4-nat", "kernel-destroy-tcp6-nat"} {
		msg := corpusMessage(b, seed)
		nm := netlink.Message{
			Header: netlink.Header{Length: uint32(len(msg)), Type: netlink.HeaderType(nl.MessageType(msg)), Flags: netlink.HeaderFlags(nl.MessageFlags(msg))},
			Data:   msg[nl.HdrLen:],
		}
		want, ok := referenceDecode(msg)
		if !ok || want.Type != EventDestroy {
			b.Fatalf("%s is not a destroy event", seed)
		}
		b.Run(seed+"/old", func(b *testing.B) {
			b.ReportAllocs()
			var ev Event
			for b.Loop() {
				var e ct.Event
				if err := e.Unmarshal(nm); err != nil {
					b.Fatal(err)
				}
				ev = Event{Type: EventDestroy, Flow: fromCT(e.Flow)}
			}
			if ev != want {
				b.Fatalf("decoded %+v", ev)
			}
		})
		b.Run(seed+"/new", func(b *testing.B) {
			b.ReportAllocs()
			var ev Event
			for b.Loop() {
				decodeEvent(msg, &ev)
			}
			if ev != want {
				b.Fatalf("decoded %+v", ev)
			}
		})
	}
}

// checkDecode fails t unless decodeEvent decodes msg exactly as ti-mo
// (referenceDecode) does, and returns the event.
func checkDecode(t *testing.T, msg []byte) Event {
	t.Helper()
	want, ok := referenceDecode(msg)
	if !ok {
		t.Fatalf("ti-mo does not decode %x", msg)
	}
	var got Event
	if !decodeEvent(msg, &got) || got != want {
		t.Errorf("decodeEvent(%x):\n got %s\nwant %s", msg, fields(got), fields(want))
	}
	return got
}
