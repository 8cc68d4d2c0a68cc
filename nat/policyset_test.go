package nat

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/labels"
)

// randomPolicies returns n policies of m destinations each, drawn from a
// small address space so that they nest, tie and except each other, over
// both families; selectors pick one of four label values.
func randomPolicies(r *rand.Rand, n, m int) []MasqueradePolicy {
	ps := make([]MasqueradePolicy, n)
	for i := range ps {
		p := MasqueradePolicy{Name: fmt.Sprintf("p%04d", i), NamespaceSelector: labels.Everything(), PodSelector: labels.Everything(), Action: Passthrough}
		if r.IntN(2) == 0 {
			p.Action = Masquerade
		}
		if r.IntN(3) > 0 {
			p.PodSelector = labels.SelectorFromSet(labels.Set{"app": fmt.Sprint(r.IntN(4))})
		}
		for range m {
			var d MasqueradeDestination
			if r.IntN(4) == 0 {
				d.CIDR = netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0xd, 0xb8, byte(r.IntN(4)), byte(r.IntN(256))}), 32+r.IntN(17)).Masked()
			} else {
				d.CIDR = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(256)), 0}), 8+r.IntN(17)).Masked()
			}
			if r.IntN(3) == 0 {
				bits := d.CIDR.Bits() + 1 + r.IntN(4)
				a := d.CIDR.Addr().As16()
				a[15] ^= byte(r.IntN(256))
				a[14] ^= byte(r.IntN(256))
				ex := netip.PrefixFrom(netip.AddrFrom16(a), bits+96*b2i(d.CIDR.Addr().Is4()))
				if d.CIDR.Addr().Is4() {
					ex = netip.PrefixFrom(netip.AddrFrom16(a).Unmap(), bits)
				}
				if ex = ex.Masked(); d.CIDR.Contains(ex.Addr()) && ex.Bits() > d.CIDR.Bits() {
					d.Except = append(d.Except, ex)
				}
			}
			p.Destinations = append(p.Destinations, d)
		}
		ps[i] = p
	}
	return ps
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// The compiled PolicySet agrees with the linear decision rule (its oracle)
// for random nesting, excepts, ties, cluster ranges and both families,
// at addresses drawn near every prefix edge.
func TestPolicySetAgreesWithRule(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 40 {
		ps := randomPolicies(r, 1+r.IntN(12), 1+r.IntN(6))
		cluster := []netip.Prefix{netip.MustParsePrefix("10.3.0.0/16"), netip.MustParsePrefix("2001:db8:3::/48")}
		all, err := NewMasqueradePolicies(ps, cluster)
		if err != nil {
			t.Fatal(err)
		}
		for app := range 5 {
			w := Workload{Labels: labels.Set{"app": fmt.Sprint(app)}}
			set, err := all.For(w)
			if err != nil {
				t.Fatal(err)
			}
			var probes []netip.Addr
			for _, p := range ps {
				for _, d := range p.Destinations {
					for _, q := range append([]netip.Prefix{d.CIDR}, d.Except...) {
						probes = append(probes, q.Addr(), lastAddr(q), lastAddr(q).Next(), q.Addr().Prev())
					}
				}
			}
			for range 200 {
				probes = append(probes, netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(256)), byte(r.IntN(256))}))
			}
			for _, dst := range probes {
				if !dst.IsValid() {
					continue
				}
				want, _, err := all.Decide(w, dst)
				var got Decision
				var decides bool
				if set != nil {
					got, decides = set.Decide(dst)
				}
				if decides != (err == nil) || got != want {
					t.Fatalf("round %d, app %d, %s: compiled %+v (%v), rule %+v (%v)", round, app, dst, got, decides, want, err)
				}
			}
		}
	}
}

// Conflicts name every pair that ties with different actions, once.
func TestPolicySetConflicts(t *testing.T) {
	ps, errs := ParseMasqueradePolicies([]byte(`apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: a}
spec: {action: NoSNAT, destinations: [{cidr: 203.0.113.0/24}, {cidr: 198.51.100.0/24}]}
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: b}
spec: {action: Masquerade, destinations: [{cidr: 203.0.113.0/24}]}
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: c}
spec: {action: Masquerade, destinations: [{cidr: 198.51.100.0/24, except: [198.51.100.0/25]}]}
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: d}
spec: {action: NoSNAT, destinations: [{cidr: 192.0.2.0/24}]}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	all, _ := NewMasqueradePolicies(ps, nil)
	set, err := all.For(Workload{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := set.Conflicts(), [][2]string{{"a", "b"}, {"a", "c"}}; !slices.Equal(got, want) {
		t.Errorf("conflicts %v, want %v", got, want)
	}
	if set.Key() != "a,b,c,d" {
		t.Errorf("key %q", set.Key())
	}
	// In c's except range, a decides alone: NoSNAT.
	if d, ok := set.Decide(netip.MustParseAddr("198.51.100.5")); !ok || d.Action != Passthrough || d.Origin != "a" {
		t.Errorf("198.51.100.5: %+v %v", d, ok)
	}
	// Two workloads with the same policies share the compiled set.
	again, _ := all.For(Workload{Labels: labels.Set{"x": "y"}})
	if again != set {
		t.Error("the same policies compiled twice")
	}
}

// Compiling 1,000 policies of 100 CIDRs each, every one selecting the pod,
// stays under 100 ms (the bound; BenchmarkPolicySetCompile gives
// the number).
func BenchmarkPolicySetCompile(b *testing.B) {
	r := rand.New(rand.NewPCG(3, 4))
	ps := make([]MasqueradePolicy, 1000)
	for i := range ps {
		p := MasqueradePolicy{Name: fmt.Sprintf("p%04d", i), NamespaceSelector: labels.Everything(), PodSelector: labels.Everything(), Action: Action(1 + r.IntN(2))}
		for range 100 {
			a := netip.AddrFrom4([4]byte{byte(1 + r.IntN(223)), byte(r.IntN(256)), byte(r.IntN(256)), 0})
			d := MasqueradeDestination{CIDR: netip.PrefixFrom(a, 16+r.IntN(9)).Masked()}
			if r.IntN(10) == 0 {
				d.Except = []netip.Prefix{netip.PrefixFrom(d.CIDR.Addr(), d.CIDR.Bits()+1)}
			}
			p.Destinations = append(p.Destinations, d)
		}
		ps[i] = p
	}
	cluster := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	b.ReportAllocs()
	var worst time.Duration
	for b.Loop() {
		start := time.Now()
		all, err := NewMasqueradePolicies(ps, cluster)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := all.For(Workload{}); err != nil {
			b.Fatal(err)
		}
		worst = max(worst, time.Since(start))
	}
	b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
}

// Policy-level conflicts: the same CIDR with the other action, unless the
// selectors provably select different pods.
func TestMasqueradePoliciesConflicts(t *testing.T) {
	doc := func(name, action, sel, cidr string) string {
		return "---\napiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: " + name + ", labels: {owner: x}}\nspec: {action: " + action + ", " + sel + "destinations: [{cidr: " + cidr + "}]}\n"
	}
	ps, errs := ParseMasqueradePolicies([]byte(
		doc("keep-billing", "NoSNAT", "podSelector: {matchLabels: {app: billing}}, ", "203.0.113.0/24") +
			doc("hide-web", "Masquerade", "podSelector: {matchLabels: {app: web}}, ", "203.0.113.0/24") +
			doc("hide-all", "Masquerade", "", "203.0.113.0/24") +
			doc("hide-untiered", "Masquerade", "podSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}, ", "203.0.113.0/24") +
			doc("hide-other-len", "Masquerade", "", "203.0.113.0/25")))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	all, _ := NewMasqueradePolicies(ps, nil)
	got := all.Conflicts()
	cidr := netip.MustParsePrefix("203.0.113.0/24")
	want := map[string][]Conflict{
		"keep-billing": {{"hide-all", cidr}},
		"hide-all":     {{"keep-billing", cidr}},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("conflicts %v, want %v", got, want)
	}
}
