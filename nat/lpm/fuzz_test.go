package lpm

import (
	"net/netip"
	"testing"
)

// FuzzLookup compiles a prefix set decoded from the input and checks every
// answer against the naive reference. Input layout, repeated: one control
// byte (bit 0: family, bit 1: probe instead of prefix; prefix length is the
// byte >> 2, folded into range), then 4 or 16 address bytes. Prefixes are
// built from few distinct leading bytes so that they nest and collide.
func FuzzLookup(f *testing.F) {
	f.Add([]byte{0x00, 10, 0, 0, 0, 0x20, 10, 1, 0, 0, 0x02, 10, 1, 2, 3})
	f.Add([]byte{0x01, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Add([]byte{0x80, 255, 255, 255, 255, 0x7c, 0, 0, 0, 0, 0x02, 255, 255, 255, 255, 0x02, 0, 0, 0, 0})
	f.Add([]byte{0x00, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		var prefixes []netip.Prefix
		var probes []netip.Addr
		for len(data) > 0 {
			ctl := data[0]
			data = data[1:]
			size := 4
			if ctl&1 == 1 {
				size = 16
			}
			if len(data) < size {
				break
			}
			var a netip.Addr
			if size == 4 {
				a = netip.AddrFrom4([4]byte(data[:4]))
			} else {
				a = netip.AddrFrom16([16]byte(data[:16]))
			}
			data = data[size:]
			if ctl&2 != 0 {
				probes = append(probes, a)
				continue
			}
			p := netip.PrefixFrom(a, int(ctl>>2)%(a.BitLen()+1))
			prefixes = append(prefixes, p)
			// Probe the edges of each prefix and just outside them.
			first, last := p.Masked().Addr(), lastAddr(p)
			probes = append(probes, first, last, first.Prev(), last.Next())
		}
		tbl, err := Compile(prefixes)
		if err != nil {
			t.Fatalf("Compile(%v): %v", prefixes, err)
		}
		if tbl.Len() != len(prefixes) {
			t.Fatalf("Len() = %d, want %d", tbl.Len(), len(prefixes))
		}
		for _, a := range probes {
			if !a.IsValid() {
				continue
			}
			if got, want := tbl.Lookup(a), naiveLookup(prefixes, a); got != want {
				t.Fatalf("prefixes %v: Lookup(%v) = %d, want %d", prefixes, a, got, want)
			}
			// The IPv4-mapped form is IPv6 and must not match IPv4 prefixes.
			if a.Is4() {
				alt := netip.AddrFrom16(a.As16())
				if got, want := tbl.Lookup(alt), naiveLookup(prefixes, alt); got != want {
					t.Fatalf("prefixes %v: Lookup(%v) = %d, want %d", prefixes, alt, got, want)
				}
			}
		}
	})
}
