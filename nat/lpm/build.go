package lpm

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"

	"github.com/nfmasq/nfmasq/nat/internal/radix"
)

// Build parameters, chosen with the benchmarks in bench_test.go.
const (
	// maxBlock is the most ranges a slot scans; 8 IPv4 ranges are 64
	// bytes. Busier slots get a child node instead.
	maxBlock = 8
	// The root has 1<<(ceil(log2(ranges))+rootExtra) slots, about two per
	// range, so most slots hold their answer and a lookup is one load.
	// At least 1<<minRootBits: 256 slots (1 KiB) give the 12 default
	// prefixes one answer per /8 except for six /8s. At most
	// 1<<maxRootBits: 4 MiB, reached from about 500,000 ranges; 100,000
	// random prefixes get 1<<19 slots (2 MiB).
	minRootBits = 8
	rootExtra   = 1
	maxRootBits = 20
	// maxPrefixes keeps a prefix index + 1 within a slot's payload bits.
	maxPrefixes = offsetMask - 1
)

// errTooLarge reports a set whose compiled form does not fit the 30-bit
// offsets of a slot.
var errTooLarge = errors.New("lpm: prefix set too large")

// Compile builds a Table from prefixes. Prefixes are canonicalised
// (Masked); an invalid prefix is an error naming its index. When the same
// prefix appears more than once, Lookup reports the lowest index.
// IPv4-mapped IPv6 prefixes are IPv6 prefixes.
func Compile(prefixes []netip.Prefix) (*Table, error) {
	if len(prefixes) > maxPrefixes {
		return nil, fmt.Errorf("%w: %d prefixes, at most %d", errTooLarge, len(prefixes), maxPrefixes)
	}
	n4 := 0
	for _, p := range prefixes {
		if p.Addr().Is4() {
			n4++
		}
	}
	p4, p6 := make([]span, 0, n4), make([]span, 0, len(prefixes)-n4)
	for i, p := range prefixes {
		if !p.IsValid() {
			return nil, fmt.Errorf("lpm: prefix %d: invalid prefix %q", i, p)
		}
		p = p.Masked()
		a := p.Addr().As16()
		start := u128{binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(a[8:])}
		if p.Addr().Is4() {
			start = u128{0, start.lo & 0xffffffff}
			p4 = append(p4, span{start: start, end: start.or(lowMask(uint(32 - p.Bits()))), bits: p.Bits(), index: int32(i)})
		} else {
			p6 = append(p6, span{start: start, end: start.or(lowMask(uint(128 - p.Bits()))), bits: p.Bits(), index: int32(i)})
		}
	}

	t := &Table{n: len(prefixes)}
	b4 := builder{width: 32, ranges: flatten(p4, lowMask(32))}
	root4, err := b4.build(0)
	if err != nil {
		return nil, err
	}
	t.v4 = family4{
		slots:     slices.Clone(b4.slots),
		blocks:    slices.Clone(b4.blocks32),
		rootShift: uint8(32 - root4.bits),
	}

	// IPv6 sets usually live under one short prefix (2001:db8::/32, a
	// ULA /48): the root indexes the bits after the part all boundaries
	// share, instead of spending its slots on the empty rest of the space.
	b6 := builder{width: 128, ranges: flatten(p6, lowMask(128))}
	root6, err := b6.build(64)
	if err != nil {
		return nil, err
	}
	t.v6 = family6{
		slots:     slices.Clone(b6.slots),
		blocks:    slices.Clone(b6.blocks64),
		skip:      uint8(root6.skip),
		rootShift: uint8(64 - root6.bits),
		region:    root6.base.hi >> (64 - root6.skip),
		before:    root6.before,
		after:     root6.after,
	}
	return t, nil
}

// span is one prefix as the inclusive address interval it covers.
type span struct {
	start, end u128
	bits       int
	index      int32
}

// addrRange is a maximal run of addresses with the same answer; it ends
// where the next range starts.
type addrRange struct {
	start u128
	value int32 // prefix index, or NoMatch
}

// flatten turns prefixes of one family into sorted, non-overlapping ranges
// covering [0, maxKey], the first starting at 0. Prefixes either nest or are
// disjoint, so after sorting by start (wider first) one sweep with a stack
// of the prefixes still open labels each range with the innermost one.
func flatten(spans []span, maxKey u128) []addrRange {
	sortSpans(spans, maxKey == lowMask(32))
	out := make([]addrRange, 0, 2*len(spans)+1)
	emit := func(start u128, value int32) {
		if n := len(out); n > 0 && out[n-1].start == start {
			// A later event at the same address overrides an earlier one.
			out = out[:n-1]
		}
		if n := len(out); n > 0 && out[n-1].value == value {
			return
		}
		out = append(out, addrRange{start, value})
	}
	var open []span
	closeUntil := func(limit u128, all bool) {
		for len(open) > 0 {
			top := open[len(open)-1]
			if !all && !top.end.less(limit) {
				return
			}
			open = open[:len(open)-1]
			if top.end == maxKey {
				continue
			}
			next := int32(NoMatch)
			if len(open) > 0 {
				next = open[len(open)-1].index
			}
			emit(top.end.addOne(), next)
		}
	}
	emit(u128{}, NoMatch)
	for _, s := range spans {
		closeUntil(s.start, false)
		if n := len(open); n > 0 && open[n-1].start == s.start && open[n-1].bits == s.bits {
			continue // duplicate; the sort put the lowest index first
		}
		emit(s.start, s.index)
		open = append(open, s)
	}
	closeUntil(u128{}, true)
	return out
}

// sortSpans orders spans by start, then length (wider first), then index.
func sortSpans(spans []span, v4 bool) {
	if v4 && sortPacked4(spans) {
		return
	}
	slices.SortFunc(spans, func(a, b span) int {
		if c := a.start.cmp(b.start); c != 0 {
			return c
		}
		if c := cmp.Compare(a.bits, b.bits); c != 0 {
			return c
		}
		return cmp.Compare(a.index, b.index)
	})
}

// sortPacked4 sorts IPv4 spans as integers packing start, length and index,
// with a radix sort: at 100,000 prefixes about 2.8 times faster than
// slices.Sort on the same keys, itself several times faster than a
// comparison function. It reports false, leaving spans as they were, if an
// index needs more than the 26 bits left for it.
func sortPacked4(spans []span) bool {
	const indexBits = 26
	keys := make([]uint64, len(spans))
	for i, s := range spans {
		if s.index >= 1<<indexBits {
			return false
		}
		keys[i] = s.start.lo<<32 | uint64(s.bits)<<indexBits | uint64(s.index)
	}
	radix.Sort(keys)
	for i, k := range keys {
		start := u128{0, k >> 32}
		bits := int(k >> indexBits & 63)
		spans[i] = span{start: start, end: start.or(lowMask(uint(32 - bits))), bits: bits, index: int32(k & (1<<indexBits - 1))}
	}
	return true
}

// builder lays out the trie of one family from its flattened ranges.
type builder struct {
	width    uint // 32 or 128 key bits
	ranges   []addrRange
	slots    []uint32
	blocks32 []uint32
	blocks64 []uint64
}

// root describes the top node of a family's trie.
type root struct {
	bits uint // the root has 1<<bits slots
	skip uint // leading key bits shared by every range boundary
	base u128 // the first key the root covers: the shared bits, then zeros
	// Answers (slot-encoded) for keys below and above the root's region.
	before, after uint32
}

// build lays out the root and everything below it. maxSkip bounds the
// shared leading bits the root may skip (IPv6 takes the root index from the
// high 64 bits of the key; IPv4 skips nothing, its keys rarely share any).
func (b *builder) build(maxSkip uint) (root, error) {
	r := b.ranges
	if len(r) == 1 {
		// Nothing compiled for this family: a single slot with the answer.
		b.slots = []uint32{slotAnswer | uint32(r[0].value+1)}
		return root{}, nil
	}
	rt := root{
		bits:   max(minRootBits, min(maxRootBits, uint(bits.Len(uint(len(r)-1)))+rootExtra)),
		before: slotAnswer | uint32(r[0].value+1),
		after:  slotAnswer | uint32(r[len(r)-1].value+1),
	}
	first, last := r[1].start, r[len(r)-1].start
	common := uint(bits.LeadingZeros64(first.hi ^ last.hi))
	if common == 64 {
		common += uint(bits.LeadingZeros64(first.lo ^ last.lo))
	}
	common -= 128 - b.width
	rt.skip = min(common, maxSkip-min(maxSkip, rt.bits))
	rt.base = first.and(lowMask(b.width - rt.skip).not())
	if err := b.node(0, rt.base, b.width-rt.skip-rt.bits, rt.bits); err != nil {
		return root{}, err
	}
	return rt, nil
}

// node appends a node of 1<<stride slots covering the keys from base whose
// low shift bits vary per slot; first is the range containing base.
func (b *builder) node(first int, base u128, shift, stride uint) error {
	off := len(b.slots)
	if off+1<<stride > offsetMask {
		return errTooLarge
	}
	b.slots = append(b.slots, make([]uint32, 1<<stride)...)
	r := b.ranges
	lo := first
	for c := uint64(0); c < 1<<stride; c++ {
		slotStart := base.or(u128{0, c}.shl(shift))
		slotEnd := slotStart.or(lowMask(shift))
		for lo+1 < len(r) && !slotStart.less(r[lo+1].start) {
			lo++
		}
		hi := lo
		for hi+1 < len(r) && !slotEnd.less(r[hi+1].start) {
			hi++
		}
		var slot uint32
		switch n := hi - lo + 1; {
		case n == 1:
			slot = slotAnswer | uint32(r[lo].value+1)
		case n <= maxBlock:
			o, err := b.block(r[lo : hi+1])
			if err != nil {
				return err
			}
			slot = slotBlock | o
		default:
			child := uint32(len(b.slots))
			s := min(shift, childStride)
			if err := b.node(lo, slotStart, shift-s, s); err != nil {
				return err
			}
			slot = slotNode | child
		}
		b.slots[off+int(c)] = slot
	}
	return nil
}

// block appends a block for rs (the first range may start before the slot)
// and returns its offset.
func (b *builder) block(rs []addrRange) (uint32, error) {
	n := len(rs)
	if b.width == 32 {
		off := len(b.blocks32)
		if off > offsetMask {
			return 0, errTooLarge
		}
		b.blocks32 = append(b.blocks32, uint32(n))
		for _, r := range rs[1:] {
			b.blocks32 = append(b.blocks32, uint32(r.start.lo))
		}
		for _, r := range rs {
			b.blocks32 = append(b.blocks32, uint32(r.value+1))
		}
		return uint32(off), nil
	}
	off := len(b.blocks64)
	if off > offsetMask {
		return 0, errTooLarge
	}
	b.blocks64 = append(b.blocks64, uint64(n))
	for _, r := range rs[1:] {
		b.blocks64 = append(b.blocks64, r.start.hi, r.start.lo)
	}
	for _, r := range rs {
		b.blocks64 = append(b.blocks64, uint64(r.value+1))
	}
	return uint32(off), nil
}

// u128 is a 128-bit key; IPv4 keys use the low 32 bits.
type u128 struct{ hi, lo uint64 }

func (a u128) cmp(b u128) int {
	if c := cmp.Compare(a.hi, b.hi); c != 0 {
		return c
	}
	return cmp.Compare(a.lo, b.lo)
}

func (a u128) less(b u128) bool { return a.hi < b.hi || a.hi == b.hi && a.lo < b.lo }

func (a u128) or(b u128) u128 { return u128{a.hi | b.hi, a.lo | b.lo} }

func (a u128) and(b u128) u128 { return u128{a.hi & b.hi, a.lo & b.lo} }

func (a u128) not() u128 { return u128{^a.hi, ^a.lo} }

func (a u128) addOne() u128 {
	lo, carry := bits.Add64(a.lo, 1, 0)
	return u128{a.hi + carry, lo}
}

func (a u128) shl(n uint) u128 {
	if n >= 64 {
		return u128{a.lo << (n - 64), 0}
	}
	return u128{a.hi<<n | a.lo>>(64-n), a.lo << n}
}

// lowMask returns a key with the low n bits set.
func lowMask(n uint) u128 {
	switch {
	case n >= 128:
		return u128{^uint64(0), ^uint64(0)}
	case n >= 64:
		return u128{1<<(n-64) - 1, ^uint64(0)}
	default:
		return u128{0, 1<<n - 1}
	}
}
