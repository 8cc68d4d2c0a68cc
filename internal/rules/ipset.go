package rules

import (
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
)

// SetName returns the name of the family's non-masquerade ipset.
func SetName(fam Family) string {
	if fam == IPv6 {
		return "nfmasq-nomasq-v6"
	}
	return "nfmasq-nomasq-v4"
}

// tmpSetName is the set a refill is built in before it is swapped in.
func tmpSetName(fam Family) string { return SetName(fam) + "-tmp" }

// ourSets lists every set name nfmasq may leave behind.
func ourSets() []string {
	return []string{SetName(IPv4), tmpSetName(IPv4), SetName(IPv6), tmpSetName(IPv6)}
}

// PlanSet returns the `ipset restore` input that makes the family's set
// hold exactly the non-masquerade list, or nil when the family's fallback
// does not use a set. existingSets are the names `ipset list -n` prints.
//
// The new content is built in a temporary set and swapped in, so the
// iptables rule that matches the set never sees it half filled; the set
// itself is created (empty) only when missing, because `create -exist`
// fails on a set whose hash has grown since it was created.
func PlanSet(cfg Config, fam Family, existingSets []string) ([]byte, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if !cfg.usesSet(fam) {
		return nil, nil
	}
	list := dedupe(cfg.nonMasquerade(fam))
	name, tmp := SetName(fam), tmpSetName(fam)
	create := fmt.Sprintf("hash:net family %s hashsize %d maxelem %d", setFamily(fam), hashSize(len(list)), maxElem(len(list)))

	var b strings.Builder
	if slices.Contains(existingSets, tmp) {
		// Left by a run that died between create and destroy.
		fmt.Fprintf(&b, "destroy %s\n", tmp)
	}
	fmt.Fprintf(&b, "create %s %s\n", tmp, create)
	for _, p := range list {
		fmt.Fprintf(&b, "add %s %s\n", tmp, p)
	}
	if !slices.Contains(existingSets, name) {
		fmt.Fprintf(&b, "create %s %s\n", name, create)
	}
	fmt.Fprintf(&b, "swap %s %s\n", tmp, name)
	fmt.Fprintf(&b, "destroy %s\n", tmp)
	return []byte(b.String()), nil
}

// VerifySet checks the output of `ipset save <SetName(fam)>` against the
// family's non-masquerade list, wrapping ErrRulesChanged on a difference.
// It is only meaningful when the family uses a set.
func VerifySet(cfg Config, fam Family, setSave string) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	name := SetName(fam)
	want := dedupe(cfg.nonMasquerade(fam))
	var got []netip.Prefix
	found := false
	for line := range strings.Lines(setSave) {
		f := strings.Fields(line)
		if len(f) < 3 || f[1] != name {
			continue
		}
		switch f[0] {
		case "create":
			found = true
		case "add":
			p, err := parseSetEntry(f[2])
			if err != nil {
				return fmt.Errorf("%w: ipset %s holds %q: %w", ErrRulesChanged, name, f[2], err)
			}
			got = append(got, p)
		}
	}
	if !found {
		return fmt.Errorf("%w: ipset %s is missing", ErrRulesChanged, name)
	}
	got = dedupe(got)
	if !slices.Equal(got, want) {
		missing, extra := diffPrefixes(want, got)
		return fmt.Errorf("%w: ipset %s has %d entries, want %d (%d missing, %d unexpected)",
			ErrRulesChanged, name, len(got), len(want), missing, extra)
	}
	return nil
}

// parseSetEntry reads an ipset entry; host entries are printed without
// their /32 or /128.
func parseSetEntry(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		return netip.ParsePrefix(s)
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func setFamily(fam Family) string {
	if fam == IPv6 {
		return "inet6"
	}
	return "inet"
}

// hashSize gives at least one bucket per entry, so lookups stay one bucket
// deep without the kernel resizing the table while we fill it.
func hashSize(n int) int {
	const min = 1024
	if n <= min {
		return min
	}
	return 1 << bits.Len(uint(n-1))
}

// maxElem leaves room for the list to double before a refill.
func maxElem(n int) int { return max(65536, 2*n) }

func dedupe(list []netip.Prefix) []netip.Prefix {
	out := slices.Clone(list)
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

func diffPrefixes(want, got []netip.Prefix) (missing, extra int) {
	in := func(list []netip.Prefix, p netip.Prefix) bool {
		_, ok := slices.BinarySearchFunc(list, p, comparePrefix)
		return ok
	}
	for _, p := range want {
		if !in(got, p) {
			missing++
		}
	}
	for _, p := range got {
		if !in(want, p) {
			extra++
		}
	}
	return missing, extra
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
