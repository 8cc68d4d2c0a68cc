package replay_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/internal/replay"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// Frames are built from these pieces: an IPv4 and an IPv6 UDP packet, and
// link headers around them.
var (
	ip4Packet = pkt4(udpHeader(40000, 53))
	ip6Packet = pkt6(udpHeader(40000, 53))
)

func pkt4(l4 []byte) []byte {
	b := make([]byte, 20, 20+len(l4))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:4], uint16(20+len(l4)))
	b[8], b[9] = 64, byte(packet.UDP)
	copy(b[12:16], []byte{10, 244, 0, 2})
	copy(b[16:20], []byte{8, 8, 8, 8})
	return append(b, l4...)
}

func pkt6(l4 []byte) []byte {
	b := make([]byte, 40, 40+len(l4))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:6], uint16(len(l4)))
	b[6], b[7] = byte(packet.UDP), 64
	b[8], b[9], b[23] = 0xfd, 0x00, 2
	b[24], b[25], b[39] = 0x20, 0x01, 1
	return append(b, l4...)
}

func udpHeader(sport, dport uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:2], sport)
	binary.BigEndian.PutUint16(b[2:4], dport)
	binary.BigEndian.PutUint16(b[4:6], 8)
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

var macs = make([]byte, 12)

func ether(et uint16, payload []byte) []byte { return cat(macs, be16(et), payload) }
func vlan(et uint16, payload []byte) []byte  { return cat(be16(7), be16(et), payload) }

// sll is a Linux cooked v1 header: packet type, ARPHRD, address length,
// 8 address bytes, protocol.
func sll(proto uint16, payload []byte) []byte {
	return cat(be16(4), be16(1), be16(6), make([]byte, 8), be16(proto), payload)
}

// sll2 is a Linux cooked v2 header: protocol, reserved, ifindex, ARPHRD,
// packet type, address length, 8 address bytes.
func sll2(proto uint16, payload []byte) []byte {
	return cat(be16(proto), be16(0), be32(3), be16(1), []byte{4, 6}, make([]byte, 8), payload)
}

func TestIPPacket(t *testing.T) {
	tests := []struct {
		name        string
		lt          layers.LinkType
		frame       []byte
		wantIP      []byte
		wantVersion uint8
		wantSkip    string
	}{
		{"ethernet ipv4", replay.LinkEthernet, ether(0x0800, ip4Packet), ip4Packet, 4, ""},
		{"ethernet ipv6", replay.LinkEthernet, ether(0x86dd, ip6Packet), ip6Packet, 6, ""},
		{"ethernet 802.1q", replay.LinkEthernet, ether(0x8100, vlan(0x0800, ip4Packet)), ip4Packet, 4, ""},
		{"ethernet qinq", replay.LinkEthernet, ether(0x88a8, vlan(0x8100, vlan(0x86dd, ip6Packet))), ip6Packet, 6, ""},
		{"ethernet old qinq", replay.LinkEthernet, ether(0x9100, vlan(0x0800, ip4Packet)), ip4Packet, 4, ""},
		{"ethernet arp", replay.LinkEthernet, ether(0x0806, make([]byte, 28)), nil, 0, "ethertype:0x0806"},
		{"ethernet vlan arp", replay.LinkEthernet, ether(0x8100, vlan(0x0806, nil)), nil, 0, "ethertype:0x0806"},
		{"ethernet 802.3 llc", replay.LinkEthernet, ether(46, make([]byte, 46)), nil, 0, "llc"},
		{"ethernet short", replay.LinkEthernet, make([]byte, 13), nil, 0, "short_link_header"},
		{"ethernet empty", replay.LinkEthernet, nil, nil, 0, "short_link_header"},
		{"ethernet cut vlan tag", replay.LinkEthernet, ether(0x8100, []byte{0, 7, 8}), nil, 0, "short_link_header"},
		{"ethernet header only", replay.LinkEthernet, ether(0x0800, nil), []byte{}, 4, ""},
		{"raw ipv4", replay.LinkRaw, ip4Packet, ip4Packet, 0, ""},
		{"raw ipv6", replay.LinkRaw, ip6Packet, ip6Packet, 0, ""},
		{"raw empty", replay.LinkRaw, nil, nil, 0, ""},
		{"linktype ipv4", replay.LinkIPv4, ip4Packet, ip4Packet, 4, ""},
		{"linktype ipv6", replay.LinkIPv6, ip6Packet, ip6Packet, 6, ""},
		{"sll ipv4", replay.LinkSLL, sll(0x0800, ip4Packet), ip4Packet, 4, ""},
		{"sll ipv6", replay.LinkSLL, sll(0x86dd, ip6Packet), ip6Packet, 6, ""},
		{"sll vlan", replay.LinkSLL, sll(0x8100, vlan(0x0800, ip4Packet)), ip4Packet, 4, ""},
		{"sll llc protocol", replay.LinkSLL, sll(0x0004, nil), nil, 0, "ethertype:0x0004"},
		{"sll short", replay.LinkSLL, make([]byte, 15), nil, 0, "short_link_header"},
		{"sll2 ipv4", replay.LinkSLL2, sll2(0x0800, ip4Packet), ip4Packet, 4, ""},
		{"sll2 ipv6", replay.LinkSLL2, sll2(0x86dd, ip6Packet), ip6Packet, 6, ""},
		{"sll2 arp", replay.LinkSLL2, sll2(0x0806, nil), nil, 0, "ethertype:0x0806"},
		{"sll2 short", replay.LinkSLL2, make([]byte, 19), nil, 0, "short_link_header"},
		{"null little-endian ipv4", replay.LinkNull, cat(le32(2), ip4Packet), ip4Packet, 4, ""},
		{"null big-endian ipv4", replay.LinkNull, cat(be32(2), ip4Packet), ip4Packet, 4, ""},
		{"null linux ipv6", replay.LinkNull, cat(le32(10), ip6Packet), ip6Packet, 6, ""},
		{"null bsd ipv6", replay.LinkNull, cat(le32(24), ip6Packet), ip6Packet, 6, ""},
		{"null freebsd ipv6", replay.LinkNull, cat(le32(28), ip6Packet), ip6Packet, 6, ""},
		{"null darwin ipv6", replay.LinkNull, cat(be32(30), ip6Packet), ip6Packet, 6, ""},
		{"null other family", replay.LinkNull, cat(le32(7), ip4Packet), nil, 0, "family:7"},
		{"null short", replay.LinkNull, []byte{2, 0, 0}, nil, 0, "short_link_header"},
		{"loop ipv4", replay.LinkLoop, cat(be32(2), ip4Packet), ip4Packet, 4, ""},
		{"loop little-endian is not swapped", replay.LinkLoop, cat(le32(2), ip4Packet), nil, 0, "family:33554432"},
		{"unknown link type", layers.LinkType(147), ip4Packet, nil, 0, "linktype:147"},
		{"802.11", layers.LinkTypeIEEE802_11, ip4Packet, nil, 0, "linktype:105"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ip, version, skip := replay.IPPacket(tc.lt, tc.frame)
			gotSkip := ""
			if skip.Kind != replay.NotSkipped {
				gotSkip = skip.String()
			}
			if gotSkip != tc.wantSkip {
				t.Fatalf("skip = %q, want %q", gotSkip, tc.wantSkip)
			}
			if !bytes.Equal(ip, tc.wantIP) || version != tc.wantVersion {
				t.Errorf("got version %d, ip % x; want version %d, ip % x", version, ip, tc.wantVersion, tc.wantIP)
			}
		})
	}
}

func TestIPPacketDoesNotAllocate(t *testing.T) {
	frames := []struct {
		lt    layers.LinkType
		frame []byte
	}{
		{replay.LinkEthernet, ether(0x8100, vlan(0x0800, ip4Packet))},
		{replay.LinkEthernet, ether(0x0806, nil)},
		{replay.LinkSLL2, sll2(0x86dd, ip6Packet)},
		{replay.LinkNull, cat(le32(7), ip4Packet)},
		{layers.LinkType(147), ip4Packet},
	}
	allocs := testing.AllocsPerRun(100, func() {
		for _, f := range frames {
			replay.IPPacket(f.lt, f.frame)
		}
	})
	if allocs != 0 {
		t.Errorf("IPPacket allocates %v times per run", allocs)
	}
}

func TestSkipString(t *testing.T) {
	tests := []struct {
		skip replay.Skip
		want string
	}{
		{replay.Skip{}, "none"},
		{replay.Skip{Kind: replay.SkipLinkType, Code: 276}, "linktype:276"},
		{replay.Skip{Kind: replay.SkipEtherType, Code: 0x806}, "ethertype:0x0806"},
		{replay.Skip{Kind: replay.SkipEtherType, Code: 0x88cc}, "ethertype:0x88cc"},
		{replay.Skip{Kind: replay.SkipLLC}, "llc"},
		{replay.Skip{Kind: replay.SkipFamily, Code: 7}, "family:7"},
		{replay.Skip{Kind: replay.SkipShortLink}, "short_link_header"},
		{replay.Skip{Kind: replay.SkipDecode, Code: uint32(packet.BadVersion)}, "bad_version"},
		{replay.Skip{Kind: replay.SkipDecode, Code: uint32(packet.Truncated)}, "truncated"},
		{replay.Skip{Kind: replay.SkipDecode, Code: 300}, "status_300"},
		{replay.Skip{Kind: replay.SkipNotFromPod}, "not_from_pod"},
		{replay.Skip{Kind: replay.SkipTruncatedRecord}, "truncated_record"},
		{replay.Skip{Kind: replay.SkipBadRecord}, "bad_record"},
		{replay.Skip{Kind: 200}, "skip_200"},
	}
	for _, tc := range tests {
		if got := tc.skip.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.skip, got, tc.want)
		}
	}
}
