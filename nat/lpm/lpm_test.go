package lpm

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// naiveLookup is the reference Lookup: a scan for the longest containing
// prefix, lowest index first, ignoring any IPv6 zone.
func naiveLookup(prefixes []netip.Prefix, addr netip.Addr) int {
	addr = addr.WithZone("")
	best, bestBits := NoMatch, -1
	for i, p := range prefixes {
		if p.Bits() > bestBits && p.Masked().Contains(addr) {
			best, bestBits = i, p.Bits()
		}
	}
	return best
}

func mustCompile(t testing.TB, prefixes []netip.Prefix) *Table {
	t.Helper()
	tbl, err := Compile(prefixes)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return tbl
}

func parsePrefixes(t testing.TB, ss ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func TestLookup(t *testing.T) {
	gke := []string{
		"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
		"192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
		"198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "169.254.0.0/16",
	}
	tests := []struct {
		name     string
		prefixes []string
		want     map[string]int // address -> index
	}{
		{
			name:     "empty",
			prefixes: nil,
			want:     map[string]int{"0.0.0.0": NoMatch, "255.255.255.255": NoMatch, "::": NoMatch, "2001:db8::1": NoMatch},
		},
		{
			name:     "gke defaults first and last addresses",
			prefixes: gke,
			want: map[string]int{
				"9.255.255.255": NoMatch, "10.0.0.0": 0, "10.255.255.255": 0, "11.0.0.0": NoMatch,
				"172.15.255.255": NoMatch, "172.16.0.0": 1, "172.31.255.255": 1, "172.32.0.0": NoMatch,
				"192.167.255.255": NoMatch, "192.168.0.0": 2, "192.168.255.255": 2, "192.169.0.0": NoMatch,
				"100.63.255.255": NoMatch, "100.64.0.0": 3, "100.127.255.255": 3, "100.128.0.0": NoMatch,
				"191.255.255.255": NoMatch, "192.0.0.0": 4, "192.0.0.255": 4, "192.0.1.0": NoMatch,
				"192.0.2.0": 5, "192.0.2.255": 5, "192.0.3.0": NoMatch,
				"192.88.98.255": NoMatch, "192.88.99.0": 6, "192.88.99.255": 6, "192.88.100.0": NoMatch,
				"198.17.255.255": NoMatch, "198.18.0.0": 7, "198.19.255.255": 7, "198.20.0.0": NoMatch,
				"198.51.100.0": 8, "198.51.100.255": 8, "203.0.113.0": 9, "203.0.113.255": 9,
				"239.255.255.255": NoMatch, "240.0.0.0": 10, "255.255.255.255": 10,
				"169.253.255.255": NoMatch, "169.254.0.0": 11, "169.254.255.255": 11, "169.255.0.0": NoMatch,
				"0.0.0.0": NoMatch, "8.8.8.8": NoMatch,
				"::ffff:10.0.0.1": NoMatch, "::a00:1": NoMatch,
			},
		},
		{
			name:     "nested most specific wins regardless of order",
			prefixes: []string{"10.1.2.0/24", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32"},
			want: map[string]int{
				"10.0.0.0": 1, "10.1.0.0": 2, "10.1.1.255": 2, "10.1.2.0": 0, "10.1.2.2": 0,
				"10.1.2.3": 3, "10.1.2.4": 0, "10.1.2.255": 0, "10.1.3.0": 2, "10.1.255.255": 2,
				"10.2.0.0": 1, "10.255.255.255": 1, "11.0.0.0": NoMatch,
			},
		},
		{
			name:     "default routes both families",
			prefixes: []string{"0.0.0.0/0", "::/0", "10.0.0.0/8", "2001:db8::/32"},
			want: map[string]int{
				"0.0.0.0": 0, "255.255.255.255": 0, "10.9.9.9": 2,
				"::": 1, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff": 1, "2001:db8::": 3,
				"2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": 3, "2001:db9::": 1, "::ffff:10.0.0.1": 1,
			},
		},
		{
			name:     "host routes at the ends of the space",
			prefixes: []string{"0.0.0.0/32", "255.255.255.255/32", "::/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"},
			want: map[string]int{
				"0.0.0.0": 0, "0.0.0.1": NoMatch, "255.255.255.254": NoMatch, "255.255.255.255": 1,
				"::": 2, "::1": NoMatch, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe": NoMatch,
				"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff": 3,
			},
		},
		{
			name:     "duplicates report the lowest index",
			prefixes: []string{"10.0.0.0/8", "192.168.1.0/24", "10.0.0.0/8", "10.0.0.1/8", "192.168.1.0/24"},
			want:     map[string]int{"10.0.0.0": 0, "10.200.0.1": 0, "192.168.1.7": 1, "192.168.2.0": NoMatch},
		},
		{
			name:     "unmasked prefixes are canonicalised",
			prefixes: []string{"10.1.2.3/16", "2001:db8::1/64"},
			want:     map[string]int{"10.1.0.0": 0, "10.1.255.255": 0, "10.2.0.0": NoMatch, "2001:db8::ffff": 1, "2001:db8:0:1::": NoMatch},
		},
		{
			name:     "ipv4-mapped prefixes are ipv6",
			prefixes: []string{"::ffff:10.0.0.0/104", "10.0.0.0/8"},
			want:     map[string]int{"::ffff:10.1.1.1": 0, "10.1.1.1": 1, "::ffff:11.0.0.0": NoMatch},
		},
		{
			name:     "ipv6 nested and adjacent",
			prefixes: []string{"2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64", "2001:db8:1:2::1/128", "fe80::/10", "2001:db8:1:3::/64"},
			want: map[string]int{
				"2001:db7:ffff:ffff:ffff:ffff:ffff:ffff": NoMatch, "2001:db8::": 0, "2001:db8:0:ffff:ffff:ffff:ffff:ffff": 0,
				"2001:db8:1::": 1, "2001:db8:1:1:ffff:ffff:ffff:ffff": 1, "2001:db8:1:2::": 2, "2001:db8:1:2::1": 3,
				"2001:db8:1:2::2": 2, "2001:db8:1:2:ffff:ffff:ffff:ffff": 2, "2001:db8:1:3::": 5,
				"2001:db8:1:3:ffff:ffff:ffff:ffff": 5, "2001:db8:1:4::": 1, "2001:db8:2::": 0, "2001:db9::": NoMatch,
				"fe80::1": 4, "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff": 4, "fec0::": NoMatch, "fe80::1%eth0": 4,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefixes := parsePrefixes(t, tt.prefixes...)
			tbl := mustCompile(t, prefixes)
			if tbl.Len() != len(prefixes) {
				t.Errorf("Len() = %d, want %d", tbl.Len(), len(prefixes))
			}
			for s, want := range tt.want {
				addr := netip.MustParseAddr(s)
				if got := tbl.Lookup(addr); got != want {
					t.Errorf("Lookup(%s) = %d, want %d", s, got, want)
				}
				if ref := naiveLookup(prefixes, addr); ref != want {
					t.Errorf("test table wrong: naive Lookup(%s) = %d, want %d", s, ref, want)
				}
			}
			if got := tbl.Lookup(netip.Addr{}); got != NoMatch {
				t.Errorf("Lookup(zero Addr) = %d, want NoMatch", got)
			}
		})
	}
}

// TestMemoryBudget pins the size of the layouts the agent relies on: the
// default set stays within a few cache lines of root plus blocks, and a
// large random set costs well under the 2x-bart budget (bart.Lite needs
// about 6.7 MB for the 100,000-prefix benchmark set).
func TestMemoryBudget(t *testing.T) {
	tests := []struct {
		name     string
		prefixes []netip.Prefix
		max      int
	}{
		{"gke defaults", gkeDefaults(), 1536},
		{"100k random v4", randomPrefixes4(rand.New(rand.NewPCG(7, 7)), 100000, 16, 32), 5 << 20},
		{"empty", nil, 256},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := mustCompile(t, tt.prefixes).MemoryBytes(); got > tt.max {
				t.Errorf("MemoryBytes() = %d, want <= %d", got, tt.max)
			}
		})
	}
}

func TestCompileInvalid(t *testing.T) {
	tests := []struct {
		name     string
		prefixes []netip.Prefix
		wantErr  string
	}{
		{"zero prefix", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), {}}, `lpm: prefix 1: invalid prefix "invalid Prefix"`},
		{"bits too long", []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr("10.0.0.0"), 33)}, `lpm: prefix 0: invalid prefix "invalid Prefix"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.prefixes)
			if err == nil || err.Error() != tt.wantErr {
				t.Fatalf("Compile error = %v, want %s", err, tt.wantErr)
			}
		})
	}
}

// TestLookupDoesNotAllocate guards the hot path, including the block scan
// and child-node descent of a large set.
func TestLookupDoesNotAllocate(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	prefixes := append(randomPrefixes4(rng, 20000, 16, 32), randomPrefixes6(rng, 2000, 16, 128)...)
	tbl := mustCompile(t, prefixes)
	addrs := []netip.Addr{
		netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("2001:db8::1"),
		netip.MustParseAddr("::ffff:1.2.3.4"), {},
	}
	for _, p := range prefixes[:10] {
		addrs = append(addrs, p.Addr())
	}
	for _, a := range addrs {
		if n := testing.AllocsPerRun(100, func() { tbl.Lookup(a) }); n != 0 {
			t.Errorf("Lookup(%v) allocates %v times per run", a, n)
		}
	}
}

// TestLookupAgreesWithNaive compares against the reference on random sets
// whose prefixes deliberately nest, collide and cluster, probing the first
// and last address of every prefix, their neighbours and random addresses.
func TestLookupAgreesWithNaive(t *testing.T) {
	tests := []struct {
		name     string
		prefixes func(*rand.Rand) []netip.Prefix
	}{
		{"v4 short", func(r *rand.Rand) []netip.Prefix { return randomPrefixes4(r, 50, 0, 12) }},
		{"v4 wide mix", func(r *rand.Rand) []netip.Prefix { return randomPrefixes4(r, 3000, 0, 32) }},
		{"v4 dense cluster", func(r *rand.Rand) []netip.Prefix { return clustered4(r, 5000) }},
		{"v6 mix", func(r *rand.Rand) []netip.Prefix { return randomPrefixes6(r, 3000, 0, 128) }},
		{"v6 dense cluster", func(r *rand.Rand) []netip.Prefix { return clustered6(r, 3000) }},
		{"both families", func(r *rand.Rand) []netip.Prefix {
			return append(randomPrefixes6(r, 500, 0, 128), randomPrefixes4(r, 500, 0, 32)...)
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(42, uint64(i)))
			prefixes := tt.prefixes(rng)
			// Duplicates with other indices, to exercise the tie rule.
			for range len(prefixes) / 20 {
				prefixes = append(prefixes, prefixes[rng.IntN(len(prefixes))])
			}
			tbl := mustCompile(t, prefixes)
			ref := newReference(prefixes)
			var probes []netip.Addr
			for _, p := range prefixes {
				first, last := p.Masked().Addr(), lastAddr(p)
				probes = append(probes, first, last, first.Prev(), last.Next())
			}
			for range 20000 {
				probes = append(probes, randomAddr(rng, rng.IntN(2) == 0))
			}
			for _, a := range probes {
				if !a.IsValid() {
					continue
				}
				if got, want := tbl.Lookup(a), ref.lookup(a); got != want {
					t.Fatalf("Lookup(%v) = %d (%v), want %d (%v)", a, got, prefixAt(prefixes, got), want, prefixAt(prefixes, want))
				}
			}
		})
	}
}

func prefixAt(prefixes []netip.Prefix, i int) any {
	if i == NoMatch {
		return "none"
	}
	return prefixes[i]
}

// TestSortSpans checks the packed IPv4 sort against the general one,
// including an index too large to pack, which must fall back.
func TestSortSpans(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	mk := func(n int, bigIndex bool) []span {
		var out []span
		for i, p := range randomPrefixes4(rng, n, 0, 32) {
			a := p.Masked().Addr().As4()
			start := u128{0, uint64(a[0])<<24 | uint64(a[1])<<16 | uint64(a[2])<<8 | uint64(a[3])}
			idx := int32(i)
			if bigIndex && i == n-1 {
				idx = 1 << 26
			}
			out = append(out, span{start: start, end: start.or(lowMask(uint(32 - p.Bits()))), bits: p.Bits(), index: idx})
			out = append(out, out[len(out)-1]) // duplicates
			out[len(out)-1].index += 1 << 20
		}
		return out
	}
	for _, big := range []bool{false, true} {
		spans := mk(2000, big)
		want := slices.Clone(spans)
		sortSpans(want, false)
		sortSpans(spans, true)
		if !slices.Equal(spans, want) {
			t.Errorf("bigIndex=%v: packed sort differs from the general sort", big)
		}
	}
}
