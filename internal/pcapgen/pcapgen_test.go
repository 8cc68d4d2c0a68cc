package pcapgen_test

import (
	"bytes"
	"io"
	"math"
	"net/netip"
	"strings"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/nfmasq/nfmasq/internal/pcapgen"
	"github.com/nfmasq/nfmasq/queue/packet"
)

func write(t *testing.T, cfg pcapgen.Config) ([]byte, pcapgen.Stats) {
	t.Helper()
	g, err := pcapgen.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	st, err := g.WritePcap(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if st.Bytes != uint64(buf.Len()) {
		t.Errorf("stats say %d bytes, wrote %d", st.Bytes, buf.Len())
	}
	return buf.Bytes(), st
}

var mixed = pcapgen.Config{
	Flows: 3000, PacketsPerFlow: 2, InternetFraction: 0.5, LinkLocalFraction: 0.1,
	IPv6Fraction: 0.25, UDPFraction: 0.4, PayloadSize: 20, Seed: 42,
}

func TestDeterministic(t *testing.T) {
	a, _ := write(t, mixed)
	b, _ := write(t, mixed)
	if !bytes.Equal(a, b) {
		t.Fatal("the same config wrote different captures")
	}
	other := mixed
	other.Seed++
	c, _ := write(t, other)
	if bytes.Equal(a, c) {
		t.Fatal("different seeds wrote the same capture")
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  pcapgen.Config
		want string
	}{
		{"no flows", pcapgen.Config{}, "flows must be at least 1"},
		{"negative packets", pcapgen.Config{Flows: 1, PacketsPerFlow: -1}, "packets per flow"},
		{"fraction above 1", pcapgen.Config{Flows: 1, InternetFraction: 1.5}, "internet fraction must be between 0 and 1"},
		{"negative fraction", pcapgen.Config{Flows: 1, IPv6Fraction: -0.1}, "ipv6 fraction"},
		{"NaN fraction", pcapgen.Config{Flows: 1, UDPFraction: math.NaN()}, "udp fraction"},
		{"fractions above 1", pcapgen.Config{Flows: 1, InternetFraction: 0.7, LinkLocalFraction: 0.4}, "add up to more than 1"},
		{"payload too big", pcapgen.Config{Flows: 1, PayloadSize: 70000}, "payload size"},
		{"link type", pcapgen.Config{Flows: 1, LinkType: layers.LinkTypeLinuxSLL}, "link type 113"},
		{"swapped pod CIDRs", pcapgen.Config{Flows: 1, PodCIDR4: netip.MustParsePrefix("fd00::/64")}, "must be IPv4 and IPv6"},
		{"pod CIDR too small", pcapgen.Config{Flows: 1, PodCIDR4: netip.MustParsePrefix("10.0.0.0/29")}, "fewer than 64 pods"},
		{"no IPv6 internal range", pcapgen.Config{Flows: 1, IPv6Fraction: 0.5, NonMasquerade: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}, "no IPv6 non-masquerade prefix"},
		{"whole internet internal", pcapgen.Config{Flows: 1, NonMasquerade: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("fd00::/8")}}, "cover the whole internet"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := pcapgen.New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestFlows checks every flow against its Config: unique sources, pods in
// the pod CIDR, destinations in their class's ranges, and the mix near
// the fractions asked for.
func TestFlows(t *testing.T) {
	g, err := pcapgen.New(mixed)
	if err != nil {
		t.Fatal(err)
	}
	cfg := g.Config()
	type source struct {
		a    netip.Addr
		port uint16
	}
	seen := map[source]bool{}
	var classes [3]int
	var v6, udp int
	linkLocal := []netip.Prefix{netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("fe80::/10")}
	special := []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"), netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("224.0.0.0/3"), netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("2001:db8::/32"),
	}
	in := func(ps []netip.Prefix, a netip.Addr) bool {
		for _, p := range ps {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
	for i := range cfg.Flows {
		f := g.Flow(i)
		if f != g.Flow(i) {
			t.Fatalf("flow %d differs between calls", i)
		}
		src := source{f.Src.Addr(), f.Src.Port()}
		if seen[src] {
			t.Fatalf("flow %d reuses source %v", i, f.Src)
		}
		seen[src] = true
		is6 := f.Src.Addr().Is6()
		if f.Dst.Addr().Is6() != is6 {
			t.Fatalf("flow %d mixes families: %v > %v", i, f.Src, f.Dst)
		}
		pods := cfg.PodCIDR4
		if is6 {
			pods = cfg.PodCIDR6
			v6++
		}
		if !pods.Contains(f.Src.Addr()) || f.Src.Addr() == pods.Addr() {
			t.Errorf("flow %d: source %v not a pod of %v", i, f.Src, pods)
		}
		if f.Proto == packet.UDP {
			udp++
		} else if f.Proto != packet.TCP {
			t.Errorf("flow %d: protocol %v", i, f.Proto)
		}
		dst := f.Dst.Addr()
		var ok bool
		switch f.Class {
		case pcapgen.Internet:
			ok = !in(cfg.NonMasquerade, dst) && !in(linkLocal, dst) && !in(special, dst) && dst.IsGlobalUnicast()
		case pcapgen.NonMasquerade:
			ok = in(cfg.NonMasquerade, dst)
		case pcapgen.LinkLocal:
			ok = in(linkLocal, dst)
		}
		if !ok {
			t.Errorf("flow %d: %v destination %v", i, f.Class, dst)
		}
		classes[f.Class]++
	}
	near := func(what string, got int, frac float64) {
		want := frac * float64(cfg.Flows)
		// Six standard deviations of a binomial: a seed that misses is
		// a broken draw, not bad luck.
		if tol := 6 * math.Sqrt(want*(1-frac)+1); math.Abs(float64(got)-want) > tol {
			t.Errorf("%s: %d flows of %d, want about %.0f", what, got, cfg.Flows, want)
		}
	}
	near("internet", classes[pcapgen.Internet], cfg.InternetFraction)
	near("link-local", classes[pcapgen.LinkLocal], cfg.LinkLocalFraction)
	near("non-masquerade", classes[pcapgen.NonMasquerade], 1-cfg.InternetFraction-cfg.LinkLocalFraction)
	near("ipv6", v6, cfg.IPv6Fraction)
	near("udp", udp, cfg.UDPFraction)
}

// TestPackets decodes every packet with gopacket: valid checksums, the
// flow's addresses and ports, TCP flags and sequence numbers in order.
func TestPackets(t *testing.T) {
	for _, lt := range []layers.LinkType{layers.LinkTypeRaw, layers.LinkTypeEthernet} {
		cfg := mixed
		cfg.Flows, cfg.PacketsPerFlow, cfg.LinkType = 200, 3, lt
		data, st := write(t, cfg)
		g, _ := pcapgen.New(cfg)
		r, err := pcapgo.NewReader(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if r.LinkType() != lt {
			t.Errorf("link type %v, want %v", r.LinkType(), lt)
		}
		first := layers.LayerTypeEthernet
		var n int
		for ; ; n++ {
			b, _, err := r.ReadPacketData()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			f, round := g.Flow(n%cfg.Flows), n/cfg.Flows
			if lt == layers.LinkTypeRaw {
				first = layers.LayerTypeIPv4
				if f.Src.Addr().Is6() {
					first = layers.LayerTypeIPv6
				}
			}
			p := gopacket.NewPacket(b, first, gopacket.Default)
			// Payloads are zeros, which gopacket may fail to decode as
			// the application the port suggests (DNS, NTP); only the IP
			// and transport layers matter.
			if el := p.ErrorLayer(); el != nil && p.TransportLayer() == nil {
				t.Fatalf("packet %d: %v", n, el.Error())
			}
			type pseudoHeader interface {
				SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
			}
			if l4, ok := p.TransportLayer().(pseudoHeader); ok {
				if err := l4.SetNetworkLayerForChecksum(p.NetworkLayer()); err != nil {
					t.Fatal(err)
				}
			}
			if err, bad := p.VerifyChecksums(); err != nil || len(bad) > 0 {
				t.Fatalf("packet %d: checksums %v %v", n, err, bad)
			}
			var src, dst netip.Addr
			switch ip := p.NetworkLayer().(type) {
			case *layers.IPv4:
				src, dst = netip.AddrFrom4([4]byte(ip.SrcIP.To4())), netip.AddrFrom4([4]byte(ip.DstIP.To4()))
			case *layers.IPv6:
				src, dst = netip.AddrFrom16([16]byte(ip.SrcIP)), netip.AddrFrom16([16]byte(ip.DstIP))
			}
			var sport, dport uint16
			switch l4 := p.TransportLayer().(type) {
			case *layers.TCP:
				sport, dport = uint16(l4.SrcPort), uint16(l4.DstPort)
				if l4.SYN != (round == 0) || l4.ACK == (round == 0) {
					t.Errorf("packet %d (round %d): SYN %v ACK %v", n, round, l4.SYN, l4.ACK)
				}
				wantSeq := f.ISN
				if round > 0 {
					wantSeq += 1 + uint32(round-1)*uint32(cfg.PayloadSize)
				}
				if l4.Seq != wantSeq {
					t.Errorf("packet %d: seq %d, want %d", n, l4.Seq, wantSeq)
				}
			case *layers.UDP:
				sport, dport = uint16(l4.SrcPort), uint16(l4.DstPort)
				if len(l4.Payload) != cfg.PayloadSize {
					t.Errorf("packet %d: %d payload bytes, want %d", n, len(l4.Payload), cfg.PayloadSize)
				}
			default:
				t.Fatalf("packet %d: no TCP or UDP", n)
			}
			if netip.AddrPortFrom(src, sport) != f.Src || netip.AddrPortFrom(dst, dport) != f.Dst {
				t.Errorf("packet %d: %v:%d > %v:%d, want flow %v > %v", n, src, sport, dst, dport, f.Src, f.Dst)
			}
		}
		if uint64(n) != st.Packets || n != cfg.Flows*cfg.PacketsPerFlow {
			t.Errorf("%d packets read, stats say %d, config %d", n, st.Packets, cfg.Flows*cfg.PacketsPerFlow)
		}
	}
}

// TestAppendPacketDecodes checks AppendPacket against the decoder the
// agent runs, and that it appends rather than overwrites.
func TestAppendPacketDecodes(t *testing.T) {
	g, err := pcapgen.New(mixed)
	if err != nil {
		t.Fatal(err)
	}
	prefix := []byte("prefix")
	for i := range 100 {
		f := g.Flow(i)
		b := pcapgen.AppendPacket(bytes.Clone(prefix), f, 1, 10)
		if !bytes.HasPrefix(b, prefix) {
			t.Fatal("AppendPacket overwrote what was in dst")
		}
		var p packet.Parsed
		p.Decode(b[len(prefix):])
		want := packet.FlowKey{Proto: f.Proto, Src: f.Src.Addr(), Dst: f.Dst.Addr(), SrcPort: f.Src.Port(), DstPort: f.Dst.Port()}
		if p.Status != packet.OK || p.FlowKey() != want {
			t.Errorf("flow %d: decoded %v, want %v", i, p.String(), want)
		}
	}
}

func TestStats(t *testing.T) {
	_, st := write(t, mixed)
	if st.Flows != uint64(mixed.Flows) || st.Packets != uint64(mixed.Flows*mixed.PacketsPerFlow) {
		t.Errorf("stats %+v for %d flows of %d packets", st, mixed.Flows, mixed.PacketsPerFlow)
	}
	var classes uint64
	for _, n := range st.Classes {
		classes += n
	}
	if classes != st.Flows || st.IPv4+st.IPv6 != st.Flows || st.TCP+st.UDP != st.Flows {
		t.Errorf("stats %+v do not add up to %d flows", st, st.Flows)
	}
}
