package lpm

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"unsafe"
)

// NoMatch is the index Lookup returns when no prefix contains the address.
const NoMatch = -1

// A slot is one 32-bit entry of a trie node. Its top two bits say what the
// rest holds, so that the common case (the slot already knows the answer)
// costs a single load and a single compare.
const (
	slotAnswer = 0 << 30 // low bits: prefix index + 1 (0 is NoMatch)
	slotBlock  = 1 << 30 // low bits: offset of a range block in blocks
	slotNode   = 2 << 30 // low bits: offset of a child node in slots
	offsetMask = 1<<30 - 1

	// childStride is the number of address bits a child node consumes.
	// Children exist only where more than maxBlock ranges share a root
	// slot, so they are rare and a fixed 256-way stride keeps the descent
	// free of per-node metadata.
	childStride = 8
)

// Table answers "which of the compiled prefixes is the most specific one
// containing this address". Both address families live in one Table.
//
// Each family is stored as its flattened ranges (a range is a run of
// addresses with the same answer) behind a direct-indexed root of about two
// slots per range. Compared with a trie over the prefixes (bart), the
// answer for most addresses is in the root slot itself, the prefix length
// never matters at lookup time, and the rare busy slot costs one more read
// and a branch-free scan of at most maxBlock keys. The price is that the
// Table cannot be updated in place; Compile builds a new one, which at
// 100,000 prefixes takes tens of milliseconds.
type Table struct {
	v4 family4
	v6 family6
	n  int
}

// family4 is the IPv4 trie over 32-bit keys.
//
// slots holds the root node (1<<(32-rootShift) slots at offset 0) followed
// by child nodes. A block is laid out as [n, key1 … key(n-1), val0 … val(n-1)]:
// range i starts at key i (range 0 starts at or before the slot's first
// address) and vals are prefix index + 1. Keys and values sit together so a
// short block is one or two cache lines.
type family4 struct {
	slots     []uint32
	blocks    []uint32
	rootShift uint8
}

// family6 is the IPv6 trie over 128-bit keys, laid out like family4 with
// keys stored as (hi, lo) word pairs: [n, hi1, lo1 … hi(n-1), lo(n-1), val0 … val(n-1)].
// The root covers only the region of keys whose top skip bits equal
// region; the rest of the space answers before or after.
type family6 struct {
	slots         []uint32
	blocks        []uint64
	region        uint64
	before, after uint32 // slot-encoded answers outside the region
	skip          uint8
	rootShift     uint8 // of the high word, after dropping the skip bits
}

// Lookup returns the index (into the slice given to Compile) of the most
// specific prefix that contains addr, or NoMatch. Families are strict: an
// IPv4 address matches only IPv4 prefixes and an IPv6 address (including an
// IPv4-mapped one) only IPv6 prefixes; the zero Addr never matches. An IPv6
// zone is ignored (unlike netip.Prefix.Contains): packets carry none, and
// a zoned address is still inside its prefix.
func (t *Table) Lookup(addr netip.Addr) int {
	// The IPv4 root probe is written out here, not in a method, so that
	// the common case (the root slot holds the answer) costs one call.
	if addr.Is4() {
		a := addr.As4()
		key := binary.BigEndian.Uint32(a[:])
		e := t.v4.slots[key>>t.v4.rootShift]
		if e < slotBlock {
			return int(e) - 1
		}
		return t.v4.below(e, key)
	}
	return t.lookup6(addr)
}

// below resolves a root slot e that is not an answer.
func (f *family4) below(e, key uint32) int {
	shift := uint(f.rootShift)
	for e >= slotBlock {
		off := e & offsetMask
		if e < slotNode {
			// Count the keys <= key without branching on them: where
			// a random address falls in a block is unpredictable.
			b := f.blocks[off:]
			n := b[0]
			ks := b[1:n]
			i := uint64(0)
			for _, k := range ks {
				i += 1 ^ (uint64(key)-uint64(k))>>63
			}
			return int(b[uint64(n)+i]) - 1
		}
		s := min(shift, childStride)
		shift -= s
		e = f.slots[off+(key>>shift)&(1<<s-1)]
	}
	return int(e) - 1
}

func (t *Table) lookup6(addr netip.Addr) int {
	if !addr.Is6() {
		return NoMatch
	}
	a := addr.As16()
	hi, lo := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(a[8:])
	f := &t.v6
	var e uint32
	if top := hi >> (64 - f.skip); top == f.region {
		e = f.slots[hi<<f.skip>>f.rootShift]
	} else if top < f.region {
		e = f.before
	} else {
		e = f.after
	}
	shift := 64 + uint(f.rootShift) - uint(f.skip)
	for e >= slotBlock {
		off := e & offsetMask
		if e < slotNode {
			b := f.blocks[off:]
			n := b[0]
			ks := b[1 : 2*n-1]
			i := uint64(0)
			for j := 0; j+1 < len(ks); j += 2 {
				// The borrow of (hi,lo) - (khi,klo) is 1 when key > addr.
				_, borrow := bits.Sub64(lo, ks[j+1], 0)
				_, borrow = bits.Sub64(hi, ks[j], borrow)
				i += 1 ^ borrow
			}
			return int(b[2*n-1+i]) - 1
		}
		s := min(shift, childStride)
		shift -= s
		var chunk uint64
		if shift >= 64 {
			chunk = hi >> (shift - 64)
		} else {
			chunk = lo>>shift | hi<<(64-shift)
		}
		e = f.slots[uint64(off)+chunk&(1<<s-1)]
	}
	return int(e) - 1
}

// Len returns the number of prefixes the Table was compiled from.
func (t *Table) Len() int { return t.n }

// MemoryBytes returns the bytes the Table occupies: its header plus the
// backing arrays it owns. It is an exact accounting of what Compile
// allocated and kept, for comparing layouts; it excludes allocator
// rounding.
func (t *Table) MemoryBytes() int {
	return int(unsafe.Sizeof(*t)) + 4*cap(t.v4.slots) + 4*cap(t.v4.blocks) + 4*cap(t.v6.slots) + 8*cap(t.v6.blocks)
}
