package lpm

import (
	"math/rand/v2"
	"net/netip"
)

// reference answers like naiveLookup but groups prefixes by length so the
// agreement tests stay fast on thousands of prefixes.
type reference struct {
	byLen map[int]map[netip.Prefix]int // bits -> masked prefix -> lowest index
	lens4 []int                        // lengths present, longest first
	lens6 []int
}

func newReference(prefixes []netip.Prefix) *reference {
	r := &reference{byLen: map[int]map[netip.Prefix]int{}}
	for i, p := range prefixes {
		p = p.Masked()
		key := p.Bits()
		if p.Addr().Is6() {
			key += 1000
		}
		m := r.byLen[key]
		if m == nil {
			m = map[netip.Prefix]int{}
			r.byLen[key] = m
		}
		if _, ok := m[p]; !ok {
			m[p] = i
		}
	}
	for bits := 128; bits >= 0; bits-- {
		if _, ok := r.byLen[bits+1000]; ok {
			r.lens6 = append(r.lens6, bits)
		}
		if _, ok := r.byLen[bits]; ok && bits <= 32 {
			r.lens4 = append(r.lens4, bits)
		}
	}
	return r
}

func (r *reference) lookup(a netip.Addr) int {
	lens, off := r.lens4, 0
	if a.Is6() {
		lens, off = r.lens6, 1000
		a = a.WithZone("")
	}
	for _, bits := range lens {
		p, _ := a.Prefix(bits)
		if i, ok := r.byLen[bits+off][p]; ok {
			return i
		}
	}
	return NoMatch
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As16()
	start := 0
	if p.Addr().Is4() {
		start = 12
	}
	for bit := start*8 + p.Bits(); bit < 128; bit++ {
		a[bit/8] |= 0x80 >> (bit % 8)
	}
	if p.Addr().Is4() {
		return netip.AddrFrom4([4]byte(a[12:]))
	}
	return netip.AddrFrom16(a)
}

func randomAddr(r *rand.Rand, v4 bool) netip.Addr {
	if v4 {
		var b [4]byte
		u := r.Uint32()
		b[0], b[1], b[2], b[3] = byte(u>>24), byte(u>>16), byte(u>>8), byte(u)
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	for i := range 2 {
		u := r.Uint64()
		for j := range 8 {
			b[8*i+j] = byte(u >> (56 - 8*j))
		}
	}
	return netip.AddrFrom16(b)
}

// randomPrefixes4 returns n prefixes with lengths uniform in [minBits, maxBits].
func randomPrefixes4(r *rand.Rand, n, minBits, maxBits int) []netip.Prefix {
	out := make([]netip.Prefix, n)
	for i := range out {
		out[i], _ = randomAddr(r, true).Prefix(minBits + r.IntN(maxBits-minBits+1))
	}
	return out
}

// randomPrefixes6 returns n prefixes with lengths uniform in [minBits,
// maxBits], inside 2000::/4 half the time so that some of them nest.
func randomPrefixes6(r *rand.Rand, n, minBits, maxBits int) []netip.Prefix {
	out := make([]netip.Prefix, n)
	for i := range out {
		a := randomAddr(r, false).As16()
		if r.IntN(2) == 0 {
			a[0] = 0x20 | a[0]&0x0f
		}
		out[i], _ = netip.AddrFrom16(a).Prefix(minBits + r.IntN(maxBits-minBits+1))
	}
	return out
}

// clustered4 packs n prefixes into 10.0.0.0/16 and its neighbourhood, so
// that slots overflow their blocks and child nodes are built.
func clustered4(r *rand.Rand, n int) []netip.Prefix {
	out := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	for range n {
		u := 10<<24 | r.Uint32()&0x1ffff
		a := netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)})
		p, _ := a.Prefix(20 + r.IntN(13))
		out = append(out, p)
	}
	return out
}

// clustered6 packs n prefixes into 2001:db8::/32, as real IPv6 sets do.
func clustered6(r *rand.Rand, n int) []netip.Prefix {
	base := netip.MustParseAddr("2001:db8::").As16()
	out := []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")}
	for range n {
		a := randomAddr(r, false).As16()
		copy(a[:4], base[:4])
		a[4], a[5] = 0, byte(r.IntN(4))
		p, _ := netip.AddrFrom16(a).Prefix(40 + r.IntN(89))
		out = append(out, p)
	}
	return out
}
