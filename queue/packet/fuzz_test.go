package packet_test

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/queue/packet"
)

// maxSeedLen caps seed packets taken from captures: BIG TCP records are
// 64 KiB and would bloat the corpus without exercising anything more.
const maxSeedLen = 2048

// handSeeds are the hand-built packets of the table tests that cover
// shapes the captures lack.
func handSeeds() [][]byte {
	return [][]byte{
		ipv4(packet.UDP, udp(40000, 53)),
		ipv4(packet.TCP, tcp(40000, 443)),
		ipv4(packet.SCTP, ports(12, 5000, 5001)),
		ipv4(packet.ICMPv4, icmp(8, 0)),
		with(ipv4(packet.UDP, udp(1, 2)), put16(6, 0x2000)),
		with(ipv4(packet.UDP, udp(1, 2)), put16(6, 0x0003)),
		with(ipv4(packet.TCP, tcp(1, 2)), put16(2, 0)),
		ipv6(17, udp(40000, 53)),
		ipv6(0, ext(60, 8), ext(43, 16), ext(6, 24), tcp(1, 443)),
		ipv6(51, []byte{6, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, tcp(5, 6)),
		ipv6(44, frag6(17, 0, true), udp(7, 8)),
		ipv6(44, frag6(17, 185, false), udp(7, 8)),
		ipv6(58, icmp(128, 0)),
		with(ipv6(6, tcp(1, 2)), put16(4, 0)),
	}
}

// seeds returns the hand-built packets and every IP packet of the
// captures, deduplicated.
func seeds(t testing.TB) [][]byte {
	all := handSeeds()
	for _, path := range capturePaths(t) {
		recs, _ := readCapture(t, path)
		for _, r := range recs {
			all = append(all, r.b[:min(len(r.b), maxSeedLen)])
		}
	}
	seen := map[[32]byte]bool{}
	out := all[:0]
	for _, b := range all {
		h := sha256.Sum256(b)
		if !seen[h] {
			seen[h] = true
			out = append(out, b)
		}
	}
	return out
}

// TestWriteFuzzCorpus regenerates testdata/fuzz/FuzzDecode with -update.
// The committed files are what `go test` runs as seed cases, so the fuzz
// target's checks apply to every capture even without -fuzz.
func TestWriteFuzzCorpus(t *testing.T) {
	if !*update {
		t.Skip("run with -update to rewrite the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range seeds(t) {
		name := fmt.Sprintf("seed-%x", sha256.Sum256(b))[:21]
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// agreements counts the packets whose ports were compared with gopacket,
// so a test can tell that the comparison is not vacuous.
var agreements atomic.Int64

func TestGopacketAgreementNotVacuous(t *testing.T) {
	before := agreements.Load()
	for _, b := range seeds(t) {
		var p packet.Parsed
		p.Decode(b)
		agreeWithGopacket(t, b, &p)
	}
	n := agreements.Load() - before
	t.Logf("%d seed packets compared with gopacket", n)
	if n < 50 {
		t.Errorf("only %d seed packets had their ports compared with gopacket", n)
	}
}

func FuzzDecode(f *testing.F) {
	for _, b := range handSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p packet.Parsed
		p.Decode(b)
		checkInvariants(t, b, &p)
		agreeWithGopacket(t, b, &p)

		if len(b) > 0 {
			var q packet.Parsed
			q.DecodeVersion(b, b[0]>>4)
			if q != p {
				t.Fatalf("DecodeVersion with the packet's own version differs:\n%+v\n%+v", q, p)
			}
		}

		// A prefix of a well-formed packet is a cut capture: it must
		// decode as such, to the same addresses. (Not when the length
		// field is 0, because then the captured length is the length.)
		if p.Status != packet.OK || lengthFieldZero(b) {
			return
		}
		var q packet.Parsed
		for i := range len(b) {
			q.Decode(b[:i])
			checkInvariants(t, b[:i], &q)
			switch q.Status {
			case packet.OK, packet.Snapped, packet.Truncated:
			case packet.NotIP:
				if i != 0 {
					t.Fatalf("prefix %d of an ok packet: %v", i, q.String())
				}
			default:
				t.Fatalf("prefix %d of an ok packet (%v) decoded as %v", i, p.String(), q.String())
			}
			if q.Status.Valid() && (q.Src != p.Src || q.Dst != p.Dst || q.Length != p.Length) {
				t.Fatalf("prefix %d changed the addresses: %v vs %v", i, q.String(), p.String())
			}
		}
	})
}

func lengthFieldZero(b []byte) bool {
	switch b[0] >> 4 {
	case 4:
		return binary.BigEndian.Uint16(b[2:]) == 0
	case 6:
		return binary.BigEndian.Uint16(b[4:]) == 0
	}
	return false
}

func checkInvariants(t *testing.T, b []byte, p *packet.Parsed) {
	t.Helper()
	if p.Status >= packet.NumStatus {
		t.Fatalf("status out of range: %d", p.Status)
	}
	if p.Status.Valid() {
		if !p.Dst.IsValid() || !p.Src.IsValid() {
			t.Fatalf("valid status without addresses: %v", p.String())
		}
		if p.Dst.Is4() != (p.IPVersion == 4) {
			t.Fatalf("address family disagrees with version: %v", p.String())
		}
	}
	if p.HasPorts() && p.TransportOffset+4 > len(b) {
		t.Fatalf("ports read beyond the input: %v", p.String())
	}
	if p.Length < 0 || p.TransportOffset < 0 || int(p.ExtHeaders) > packet.MaxExtHeaders {
		t.Fatalf("impossible fields: %+v", p)
	}
}

// agreeWithGopacket checks the fields a NAT decision and a flow key rest
// on against gopacket's independent decoder, on packets both consider
// whole.
func agreeWithGopacket(t *testing.T, b []byte, p *packet.Parsed) {
	t.Helper()
	if p.Status != packet.OK || p.Frag != packet.NotFragment {
		return
	}
	first := layers.LayerTypeIPv4
	if p.IPVersion == 6 {
		first = layers.LayerTypeIPv6
	}
	// The outer header on its own: in a tunnelled packet the parser
	// below reuses the same layer value for the inner header.
	var outer gopacket.DecodingLayer = &layers.IPv4{}
	if p.IPVersion == 6 {
		outer = &layers.IPv6{}
	}
	if outer.DecodeFromBytes(b, gopacket.NilDecodeFeedback) == nil {
		var src, dst netip.Addr
		switch l := outer.(type) {
		case *layers.IPv4:
			src, _ = netip.AddrFromSlice(l.SrcIP.To4())
			dst, _ = netip.AddrFromSlice(l.DstIP.To4())
		case *layers.IPv6:
			src, _ = netip.AddrFromSlice(l.SrcIP)
			dst, _ = netip.AddrFromSlice(l.DstIP)
		}
		if src != p.Src || dst != p.Dst {
			t.Fatalf("addresses: gopacket %v > %v, ours %v", src, dst, p.String())
		}
	}
	if !p.HasPorts() {
		return
	}
	var (
		ip4     layers.IPv4
		ip6     layers.IPv6
		ah      layers.IPSecAH
		tcpL    layers.TCP
		udpL    layers.UDP
		sctp    layers.SCTP
		payload gopacket.Payload
	)
	// A DecodingLayerParser lists only the layers it decoded without
	// error, and stops quietly at a layer it has no decoder for.
	parser := gopacket.NewDecodingLayerParser(first, &ip4, &ip6, &ah, &tcpL, &udpL, &sctp, &payload)
	parser.IgnoreUnsupported = true
	var decoded []gopacket.LayerType
	_ = parser.DecodeLayers(b, &decoded)

	var (
		sp, dp     uint16
		proto      packet.IPProto
		transports int
	)
	for _, lt := range decoded {
		switch lt {
		case layers.LayerTypeTCP:
			sp, dp, proto = uint16(tcpL.SrcPort), uint16(tcpL.DstPort), packet.TCP
			transports++
		case layers.LayerTypeUDP:
			sp, dp, proto = uint16(udpL.SrcPort), uint16(udpL.DstPort), packet.UDP
			transports++
		case layers.LayerTypeSCTP:
			sp, dp, proto = uint16(sctp.SrcPort), uint16(sctp.DstPort), packet.SCTP
			transports++
		}
	}
	if transports != 1 {
		return
	}
	agreements.Add(1)
	if proto != p.Proto || sp != p.SrcPort || dp != p.DstPort {
		t.Fatalf("transport: gopacket %v %d > %d, ours %v", proto, sp, dp, p.String())
	}
}
