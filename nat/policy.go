package nat

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nfmasq/nfmasq/nat/internal/radix"
	"github.com/nfmasq/nfmasq/nat/lpm"
)

// Action is what happens to a flow's source address.
type Action uint8

// Actions. The zero Action is deliberately not one of them, so that a
// Decision nobody filled in cannot pass for a real one.
const (
	// Masquerade replaces the pod address with the node's.
	Masquerade Action = iota + 1
	// Passthrough keeps the pod address.
	Passthrough
)

var actionNames = [...]string{Masquerade: "masquerade", Passthrough: "passthrough"}

// String returns "masquerade" or "passthrough" ("unknown" otherwise).
func (a Action) String() string {
	if int(a) < len(actionNames) && actionNames[a] != "" {
		return actionNames[a]
	}
	return "unknown"
}

// MarshalText encodes the Action as its String.
func (a Action) MarshalText() ([]byte, error) {
	if a.String() == "unknown" {
		return nil, fmt.Errorf("invalid action %d", uint8(a))
	}
	return []byte(a.String()), nil
}

// UnmarshalText decodes a String form.
func (a *Action) UnmarshalText(b []byte) error {
	i := slices.Index(actionNames[:], string(b))
	if i <= 0 {
		return fmt.Errorf("unknown action %q", b)
	}
	*a = Action(i)
	return nil
}

// Source says which part of the configuration decided a flow.
type Source uint8

// Sources.
const (
	// SourceNone: no non-masquerade prefix matched, so the flow is
	// masqueraded.
	SourceNone Source = iota
	// SourceConfig: a nonMasqueradeCIDRs entry from the config file.
	SourceConfig
	// SourceDefault: a default non-masquerade range (no list in the file,
	// no file, or no agent).
	SourceDefault
	// SourceLinkLocal: 169.254.0.0/16 or fe80::/10, not masqueraded unless
	// masqLinkLocal(IPv6) says so.
	SourceLinkLocal
	// SourceEgressPolicy: an EgressNATPolicy destination; the Decision's
	// Origin names the policy.
	SourceEgressPolicy
	// SourceCluster: a cluster range (--cluster-cidr: pods, services,
	// nodes), never masqueraded.
	SourceCluster
	// SourceDisableDefaultSNAT: no agent, and the cluster was created with
	// --disable-default-snat, so nothing is masqueraded.
	SourceDisableDefaultSNAT
	// SourceIPv6Disabled: an IPv6 destination while IPv6 is not enabled;
	// like ip-masq-agent, nfmasq then installs no IPv6 masquerading.
	SourceIPv6Disabled
	// SourceKernelFallback: the kernel fallback chain decided, not Decide
	// (the agent was down or overloaded). Decide never returns it; flow
	// records use it.
	SourceKernelFallback
	// SourceMasqueradePolicy: a MasqueradePolicy selecting the pod
	// decided (MasqueradePolicies.Decide); Origin names it.
	SourceMasqueradePolicy
)

var sourceNames = [...]string{
	SourceNone:               "none",
	SourceConfig:             "config",
	SourceDefault:            "default",
	SourceLinkLocal:          "link-local",
	SourceEgressPolicy:       "egress-policy",
	SourceCluster:            "cluster",
	SourceDisableDefaultSNAT: "disable-default-snat",
	SourceIPv6Disabled:       "ipv6-disabled",
	SourceKernelFallback:     "kernel-fallback",
	SourceMasqueradePolicy:   "masquerade-policy",
}

// String returns the Source's stable name, as written in flow records.
func (s Source) String() string {
	if int(s) < len(sourceNames) {
		return sourceNames[s]
	}
	return "unknown"
}

// MarshalText encodes the Source as its String.
func (s Source) MarshalText() ([]byte, error) {
	if int(s) >= len(sourceNames) {
		return nil, fmt.Errorf("invalid source %d", uint8(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText decodes a String form.
func (s *Source) UnmarshalText(b []byte) error {
	i := slices.Index(sourceNames[:], string(b))
	if i < 0 {
		return fmt.Errorf("unknown source %q", b)
	}
	*s = Source(i)
	return nil
}

// Decision is the verdict for one destination. It is comparable, and
// copying it does not allocate.
type Decision struct {
	Action Action
	// Prefix is the most specific non-masquerade prefix containing the
	// destination; the zero Prefix when none does.
	Prefix netip.Prefix
	// Source is where Prefix came from.
	Source Source
	// Origin is the EgressNATPolicy's name when Source is
	// SourceEgressPolicy, and empty otherwise.
	Origin string
}

var (
	allIPv4 = netip.MustParsePrefix("0.0.0.0/0")
	allIPv6 = netip.MustParsePrefix("::/0")

	masquerade   = Decision{Action: Masquerade, Source: SourceNone}
	ipv6Disabled = Decision{Action: Passthrough, Prefix: allIPv6, Source: SourceIPv6Disabled}
)

// Input is everything that decides a Policy: the config file and the
// agent's flags, and the cluster's shape.
type Input struct {
	// Config is the parsed config file (DefaultConfig when there is none).
	Config Config
	// EnableIPv6 is --enable-ipv6. Without it IPv6 destinations are never
	// masqueraded (Source SourceIPv6Disabled), as upstream installs no
	// ip6tables rules then.
	EnableIPv6 bool
	// AllReservedRanges is --nomasq-all-reserved-ranges; it picks the
	// defaults used when there is no agent.
	AllReservedRanges bool
	// NoAgent models a cluster without the masquerade DaemonSet (explain
	// --agent=false). The config file and egress policies are then ignored,
	// because nothing would read them.
	NoAgent bool
	// DisableDefaultSNAT models a cluster created with
	// --disable-default-snat. It only has an effect together with NoAgent,
	// as GKE documents.
	DisableDefaultSNAT bool
	// UseEgressPolicies selects Autopilot's model: the union of
	// EgressPolicies replaces the config file's list. It is set whenever
	// policies were asked for, even if none turned out valid (then only the
	// cluster ranges and link-local are kept).
	UseEgressPolicies bool
	// EgressPolicies are the EgressNATPolicy objects in force.
	EgressPolicies []EgressPolicy
	// ClusterCIDRs (pods, services, nodes) are never masqueraded. They
	// apply with or without egress policies: traffic inside the cluster
	// should keep its pod address either way.
	ClusterCIDRs []netip.Prefix
}

// Policy is a compiled Input. It is immutable after Compile and safe for
// concurrent use; share one value between goroutines and swap it
// atomically on reload.
type Policy struct {
	table      *lpm.Table
	decisions  []Decision // index-aligned with the prefixes in table
	enableIPv6 bool
	effective  Config // NonMasqueradeCIDRs left out: Effective derives them
	listed     int    // decisions[:listed] are the effective NonMasqueradeCIDRs
	size       int    // distinct prefixes in decisions
	notes      []string
	hash       string
	nonMasq4   []netip.Prefix
	nonMasq6   []netip.Prefix
}

// Compile validates in and builds its Policy.
//
// Every compiled prefix is a passthrough prefix: Decide masquerades only
// what no prefix contains. When a prefix comes from more than one place, the
// first of these names it: the config file's list (or the defaults, or the
// egress policies, sorted by name, so the first policy by name wins), then
// the cluster ranges, then link-local. Whichever wins, the action is the
// same.
func Compile(in Input) (*Policy, error) {
	n := len(in.Config.NonMasqueradeCIDRs) + len(in.ClusterCIDRs) + len(DefaultNonMasqueradeCIDRs(true)) + 4
	for _, ep := range in.EgressPolicies {
		n += len(ep.Destinations)
	}
	b := builder{
		prefixes:  make([]netip.Prefix, 0, n),
		decisions: make([]Decision, 0, n),
	}
	p := &Policy{enableIPv6: in.EnableIPv6}
	eff := DefaultConfig(in.AllReservedRanges)

	switch {
	case in.NoAgent && in.DisableDefaultSNAT:
		b.add(allIPv4, SourceDisableDefaultSNAT, "")
		b.add(allIPv6, SourceDisableDefaultSNAT, "")
		p.notes = append(p.notes, "no masquerade agent and --disable-default-snat: the pod address is kept for every destination")
	case in.NoAgent:
		if err := b.addCIDRs(eff.NonMasqueradeCIDRs, SourceDefault); err != nil {
			return nil, err
		}
	case in.UseEgressPolicies:
		// The file's list is replaced but the file is still the agent's:
		// its other keys apply, so it must be valid all the same.
		if err := in.Config.Validate(in.EnableIPv6); err != nil {
			return nil, err
		}
		policies := slices.Clone(in.EgressPolicies)
		slices.SortStableFunc(policies, func(x, y EgressPolicy) int { return strings.Compare(x.Name, y.Name) })
		for _, ep := range policies {
			for _, d := range ep.Destinations {
				if err := checkPrefix(d); err != nil {
					return nil, fmt.Errorf("%s %q: %w", EgressPolicyKind, ep.Name, err)
				}
				b.add(d, SourceEgressPolicy, ep.Name)
			}
		}
		eff.ResyncInterval, eff.CIDRLimit, eff.CustomCIDRs = in.Config.ResyncInterval, in.Config.CIDRLimit, true
		if in.Config.CustomCIDRs {
			p.notes = append(p.notes, "egress policies replace the config file's nonMasqueradeCIDRs")
		}
		if in.Config.MasqLinkLocal || in.Config.MasqLinkLocalIPv6 {
			p.notes = append(p.notes, "masqLinkLocal and masqLinkLocalIPv6 are ignored with egress policies: link-local destinations are never masqueraded, as on Autopilot")
		}
	default:
		prefixes, err := in.Config.prefixes(in.EnableIPv6)
		if err != nil {
			return nil, err
		}
		src := SourceDefault
		if in.Config.CustomCIDRs {
			src = SourceConfig
		}
		for _, pr := range prefixes {
			b.add(pr, src, "")
		}
		eff = in.Config
	}
	if in.NoAgent {
		p.notes = append(p.notes, "no masquerade agent (--agent=false): the config file is not read, since no agent would read it")
		if in.UseEgressPolicies {
			p.notes = append(p.notes, "no masquerade agent (--agent=false): egress policies are not applied, since no agent would apply them")
		}
	} else if in.DisableDefaultSNAT {
		p.notes = append(p.notes, "--disable-default-snat has no effect while the masquerade agent runs (as GKE documents)")
	}

	for _, c := range in.ClusterCIDRs {
		if err := checkPrefix(c); err != nil {
			return nil, fmt.Errorf("cluster CIDR: %w", err)
		}
		b.add(c, SourceCluster, "")
	}

	// The link-local ranges are implicit: they belong in the table but not in
	// the effective nonMasqueradeCIDRs, which the masqLinkLocal flags stand
	// for.
	listed := len(b.decisions)
	if !(in.NoAgent && in.DisableDefaultSNAT) {
		if !eff.MasqLinkLocal {
			b.add(LinkLocalIPv4, SourceLinkLocal, "")
		}
		if !eff.MasqLinkLocalIPv6 {
			b.add(LinkLocalIPv6, SourceLinkLocal, "")
		}
	}
	eff.NonMasqueradeCIDRs = nil
	p.effective = eff
	p.listed = listed

	// The lookup table and the sorted views (the kernel fallback's lists,
	// the hash) are independent: on a 100,000-prefix reload, building them
	// on two cores saves about a third of the compile time.
	var table *lpm.Table
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		table, err = lpm.Compile(b.prefixes)
	}()
	sorted := uniqueSorted(b.prefixes)
	p.size = len(sorted)
	p.nonMasq4, p.nonMasq6 = aggregate(b.prefixes, sorted)
	if !p.enableIPv6 {
		p.nonMasq6 = []netip.Prefix{allIPv6}
	}
	p.hash = hashDecisions(b.decisions, sorted, p.enableIPv6)
	<-done
	if err != nil {
		return nil, fmt.Errorf("compile prefixes: %w", err)
	}
	p.table = table
	p.decisions = b.decisions
	return p, nil
}

// builder collects the table's entries in priority order. A prefix may be
// added more than once: lpm.Lookup reports the lowest index among equal
// prefixes, so the first one added decides, and deduplicating here would
// only cost a map of every prefix.
type builder struct {
	prefixes  []netip.Prefix
	decisions []Decision
}

func (b *builder) add(p netip.Prefix, src Source, origin string) {
	b.prefixes = append(b.prefixes, p)
	b.decisions = append(b.decisions, Decision{Action: Passthrough, Prefix: p, Source: src, Origin: origin})
}

func (b *builder) addCIDRs(cidrs []string, src Source) error {
	for _, s := range cidrs {
		p, err := parseCIDR(s)
		if err != nil {
			return err
		}
		b.add(p, src, "")
	}
	return nil
}

// Decide returns the Decision for a flow to dst. It does not allocate.
// IPv4 and IPv6 are strict: an IPv4-mapped IPv6 address is IPv6. The zero
// Addr matches nothing and is masqueraded.
func (p *Policy) Decide(dst netip.Addr) Decision {
	if dst.Is6() && !p.enableIPv6 {
		return ipv6Disabled
	}
	if i := p.table.Lookup(dst); i != lpm.NoMatch {
		return p.decisions[i]
	}
	return masquerade
}

// IPv6Enabled reports whether IPv6 destinations can be masqueraded at all.
func (p *Policy) IPv6Enabled() bool { return p.enableIPv6 }

// Len returns the number of compiled non-masquerade prefixes.
func (p *Policy) Len() int { return p.size }

// Hash identifies the effective decision table: every prefix with its
// source and origin, and whether IPv6 is enabled. Equal hashes mean
// Decide answers identically. It is the first 16 hex digits of a SHA-256.
func (p *Policy) Hash() string { return p.hash }

// NonMasquerade returns, for one address family, the destinations the
// kernel fallback must leave unmasqueraded: canonical, sorted, with
// prefixes inside another one dropped. Link-local is included when it is not
// masqueraded; everything (0.0.0.0/0 or ::/0) when nothing is, including
// all of IPv6 when IPv6 is not enabled. The caller owns the slice.
func (p *Policy) NonMasquerade(v6 bool) []netip.Prefix {
	if v6 {
		return slices.Clone(p.nonMasq6)
	}
	return slices.Clone(p.nonMasq4)
}

// Effective returns the configuration in force, in the config file's
// terms: NonMasqueradeCIDRs after defaults, egress policies and cluster
// ranges (canonical, first occurrence kept, link-local left to the
// MasqLinkLocal flags). The caller owns the result.
func (p *Policy) Effective() Config {
	c := p.effective
	c.NonMasqueradeCIDRs = make([]string, 0, p.listed)
	seen := make(map[netip.Prefix]bool, p.listed)
	for _, d := range p.decisions[:p.listed] {
		if !seen[d.Prefix] {
			seen[d.Prefix] = true
			c.NonMasqueradeCIDRs = append(c.NonMasqueradeCIDRs, d.Prefix.String())
		}
	}
	return c
}

// Notes explains choices that the Input made without saying so, for the
// operator: flags without effect, files not read. The caller owns the
// slice.
func (p *Policy) Notes() []string { return slices.Clone(p.notes) }

// prefixKey orders prefixes by address, then length, then index, so a
// covering prefix sorts before everything it covers and, among equal
// prefixes, the first added comes first. Addresses are compared as 16
// bytes: an IPv4 address is ::ffff:a.b.c.d there, which no IPv6 prefix can
// use (IPv4-mapped prefixes are refused), so the families cannot collide.
// Comparing integers rather than netip values keeps Compile fast on 100,000
// prefixes.
type prefixKey struct {
	hi, lo    uint64
	bitsIndex uint64 // length << 32 | index
}

func compareKeys(x, y prefixKey) int {
	if c := cmp.Compare(x.hi, y.hi); c != 0 {
		return c
	}
	if c := cmp.Compare(x.lo, y.lo); c != 0 {
		return c
	}
	return cmp.Compare(x.bitsIndex, y.bitsIndex)
}

// uniqueSorted returns the indices of prefixes in prefixKey order, keeping
// only the first index of each distinct prefix. IPv4 prefixes, the bulk of
// a long list, are packed into integers and radix-sorted; IPv6 prefixes are
// sorted by compareKeys; the two runs are merged.
func uniqueSorted(prefixes []netip.Prefix) []int32 {
	const indexBits = 26 // a v4 key is address<<32 | length<<26 | index
	v4 := make([]uint64, 0, len(prefixes))
	var v6 []prefixKey
	for i, p := range prefixes {
		if p.Addr().Is4() && i < 1<<indexBits {
			a := p.Addr().As4()
			v4 = append(v4, uint64(binary.BigEndian.Uint32(a[:]))<<32|uint64(p.Bits())<<indexBits|uint64(i))
			continue
		}
		v6 = append(v6, keyOf(p, i))
	}
	radix.Sort(v4)
	slices.SortFunc(v6, compareKeys)

	out := make([]int32, 0, len(prefixes))
	var last prefixKey
	emit := func(k prefixKey) {
		if len(out) > 0 && k.hi == last.hi && k.lo == last.lo && k.bitsIndex>>32 == last.bitsIndex>>32 {
			return
		}
		out = append(out, int32(k.bitsIndex))
		last = k
	}
	key4 := func(k uint64) prefixKey {
		return prefixKey{lo: 0xffff<<32 | k>>32, bitsIndex: k>>indexBits&63<<32 | k&(1<<indexBits-1)}
	}
	for len(v4) > 0 || len(v6) > 0 {
		if len(v6) == 0 || len(v4) > 0 && compareKeys(key4(v4[0]), v6[0]) < 0 {
			emit(key4(v4[0]))
			v4 = v4[1:]
		} else {
			emit(v6[0])
			v6 = v6[1:]
		}
	}
	return out
}

// keyOf is the prefixKey of prefixes[i].
func keyOf(p netip.Prefix, i int) prefixKey {
	a := p.Addr().As16()
	return prefixKey{
		hi:        binary.BigEndian.Uint64(a[:8]),
		lo:        binary.BigEndian.Uint64(a[8:]),
		bitsIndex: uint64(p.Bits())<<32 | uint64(i),
	}
}

// aggregate splits the prefixes (in uniqueSorted order) by family and
// drops those inside another one; all of them are passthrough, so the
// dropped ones add nothing.
func aggregate(prefixes []netip.Prefix, sorted []int32) (v4, v6 []netip.Prefix) {
	n4 := 0
	for _, i := range sorted {
		if prefixes[i].Addr().Is4() {
			n4++
		}
	}
	if n4 > 0 {
		v4 = make([]netip.Prefix, 0, n4)
	}
	if n6 := len(sorted) - n4; n6 > 0 {
		v6 = make([]netip.Prefix, 0, n6)
	}
	for _, i := range sorted {
		pr := prefixes[i]
		out := &v4
		if pr.Addr().Is6() {
			out = &v6
		}
		if n := len(*out); n > 0 && (*out)[n-1].Contains(pr.Addr()) {
			continue
		}
		*out = append(*out, pr)
	}
	return v4, v6
}

// hashDecisions hashes the decisions in uniqueSorted order, so that the
// order and repetitions in the configuration do not matter.
func hashDecisions(decisions []Decision, sorted []int32, enableIPv6 bool) string {
	h := sha256.New()
	buf := fmt.Appendf(make([]byte, 0, 64<<10), "nfmasq policy v1 ipv6=%t\n", enableIPv6)
	for _, i := range sorted {
		d := decisions[i]
		a := d.Prefix.Addr().As16()
		buf = append(buf, a[:]...)
		buf = append(buf, byte(d.Prefix.Bits()), b2u8(d.Prefix.Addr().Is4()), byte(d.Action), byte(d.Source))
		buf = binary.AppendUvarint(buf, uint64(len(d.Origin)))
		buf = append(buf, d.Origin...)
		if len(buf) > 60<<10 {
			h.Write(buf)
			buf = buf[:0]
		}
	}
	h.Write(buf)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func b2u8(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}
