package nat

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/nfmasq/nfmasq/nat/lpm"
)

// PolicySet is the compiled decision rule of one set of MasqueradePolicies:
// the ones that select a pod. Every pod selected by exactly the same
// policies shares one PolicySet. It is immutable and safe for concurrent
// use; Decide does not allocate.
//
// Compiling flattens the rule into one longest-prefix table. Every
// destination and except prefix of the set (and every cluster range) is a
// table entry; the addresses whose most specific entry is x all have the
// same decision, which depends only on the entries containing x: the
// deepest destination entry containing x whose own excepts do not contain
// x decides, Masquerade winning a tie, and a cluster range containing x
// (or inside which x lies) leaves the decision to the node policy.
type PolicySet struct {
	key       string
	names     []string
	table     *lpm.Table
	decisions []setDecision // index-aligned with entries
	entries   []SetEntry
	conflicts [][2]string
}

type setDecision struct {
	d       Decision
	decides bool
}

// SetEntry is one prefix of a compiled PolicySet and what the set decides
// for the addresses whose most specific prefix of the set it is. The kernel
// fallback writes these into ipsets: ipset's hash:net with nomatch entries
// applies the same most-specific-entry rule.
type SetEntry struct {
	Prefix netip.Prefix
	// Decides is false where the node policy decides (no policy of the
	// set contains the addresses, or a cluster range does).
	Decides bool
	Action  Action
}

// Key identifies the set of policies: their names, sorted, joined by ",".
func (s *PolicySet) Key() string { return s.key }

// Names returns the policies of the set in name order. The caller must not
// modify the slice.
func (s *PolicySet) Names() []string { return s.names }

// Entries returns the compiled prefixes and their decisions, sorted by
// address then length. The caller must not modify the slice.
func (s *PolicySet) Entries() []SetEntry { return s.entries }

// Conflicts returns the pairs of policies of the set that tie with
// different actions for some destination (Masquerade won there).
func (s *PolicySet) Conflicts() [][2]string { return s.conflicts }

// Decide returns the set's decision for dst, and false when the node
// policy decides. It does not allocate.
func (s *PolicySet) Decide(dst netip.Addr) (Decision, bool) {
	if i := s.table.Lookup(dst); i != lpm.NoMatch {
		sd := &s.decisions[i]
		return sd.d, sd.decides
	}
	return Decision{}, false
}

// entryKind says what a compile entry stands for.
type entryKind uint8

const (
	kindDestination entryKind = iota
	kindExcept
	kindCluster
)

// setEntry is one prefix of a set being compiled. Addresses are 16-byte
// keys (IPv4 as ::ffff:a.b.c.d with its length plus 96), so containment
// is one mask and compare for both families.
type setEntry struct {
	hi, lo uint64
	bits   uint8
	kind   entryKind
	policy int32 // index into the selected policies (destination, except)
	dest   int32 // the destination entry an except belongs to
	order  int32 // position before sorting
}

func keyOf16(p netip.Prefix) (hi, lo uint64, bits uint8) {
	a := p.Masked().Addr()
	b := a.As16()
	bits = uint8(p.Bits())
	if a.Is4() {
		bits += 96
	}
	return binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:]), bits
}

// contains reports whether prefix (hi, lo, bits) contains prefix o.
func (e *setEntry) contains(o *setEntry) bool {
	if e.bits > o.bits {
		return false
	}
	mhi, mlo := mask128(e.bits)
	return o.hi&mhi == e.hi && o.lo&mlo == e.lo
}

func mask128(bits uint8) (hi, lo uint64) {
	switch {
	case bits == 0:
		return 0, 0
	case bits <= 64:
		return ^uint64(0) << (64 - bits), 0
	case bits == 128:
		return ^uint64(0), ^uint64(0)
	}
	return ^uint64(0), ^uint64(0) << (128 - bits)
}

func (e *setEntry) prefix() netip.Prefix {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], e.hi)
	binary.BigEndian.PutUint64(b[8:], e.lo)
	a := netip.AddrFrom16(b)
	if a.Is4In6() {
		return netip.PrefixFrom(a.Unmap(), int(e.bits)-96)
	}
	return netip.PrefixFrom(a, int(e.bits))
}

// compileSet builds the PolicySet of the policies at idx (indices into
// s.policies, ascending, so in name order).
func (s *MasqueradePolicies) compileSet(idx []int) (*PolicySet, error) {
	set := &PolicySet{names: make([]string, len(idx))}
	n := len(s.cluster)
	for k, i := range idx {
		set.names[k] = s.policies[i].Name
		for _, d := range s.policies[i].Destinations {
			n += 1 + len(d.Except)
		}
	}
	set.key = strings.Join(set.names, ",")
	entries := make([]setEntry, 0, n)
	var dest int32
	for k, i := range idx {
		for _, d := range s.policies[i].Destinations {
			hi, lo, bits := keyOf16(d.CIDR)
			entries = append(entries, setEntry{hi: hi, lo: lo, bits: bits, kind: kindDestination, policy: int32(k), dest: dest})
			for _, e := range d.Except {
				hi, lo, bits := keyOf16(e)
				entries = append(entries, setEntry{hi: hi, lo: lo, bits: bits, kind: kindExcept, policy: int32(k), dest: dest})
			}
			dest++
		}
	}
	for _, c := range s.cluster {
		hi, lo, bits := keyOf16(c)
		entries = append(entries, setEntry{hi: hi, lo: lo, bits: bits, kind: kindCluster})
	}
	// Covering prefixes sort before what they cover; equal prefixes keep
	// the order they were added in (policies by name).
	for i := range entries {
		entries[i].order = int32(i)
	}
	slices.SortFunc(entries, func(a, b setEntry) int {
		if c := cmp.Compare(a.hi, b.hi); c != 0 {
			return c
		}
		if c := cmp.Compare(a.lo, b.lo); c != 0 {
			return c
		}
		if c := cmp.Compare(a.bits, b.bits); c != 0 {
			return c
		}
		return cmp.Compare(a.order, b.order)
	})

	// levels is the chain of distinct prefixes containing the current one:
	// each level is a run of equal entries.
	type level struct{ first, end int }
	var levels []level
	var excluded []int32
	var cands []*MasqueradePolicy
	prefixes := make([]netip.Prefix, 0, n)
	set.decisions = make([]setDecision, 0, n)
	set.entries = make([]SetEntry, 0, n)
	seenConflict := map[[2]string]bool{}
	for first := 0; first < len(entries); {
		end := first + 1
		for end < len(entries) && entries[end].hi == entries[first].hi && entries[end].lo == entries[first].lo && entries[end].bits == entries[first].bits {
			end++
		}
		x := &entries[first]
		for len(levels) > 0 && !entries[levels[len(levels)-1].first].contains(x) {
			levels = levels[:len(levels)-1]
		}
		levels = append(levels, level{first, end})

		// Excepts and cluster ranges at or above x.
		excluded = excluded[:0]
		cluster := false
		for _, l := range levels {
			for j := l.first; j < l.end; j++ {
				switch entries[j].kind {
				case kindCluster:
					cluster = true
				case kindExcept:
					excluded = append(excluded, entries[j].dest)
				}
			}
		}
		sd := setDecision{}
		for li := len(levels) - 1; li >= 0 && !cluster; li-- {
			l := levels[li]
			cands = cands[:0]
			for j := l.first; j < l.end; j++ {
				if e := &entries[j]; e.kind == kindDestination && !slices.Contains(excluded, e.dest) {
					cands = append(cands, &s.policies[idx[e.policy]])
				}
			}
			if len(cands) == 0 {
				continue
			}
			// Masquerade wins a tie: where two owners disagree, the
			// pod address is not exposed. Each disagreeing pair conflicts.
			win := cands[0]
			for _, p := range cands {
				if p.Action == Masquerade {
					win = p
					break
				}
			}
			for _, m := range cands {
				for _, o := range cands {
					if m.Action == Masquerade && o.Action != Masquerade {
						pair := [2]string{min(m.Name, o.Name), max(m.Name, o.Name)}
						if !seenConflict[pair] {
							seenConflict[pair] = true
							set.conflicts = append(set.conflicts, pair)
						}
					}
				}
			}
			sd = setDecision{decides: true, d: Decision{
				Action: win.Action, Prefix: entries[l.first].prefix(), Source: SourceMasqueradePolicy, Origin: win.Name,
			}}
			break
		}
		pfx := x.prefix()
		prefixes = append(prefixes, pfx)
		set.decisions = append(set.decisions, sd)
		set.entries = append(set.entries, SetEntry{Prefix: pfx, Decides: sd.decides, Action: sd.d.Action})
		first = end
	}
	slices.SortFunc(set.conflicts, func(a, b [2]string) int {
		return cmp.Or(strings.Compare(a[0], b[0]), strings.Compare(a[1], b[1]))
	})
	t, err := lpm.Compile(prefixes)
	if err != nil {
		return nil, fmt.Errorf("MasqueradePolicies %s: %w", set.key, err)
	}
	set.table = t
	return set, nil
}

// Selecting returns the indices of the policies that select w, ascending.
func (s *MasqueradePolicies) selecting(w Workload) []int {
	var idx []int
	for i := range s.policies {
		p := &s.policies[i]
		if p.NamespaceSelector.Matches(w.NamespaceLabels) && p.PodSelector.Matches(w.Labels) {
			idx = append(idx, i)
		}
	}
	return idx
}

// Len returns the number of policies.
func (s *MasqueradePolicies) Len() int { return len(s.policies) }

// Policies returns the policies in name order. The caller must not modify
// the slice.
func (s *MasqueradePolicies) Policies() []MasqueradePolicy { return s.policies }

// For returns the compiled PolicySet of the policies that select w, or nil
// when none does. Sets are compiled once per distinct set of policies and
// shared by every workload that has it.
func (s *MasqueradePolicies) For(w Workload) (*PolicySet, error) {
	idx := s.selecting(w)
	if len(idx) == 0 {
		return nil, nil
	}
	var kb strings.Builder
	for _, i := range idx {
		fmt.Fprintf(&kb, "%d,", i)
	}
	k := kb.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	if set, ok := s.sets[k]; ok {
		return set, nil
	}
	set, err := s.compileSet(idx)
	if err != nil {
		return nil, err
	}
	if s.sets == nil {
		s.sets = map[string]*PolicySet{}
	}
	s.sets[k] = set
	return set, nil
}

// setCache is the compiled sets of a MasqueradePolicies, by the indices of
// their policies.
type setCache struct {
	mu   sync.Mutex
	sets map[string]*PolicySet
}
