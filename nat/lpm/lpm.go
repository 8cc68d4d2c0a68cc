// Package lpm is a compiled longest-prefix-match table for IP prefixes.
//
// A Table is built once by Compile and is immutable afterwards: it is safe
// for concurrent use by any number of goroutines without locking. Lookup
// never allocates.
package lpm

import (
	"net/netip"
)

// NoMatch is the index Lookup returns when no prefix contains the address.
const NoMatch = -1

// Table answers "which of the compiled prefixes is the most specific one
// containing this address". Both address families live in one Table.
type Table struct {
	prefixes []netip.Prefix // STUB: naive scan; replaced by the compiled form.
}

// Compile builds a Table from prefixes. Prefixes are canonicalised
// (Masked); an invalid prefix is an error naming its index. When the same
// prefix appears more than once, Lookup reports the lowest index.
// IPv4-mapped IPv6 prefixes are IPv6 prefixes.
func Compile(prefixes []netip.Prefix) (*Table, error) {
	t := &Table{prefixes: make([]netip.Prefix, len(prefixes))}
	for i, p := range prefixes {
		t.prefixes[i] = p.Masked()
	}
	return t, nil
}

// Lookup returns the index (into the slice given to Compile) of the most
// specific prefix that contains addr, or NoMatch. Families are strict: an
// IPv4 address matches only IPv4 prefixes and an IPv6 address (including an
// IPv4-mapped one) only IPv6 prefixes; the zero Addr never matches.
func (t *Table) Lookup(addr netip.Addr) int {
	best, bestBits := NoMatch, -1
	for i, p := range t.prefixes {
		if p.Bits() > bestBits && p.Contains(addr) {
			best, bestBits = i, p.Bits()
		}
	}
	return best
}

// Len returns the number of prefixes the Table was compiled from.
func (t *Table) Len() int { return len(t.prefixes) }
