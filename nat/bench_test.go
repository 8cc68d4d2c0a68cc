package nat

import (
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// randomPrefixes returns n distinct IPv4 prefixes of length /16 to /32
// from a fixed seed, so they do not collapse into a few ranges.
func randomPrefixes(n int) []string {
	r := rand.New(rand.NewPCG(2, 0))
	seen := make(map[netip.Prefix]bool, n)
	out := make([]string, 0, n)
	for len(out) < n {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())}), 16+r.IntN(17)).Masked()
		if !seen[p] {
			seen[p] = true
			out = append(out, p.String())
		}
	}
	return out
}

// randomAddrs returns n IPv4 destinations from a fixed seed.
func randomAddrs(n int) []netip.Addr {
	r := rand.New(rand.NewPCG(1, 0))
	out := make([]netip.Addr, n)
	for i := range out {
		var a [4]byte
		v := r.Uint32()
		a[0], a[1], a[2], a[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
		out[i] = netip.AddrFrom4(a)
	}
	return out
}

func BenchmarkDecide(b *testing.B) {
	addrs := randomAddrs(1 << 20)
	for _, bc := range []struct {
		name string
		cfg  Config
	}{
		{"defaults", DefaultConfig(true)},
		{"1000", Config{NonMasqueradeCIDRs: randomPrefixes(1000), ResyncInterval: DefaultResyncInterval, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true}},
		{"100000", Config{NonMasqueradeCIDRs: randomPrefixes(100_000), ResyncInterval: DefaultResyncInterval, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true}},
	} {
		p := mustCompile(b, Input{Config: bc.cfg})
		b.Run(bc.name, func(b *testing.B) {
			var passthrough int
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if p.Decide(addrs[i&(len(addrs)-1)]).Action == Passthrough {
					passthrough++
				}
				i++
			}
			b.ReportMetric(float64(passthrough)/float64(i), "passthrough/op")
		})
	}
}

// BenchmarkLoad100k is a reload of a 100,000-CIDR config: parse the file,
// then compile the Policy.
func BenchmarkLoad100k(b *testing.B) {
	file, err := json.Marshal(Config{NonMasqueradeCIDRs: randomPrefixes(100_000), ResyncInterval: DefaultResyncInterval, CIDRLimit: DefaultCIDRLimit})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("parse", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := ParseConfig(file, ParseOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	c, _, err := ParseConfig(file, ParseOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("compile", func(b *testing.B) {
		for b.Loop() {
			mustCompile(b, Input{Config: c})
		}
	})
}
