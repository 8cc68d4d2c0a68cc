package rules

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// PolicySet is the kernel fallback of one set of MasqueradePolicies: the
// pod addresses the set applies to and its compiled destinations. Per
// family it becomes three ipsets: the pods (hash:ip), the destinations it
// masquerades and those it keeps the pod address for (hash:net, where
// every other compiled prefix is a nomatch entry). ipset's hash:net takes
// the most specific entry containing an address, and a nomatch entry there
// is a miss: the same rule as the agent's compiled table. Two rules in the
// fallback chain, ahead of the node policy, use them.
type PolicySet struct {
	// ID names the set's ipsets: 8 lowercase hex digits, stable for a
	// given set of policies.
	ID string
	// Pods are the addresses of the pods the set applies to.
	Pods []netip.Addr
	// Destinations are the compiled prefixes and what the set decides for
	// the addresses whose most specific prefix each is.
	Destinations []PolicyDestination
}

// PolicyDestination is one compiled prefix of a PolicySet.
type PolicyDestination struct {
	Prefix netip.Prefix
	// Decides is false where the node policy decides (a cluster range, or
	// an except no other policy of the set covers).
	Decides    bool
	Masquerade bool
}

// PolicySetPrefix starts the name of every MasqueradePolicy ipset.
const PolicySetPrefix = "nfmasq-mp-"

// policySetName is the name of one of a set's ipsets: role s (pods), m
// (masquerade) or k (keep), per family; at most 23 characters with the
// temporary suffix, under ipset's 31.
func policySetName(id string, role byte, fam Family) string {
	return fmt.Sprintf("%s%s-%c%d", PolicySetPrefix, id, role, fam)
}

func validPolicySetID(id string) bool {
	if len(id) != 8 {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// policyRules returns the fallback chain's rules for the family's policy
// sets: masquerade, then keep, per set. A set without pods, or without
// destinations of one action, in the family gets no rule for it.
func policyRules(cfg *Config, fam Family) []string {
	var out []string
	for _, ps := range cfg.PolicySets {
		if !ps.hasPods(fam) {
			continue
		}
		src := join("-m set --match-set", policySetName(ps.ID, 's', fam), "src")
		if ps.has(fam, true) {
			out = append(out, join(src, "-m set --match-set", policySetName(ps.ID, 'm', fam), "dst",
				comment("MasqueradePolicy set "+ps.ID+": masquerade"), "-j", ChainMasquerade))
		}
		if ps.has(fam, false) {
			out = append(out, join(src, "-m set --match-set", policySetName(ps.ID, 'k', fam), "dst",
				comment("MasqueradePolicy set "+ps.ID+": keep the pod address"), "-j RETURN"))
		}
	}
	return out
}

func (ps *PolicySet) hasPods(fam Family) bool {
	return slices.ContainsFunc(ps.Pods, func(a netip.Addr) bool { return a.Is6() == (fam == IPv6) })
}

// has reports whether the set decides masquerade (or keep) anywhere in
// the family.
func (ps *PolicySet) has(fam Family, masquerade bool) bool {
	return slices.ContainsFunc(ps.Destinations, func(d PolicyDestination) bool {
		return fam.holds(d.Prefix) && d.Decides && d.Masquerade == masquerade
	})
}

// policySetContents returns, for each ipset the family's policy sets use,
// its type and entries as `ipset save` prints them.
func policySetContents(cfg *Config, fam Family) map[string]setContent {
	out := map[string]setContent{}
	for _, ps := range cfg.PolicySets {
		if !ps.hasPods(fam) {
			continue
		}
		var pods []string
		for _, a := range ps.Pods {
			if a.Is6() == (fam == IPv6) {
				pods = append(pods, a.String())
			}
		}
		out[policySetName(ps.ID, 's', fam)] = setContent{kind: "hash:ip", entries: sortedUnique(pods)}
		for _, masq := range []bool{true, false} {
			if !ps.has(fam, masq) {
				continue
			}
			var entries []string
			for _, d := range ps.Destinations {
				if !fam.holds(d.Prefix) {
					continue
				}
				suffix := ""
				if !d.Decides || d.Masquerade != masq {
					suffix = " nomatch"
				}
				for _, p := range splitZero(d.Prefix) {
					entries = append(entries, setEntryString(p)+suffix)
				}
			}
			role := byte('k')
			if masq {
				role = 'm'
			}
			out[policySetName(ps.ID, role, fam)] = setContent{kind: "hash:net", entries: sortedUnique(entries)}
		}
	}
	return out
}

// setContent is one ipset's type and entries.
type setContent struct {
	kind    string
	entries []string
}

// splitZero returns p, or its two halves for a /0, which hash:net cannot
// hold.
func splitZero(p netip.Prefix) []netip.Prefix {
	if p.Bits() != 0 {
		return []netip.Prefix{p}
	}
	lo := netip.PrefixFrom(p.Addr(), 1)
	hiBytes := p.Addr().AsSlice()
	hiBytes[0] = 0x80
	hi, _ := netip.AddrFromSlice(hiBytes)
	return []netip.Prefix{lo, netip.PrefixFrom(hi, 1)}
}

// setEntryString prints a prefix as ipset save does: hosts without their
// length.
func setEntryString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

func sortedUnique(s []string) []string {
	slices.Sort(s)
	return slices.Compact(s)
}

// PlanPolicySets returns the `ipset restore` input that fills the
// family's policy-set ipsets, each built in a temporary set and swapped
// in, so a rule never sees one half filled. existingSets are the names
// `ipset list -n` prints. Sets no longer used are left for
// staleSets, once the rules no longer reference them.
func PlanPolicySets(cfg Config, fam Family, existingSets []string) []byte {
	contents := policySetContents(&cfg, fam)
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(contents)) {
		c := contents[name]
		tmp := name + "-t"
		create := fmt.Sprintf("%s family %s hashsize %d maxelem %d", c.kind, setFamily(fam), hashSize(len(c.entries)), maxElem(len(c.entries)))
		if slices.Contains(existingSets, tmp) {
			fmt.Fprintf(&b, "destroy %s\n", tmp)
		}
		fmt.Fprintf(&b, "create %s %s\n", tmp, create)
		for _, e := range c.entries {
			fmt.Fprintf(&b, "add %s %s\n", tmp, e)
		}
		if !slices.Contains(existingSets, name) {
			fmt.Fprintf(&b, "create %s %s\n", name, create)
		}
		fmt.Fprintf(&b, "swap %s %s\n", tmp, name)
		fmt.Fprintf(&b, "destroy %s\n", tmp)
	}
	if b.Len() == 0 {
		return nil
	}
	return []byte(b.String())
}

// staleSets returns the policy-set ipsets in existing that cfg no longer
// uses, in either family.
func staleSets(cfg Config, existing []string) []string {
	want := map[string]bool{}
	for _, fam := range cfg.families() {
		for name := range policySetContents(&cfg, fam) {
			want[name] = true
		}
	}
	var out []string
	for _, name := range existing {
		if strings.HasPrefix(name, PolicySetPrefix) && !want[name] {
			out = append(out, name)
		}
	}
	return out
}

// VerifyPolicySets checks the family's policy-set ipsets against cfg, given
// the `ipset save` output of each, wrapping ErrRulesChanged on a
// difference.
func VerifyPolicySets(cfg Config, fam Family, save func(name string) (string, error)) error {
	contents := policySetContents(&cfg, fam)
	for _, name := range slices.Sorted(maps.Keys(contents)) {
		out, err := save(name)
		if err != nil {
			return fmt.Errorf("%w: ipset %s: %v", ErrRulesChanged, name, err)
		}
		var got []string
		for line := range strings.Lines(out) {
			f := strings.Fields(line)
			if len(f) >= 3 && f[0] == "add" && f[1] == name {
				got = append(got, strings.Join(f[2:], " "))
			}
		}
		if !slices.Equal(sortedUnique(got), contents[name].entries) {
			return fmt.Errorf("%w: ipset %s has %d entries, want %d", ErrRulesChanged, name, len(got), len(contents[name].entries))
		}
	}
	return nil
}
