package packet_test

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/nfmasq/nfmasq/queue/packet"
)

var (
	src4 = netip.MustParseAddr("10.244.0.5")
	dst4 = netip.MustParseAddr("8.8.8.8")
	src6 = netip.MustParseAddr("fd00:10:244::5")
	dst6 = netip.MustParseAddr("2001:db8::53")
)

// ipv4 builds an IPv4 packet with a 20-byte header and a correct total
// length around l4.
func ipv4(proto packet.IPProto, l4 []byte) []byte {
	b := make([]byte, 20, 20+len(l4))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(l4)))
	b[8] = 64
	b[9] = byte(proto)
	copy(b[12:], src4.AsSlice())
	copy(b[16:], dst4.AsSlice())
	return append(b, l4...)
}

// ipv6 builds an IPv6 packet whose first next header is nh, followed by
// rest (extension headers and transport), with a correct payload length.
func ipv6(nh byte, rest ...[]byte) []byte {
	b := make([]byte, 40)
	b[0] = 0x60
	b[6] = nh
	b[7] = 64
	copy(b[8:], src6.AsSlice())
	copy(b[24:], dst6.AsSlice())
	for _, r := range rest {
		b = append(b, r...)
	}
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	return b
}

func ports(n int, sp, dp uint16) []byte {
	b := make([]byte, n)
	binary.BigEndian.PutUint16(b, sp)
	binary.BigEndian.PutUint16(b[2:], dp)
	return b
}

func udp(sp, dp uint16) []byte { return ports(8, sp, dp) }
func tcp(sp, dp uint16) []byte {
	b := ports(20, sp, dp)
	b[12] = 5 << 4
	return b
}
func icmp(typ, code byte) []byte { return []byte{typ, code, 0, 0, 0, 1, 0, 1} }

// ext is a generic IPv6 extension header of n bytes (a multiple of 8).
func ext(nh byte, n int) []byte {
	b := make([]byte, n)
	b[0] = nh
	b[1] = byte(n/8 - 1)
	return b
}

func frag6(nh byte, offset uint16, more bool) []byte {
	b := make([]byte, 8)
	b[0] = nh
	v := offset << 3
	if more {
		v |= 1
	}
	binary.BigEndian.PutUint16(b[2:], v)
	return b
}

// with returns a modified copy of b.
func with(b []byte, f func(b []byte)) []byte {
	c := append([]byte(nil), b...)
	f(c)
	return c
}

func put16(off int, v uint16) func([]byte) {
	return func(b []byte) { binary.BigEndian.PutUint16(b[off:], v) }
}

func TestDecode(t *testing.T) {
	udp4 := ipv4(packet.UDP, udp(40000, 53))
	udp6 := ipv6(17, udp(40000, 53))
	deepChain := make([][]byte, 0, packet.MaxExtHeaders+2)
	for range packet.MaxExtHeaders + 1 {
		deepChain = append(deepChain, ext(60, 8))
	}
	deepChain[len(deepChain)-1][0] = 17
	deepChain = append(deepChain, udp(1, 2))
	okChain := append([][]byte(nil), deepChain[1:]...)

	tests := []struct {
		name    string
		b       []byte
		version uint8 // for DecodeVersion; 0 means Decode
		want    packet.Parsed
	}{
		{
			name: "ipv4 udp",
			b:    udp4,
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, SrcPort: 40000, DstPort: 53, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 tcp",
			b:    ipv4(packet.TCP, tcp(40000, 443)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.TCP, Src: src4, Dst: dst4, SrcPort: 40000, DstPort: 443, Length: 40, TransportOffset: 20},
		},
		{
			name: "ipv4 sctp",
			b:    ipv4(packet.SCTP, ports(12, 5000, 5001)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.SCTP, Src: src4, Dst: dst4, SrcPort: 5000, DstPort: 5001, Length: 32, TransportOffset: 20},
		},
		{
			name: "ipv4 udplite",
			b:    ipv4(packet.UDPLite, ports(8, 7, 8)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDPLite, Src: src4, Dst: dst4, SrcPort: 7, DstPort: 8, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 dccp",
			b:    ipv4(packet.DCCP, ports(12, 9, 10)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.DCCP, Src: src4, Dst: dst4, SrcPort: 9, DstPort: 10, Length: 32, TransportOffset: 20},
		},
		{
			name: "ipv4 icmp echo",
			b:    ipv4(packet.ICMPv4, icmp(8, 0)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.ICMPv4, Src: src4, Dst: dst4, ICMPType: 8, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 gre has no ports",
			b:    ipv4(47, make([]byte, 4)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: 47, Src: src4, Dst: dst4, Length: 24, TransportOffset: 20},
		},
		{
			name: "ipv4 options",
			b: func() []byte {
				b := ipv4(packet.UDP, append(make([]byte, 8), udp(1, 2)...))
				b[0] = 0x47
				return b
			}(),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, SrcPort: 1, DstPort: 2, Length: 36, TransportOffset: 28},
		},
		{
			name: "ipv4 first fragment",
			b:    with(udp4, put16(6, 0x2000)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Frag: packet.FirstFragment, Src: src4, Dst: dst4, SrcPort: 40000, DstPort: 53, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 later fragment",
			b:    with(udp4, put16(6, 0x0003)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Frag: packet.LaterFragment, Src: src4, Dst: dst4, Length: 28},
		},
		{
			name: "ipv4 last fragment",
			b:    with(udp4, put16(6, 0x0100)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Frag: packet.LaterFragment, Src: src4, Dst: dst4, Length: 28},
		},
		{
			name: "ipv4 tiny first fragment",
			b:    with(ipv4(packet.TCP, tcp(1, 2)[:8]), put16(6, 0x2000)),
			want: packet.Parsed{Status: packet.TruncatedTransport, IPVersion: 4, Proto: packet.TCP, Frag: packet.FirstFragment, Src: src4, Dst: dst4, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 total length 0 (BIG TCP)",
			b:    with(ipv4(packet.TCP, tcp(1, 2)), put16(2, 0)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.TCP, Src: src4, Dst: dst4, SrcPort: 1, DstPort: 2, Length: 40, TransportOffset: 20},
		},
		{
			name: "ipv4 trailing padding ignored",
			b:    append(append([]byte(nil), udp4...), 0, 0, 0, 0),
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, SrcPort: 40000, DstPort: 53, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv4 snapped in transport",
			b:    with(udp4, put16(2, 1500))[:24],
			want: packet.Parsed{Status: packet.Snapped, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, Length: 1500, TransportOffset: 20},
		},
		{
			name: "ipv4 snapped in options",
			b: with(udp4, func(b []byte) {
				b[0] = 0x4f
				binary.BigEndian.PutUint16(b[2:], 1500)
			}),
			want: packet.Parsed{Status: packet.Snapped, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, Length: 1500},
		},
		{
			name: "ipv4 snapped later fragment is fine",
			b:    with(udp4, put16(6, 0x0010))[:20],
			want: packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Frag: packet.LaterFragment, Src: src4, Dst: dst4, Length: 28},
		},
		{
			name: "ipv4 transport cut by total length",
			b:    with(udp4, put16(2, 24)),
			want: packet.Parsed{Status: packet.TruncatedTransport, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, Length: 24, TransportOffset: 20},
		},
		{
			name: "ipv4 truncated header",
			b:    udp4[:19],
			want: packet.Parsed{Status: packet.Truncated, IPVersion: 4},
		},
		{
			name: "ipv4 bad ihl",
			b:    with(udp4, func(b []byte) { b[0] = 0x44 }),
			want: packet.Parsed{Status: packet.BadHeaderLength, IPVersion: 4},
		},
		{
			name: "ipv4 total length below header length",
			b:    with(udp4, put16(2, 12)),
			want: packet.Parsed{Status: packet.BadTotalLength, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, Length: 12},
		},
		{
			name: "ipv4 total length below options",
			b:    with(udp4, func(b []byte) { b[0] = 0x46; binary.BigEndian.PutUint16(b[2:], 20) }),
			want: packet.Parsed{Status: packet.BadTotalLength, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, Length: 20},
		},
		{
			name: "empty",
			b:    nil,
			want: packet.Parsed{Status: packet.NotIP},
		},
		{
			name: "version 5",
			b:    with(udp4, func(b []byte) { b[0] = 0x55 }),
			want: packet.Parsed{Status: packet.NotIP},
		},
		{
			name: "arp-like payload",
			b:    []byte{0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01},
			want: packet.Parsed{Status: packet.NotIP},
		},
		{
			name:    "link layer says ipv6, nibble says 4",
			b:       udp4,
			version: 6,
			want:    packet.Parsed{Status: packet.BadVersion},
		},
		{
			name:    "link layer agrees",
			b:       udp4,
			version: 4,
			want:    packet.Parsed{Status: packet.OK, IPVersion: 4, Proto: packet.UDP, Src: src4, Dst: dst4, SrcPort: 40000, DstPort: 53, Length: 28, TransportOffset: 20},
		},
		{
			name: "ipv6 udp",
			b:    udp6,
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.UDP, Src: src6, Dst: dst6, SrcPort: 40000, DstPort: 53, Length: 48, TransportOffset: 40},
		},
		{
			name: "ipv6 icmpv6 echo",
			b:    ipv6(58, icmp(128, 0)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.ICMPv6, Src: src6, Dst: dst6, ICMPType: 128, Length: 48, TransportOffset: 40},
		},
		{
			name: "ipv6 hop-by-hop, dest-opts, routing, tcp",
			b:    ipv6(0, ext(60, 8), ext(43, 16), ext(6, 24), tcp(1, 443)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.TCP, ExtHeaders: 3, Src: src6, Dst: dst6, SrcPort: 1, DstPort: 443, Length: 108, TransportOffset: 88},
		},
		{
			name: "ipv6 authentication header",
			b:    ipv6(51, []byte{6, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, tcp(5, 6)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.TCP, ExtHeaders: 1, Src: src6, Dst: dst6, SrcPort: 5, DstPort: 6, Length: 84, TransportOffset: 64},
		},
		{
			name: "ipv6 first fragment",
			b:    ipv6(44, frag6(17, 0, true), udp(7, 8)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.UDP, Frag: packet.FirstFragment, ExtHeaders: 1, Src: src6, Dst: dst6, SrcPort: 7, DstPort: 8, Length: 56, TransportOffset: 48},
		},
		{
			name: "ipv6 later fragment",
			b:    ipv6(44, frag6(17, 185, false), udp(7, 8)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.UDP, Frag: packet.LaterFragment, ExtHeaders: 1, Src: src6, Dst: dst6, Length: 56},
		},
		{
			name: "ipv6 atomic fragment",
			b:    ipv6(44, frag6(17, 0, false), udp(7, 8)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.UDP, ExtHeaders: 1, Src: src6, Dst: dst6, SrcPort: 7, DstPort: 8, Length: 56, TransportOffset: 48},
		},
		{
			name: "ipv6 no next header",
			b:    ipv6(59),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: 59, Src: src6, Dst: dst6, Length: 40, TransportOffset: 40},
		},
		{
			name: "ipv6 esp",
			b:    ipv6(50, make([]byte, 16)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.ESP, Src: src6, Dst: dst6, Length: 56, TransportOffset: 40},
		},
		{
			name: "ipv6 chain at the bound",
			b:    ipv6(60, okChain...),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.UDP, ExtHeaders: packet.MaxExtHeaders, Src: src6, Dst: dst6, SrcPort: 1, DstPort: 2, Length: 40 + 8*packet.MaxExtHeaders + 8, TransportOffset: 40 + 8*packet.MaxExtHeaders},
		},
		{
			name: "ipv6 chain over the bound",
			b:    ipv6(60, deepChain...),
			want: packet.Parsed{Status: packet.BadExtHeader, IPVersion: 6, Proto: 60, ExtHeaders: packet.MaxExtHeaders, Src: src6, Dst: dst6, Length: 40 + 8*(packet.MaxExtHeaders+1) + 8},
		},
		{
			name: "ipv6 extension header past payload length",
			b:    with(ipv6(60, ext(17, 16), udp(1, 2)), put16(4, 8)),
			want: packet.Parsed{Status: packet.BadExtHeader, IPVersion: 6, Proto: 60, Src: src6, Dst: dst6, Length: 48},
		},
		{
			name: "ipv6 extension length field past payload length",
			b:    with(ipv6(60, ext(17, 8), udp(1, 2)), func(b []byte) { b[41] = 200 }),
			want: packet.Parsed{Status: packet.BadExtHeader, IPVersion: 6, Proto: 60, Src: src6, Dst: dst6, Length: 56},
		},
		{
			name: "ipv6 snapped in extension headers",
			b:    ipv6(0, ext(60, 64), ext(17, 64), udp(1, 2))[:108],
			want: packet.Parsed{Status: packet.Snapped, IPVersion: 6, Proto: 60, ExtHeaders: 1, Src: src6, Dst: dst6, Length: 176},
		},
		{
			name: "ipv6 headers walked past the capture",
			b:    ipv6(0, ext(60, 64), ext(17, 64), udp(1, 2))[:128],
			want: packet.Parsed{Status: packet.Snapped, IPVersion: 6, Proto: packet.UDP, ExtHeaders: 2, Src: src6, Dst: dst6, Length: 176, TransportOffset: 168},
		},
		{
			name: "ipv6 snapped in transport",
			b:    ipv6(17, udp(1, 2), make([]byte, 100))[:44],
			want: packet.Parsed{Status: packet.Snapped, IPVersion: 6, Proto: packet.UDP, Src: src6, Dst: dst6, Length: 148, TransportOffset: 40},
		},
		{
			name: "ipv6 payload length 0 (jumbo, BIG TCP)",
			b:    with(ipv6(6, tcp(1, 2)), put16(4, 0)),
			want: packet.Parsed{Status: packet.OK, IPVersion: 6, Proto: packet.TCP, Src: src6, Dst: dst6, SrcPort: 1, DstPort: 2, Length: 60, TransportOffset: 40},
		},
		{
			name: "ipv6 transport cut by payload length",
			b:    with(udp6, put16(4, 4)),
			want: packet.Parsed{Status: packet.TruncatedTransport, IPVersion: 6, Proto: packet.UDP, Src: src6, Dst: dst6, Length: 44, TransportOffset: 40},
		},
		{
			name: "ipv6 truncated header",
			b:    udp6[:39],
			want: packet.Parsed{Status: packet.Truncated, IPVersion: 6},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p packet.Parsed
			// Decode into a dirty value: nothing from the previous
			// packet may survive.
			p.Decode(ipv4(packet.TCP, tcp(9, 9)))
			if tt.version != 0 {
				p.DecodeVersion(tt.b, tt.version)
			} else {
				p.Decode(tt.b)
			}
			if p != tt.want {
				t.Errorf("Decode:\n got %+v\nwant %+v", p, tt.want)
			}
			if got, want := p.Status.Valid(), p.Dst.IsValid() && (p.Status == packet.OK || p.Status == packet.Snapped); got != want {
				t.Errorf("Status.Valid() = %v with Dst %v", got, p.Dst)
			}
		})
	}
}

func TestFlowKey(t *testing.T) {
	var a, b packet.Parsed
	a.Decode(ipv4(packet.UDP, udp(40000, 53)))
	b.Decode(ipv4(packet.UDP, append(udp(40000, 53), 1, 2, 3)))
	flows := map[packet.FlowKey]int{}
	flows[a.FlowKey()]++
	flows[b.FlowKey()]++
	if len(flows) != 1 {
		t.Fatalf("two packets of one flow gave %d keys", len(flows))
	}
	if got, want := a.FlowKey().String(), "udp 10.244.0.5:40000 > 8.8.8.8:53"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	b.Decode(ipv4(packet.UDP, udp(40001, 53)))
	if a.FlowKey() == b.FlowKey() {
		t.Errorf("different source ports gave equal keys")
	}
}

func TestStrings(t *testing.T) {
	for s := range packet.NumStatus {
		if got := s.String(); got == "" || got[:min(len(got), 7)] == "status_" {
			t.Errorf("Status(%d) has no name", s)
		}
	}
	var p packet.Parsed
	p.Decode(with(ipv6(58, icmp(128, 0)), put16(4, 0)))
	if got, want := p.String(), "ok ipv6 icmpv6 [fd00:10:244::5]:0 > [2001:db8::53]:0 type 128 code 0 len 48"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestHasPorts(t *testing.T) {
	tests := []struct {
		b    []byte
		want bool
	}{
		{ipv4(packet.UDP, udp(1, 2)), true},
		{with(ipv4(packet.UDP, udp(1, 2)), put16(6, 1)), false},
		{ipv4(packet.ICMPv4, icmp(8, 0)), false},
		{ipv4(packet.UDP, udp(1, 2))[:24], false},
	}
	for i, tt := range tests {
		var p packet.Parsed
		p.Decode(tt.b)
		if got := p.HasPorts(); got != tt.want {
			t.Errorf("%d: HasPorts() = %v for %v", i, got, p.String())
		}
	}
}

func TestDecodeAllocs(t *testing.T) {
	pkts := [][]byte{
		ipv4(packet.UDP, udp(1, 2)),
		ipv6(0, ext(60, 8), ext(43, 16), ext(6, 24), tcp(1, 443)),
		ipv6(44, frag6(17, 185, false), udp(7, 8)),
		{0x45},
	}
	var p packet.Parsed
	var keys [4]packet.FlowKey
	allocs := testing.AllocsPerRun(1000, func() {
		for i, b := range pkts {
			p.Decode(b)
			keys[i] = p.FlowKey()
		}
	})
	if allocs != 0 {
		t.Errorf("Decode+FlowKey allocated %v times per run, want 0", allocs)
	}
}

func BenchmarkDecode(b *testing.B) {
	cases := []struct {
		name string
		pkt  []byte
	}{
		{"ipv4-udp", ipv4(packet.UDP, udp(40000, 53))},
		{"ipv4-tcp", ipv4(packet.TCP, tcp(40000, 443))},
		{"ipv6-udp", ipv6(17, udp(40000, 53))},
		{"ipv6-ext-tcp", ipv6(0, ext(60, 8), ext(43, 16), ext(6, 24), tcp(1, 443))},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			var p packet.Parsed
			b.ReportAllocs()
			b.SetBytes(int64(len(c.pkt)))
			for b.Loop() {
				p.Decode(c.pkt)
			}
		})
	}
}
