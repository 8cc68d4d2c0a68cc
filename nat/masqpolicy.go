package nat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"sigs.k8s.io/yaml"
)

// MasqueradePolicy is a masqueradepolicies.nfmasq.io/v1alpha1 object: for
// the pods its selectors select, an action for its destinations. The
// decision rule across policies is MasqueradePolicies.Decide.
type MasqueradePolicy struct {
	Name string
	// NamespaceSelector and PodSelector select the pods the policy
	// applies to; an absent or empty selector selects everything.
	NamespaceSelector, PodSelector labels.Selector
	Action                         Action
	Destinations                   []MasqueradeDestination
}

// MasqueradeDestination is a destination range less its exceptions.
type MasqueradeDestination struct {
	CIDR   netip.Prefix
	Except []netip.Prefix
}

// contains reports whether the destination holds a: inside CIDR and in
// none of its exceptions.
func (d *MasqueradeDestination) contains(a netip.Addr) bool {
	if !d.CIDR.Contains(a) {
		return false
	}
	for _, e := range d.Except {
		if e.Contains(a) {
			return false
		}
	}
	return true
}

// masqueradePolicyObject is the object's wire form.
type masqueradePolicyObject struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector"`
		PodSelector       *metav1.LabelSelector `json:"podSelector"`
		Action            string                `json:"action"`
		Destinations      []struct {
			CIDR   string   `json:"cidr"`
			Except []string `json:"except"`
		} `json:"destinations"`
	} `json:"spec"`
}

// MasqueradePolicyGroup and MasqueradePolicyVersion identify the resource.
const (
	MasqueradePolicyGroup   = "nfmasq.io"
	MasqueradePolicyVersion = "v1alpha1"
	MasqueradePolicyKind    = "MasqueradePolicy"
)

// ParseMasqueradePolicies reads MasqueradePolicy objects as they are
// applied with kubectl: YAML documents separated by "---", or JSON, each
// an object or a List of them. It returns the valid policies and one
// error, naming the object, for each invalid one, which is left out.
func ParseMasqueradePolicies(data []byte) ([]MasqueradePolicy, []error) {
	var out []MasqueradePolicy
	var errs []error
	for i, doc := range splitYAMLDocuments(data) {
		var list struct {
			Kind  string            `json:"kind"`
			Items []json.RawMessage `json:"items"`
		}
		if err := yaml.Unmarshal(doc, &list); err != nil {
			errs = append(errs, fmt.Errorf("document %d: %w", i+1, err))
			continue
		}
		items := [][]byte{doc}
		if list.Kind == "List" || strings.HasSuffix(list.Kind, "List") {
			items = items[:0]
			for _, it := range list.Items {
				items = append(items, it)
			}
		}
		for _, item := range items {
			p, err := parseMasqueradePolicy(item)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			out = append(out, p)
		}
	}
	return out, errs
}

// splitYAMLDocuments splits a stream at "---" lines, dropping empty ones.
func splitYAMLDocuments(data []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), data...), []byte("\n---")) {
		if i := bytes.IndexByte(d, '\n'); i >= 0 && len(bytes.TrimSpace(d[:i])) > 0 && bytes.HasPrefix(bytes.TrimSpace(d[:i]), []byte("#")) {
			// "--- # comment": the rest of the separator line.
			d = d[i:]
		}
		if len(bytes.TrimSpace(d)) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

// ParseMasqueradePolicy reads one MasqueradePolicy object (JSON or YAML).
func ParseMasqueradePolicy(data []byte) (MasqueradePolicy, error) {
	return parseMasqueradePolicy(data)
}

func parseMasqueradePolicy(item []byte) (MasqueradePolicy, error) {
	var o masqueradePolicyObject
	if err := yaml.UnmarshalStrict(item, &o); err != nil {
		return MasqueradePolicy{}, fmt.Errorf("MasqueradePolicy: %w", err)
	}
	name := o.Metadata.Name
	fail := func(format string, args ...any) (MasqueradePolicy, error) {
		return MasqueradePolicy{}, fmt.Errorf("MasqueradePolicy %q: %s", name, fmt.Sprintf(format, args...))
	}
	switch {
	case o.Kind != MasqueradePolicyKind:
		return fail("kind %q, want %s", o.Kind, MasqueradePolicyKind)
	case o.APIVersion != MasqueradePolicyGroup+"/"+MasqueradePolicyVersion:
		return fail("apiVersion %q, want %s/%s", o.APIVersion, MasqueradePolicyGroup, MasqueradePolicyVersion)
	case name == "":
		return fail("no metadata.name")
	}
	p := MasqueradePolicy{Name: name}
	switch o.Spec.Action {
	case "Masquerade":
		p.Action = Masquerade
	case "NoSNAT":
		p.Action = Passthrough
	default:
		return fail("action %q: want Masquerade or NoSNAT", o.Spec.Action)
	}
	var err error
	for _, s := range []struct {
		what string
		in   *metav1.LabelSelector
		out  *labels.Selector
	}{{"namespaceSelector", o.Spec.NamespaceSelector, &p.NamespaceSelector}, {"podSelector", o.Spec.PodSelector, &p.PodSelector}} {
		if s.in == nil {
			*s.out = labels.Everything()
			continue
		}
		if *s.out, err = metav1.LabelSelectorAsSelector(s.in); err != nil {
			return fail("%s: %v", s.what, err)
		}
	}
	if len(o.Spec.Destinations) == 0 {
		return fail("no destinations")
	}
	for _, d := range o.Spec.Destinations {
		cidr, err := netip.ParsePrefix(d.CIDR)
		if err != nil || cidr != cidr.Masked() {
			return fail("destination %q: not a CIDR (address/length, host bits zero)", d.CIDR)
		}
		dst := MasqueradeDestination{CIDR: cidr}
		for _, e := range d.Except {
			ex, err := netip.ParsePrefix(e)
			switch {
			case err != nil || ex != ex.Masked():
				return fail("except %q of %s: not a CIDR", e, d.CIDR)
			case ex.Addr().Is4() != cidr.Addr().Is4() || ex.Bits() <= cidr.Bits() || !cidr.Contains(ex.Addr()):
				return fail("except %s is not inside %s", ex, cidr)
			}
			dst.Except = append(dst.Except, ex)
		}
		p.Destinations = append(p.Destinations, dst)
	}
	return p, nil
}

// Workload is what selectors see of a pod.
type Workload struct {
	Namespace       string
	Labels          labels.Set
	NamespaceLabels labels.Set
}

// MasqueradePolicies is a set of policies and the cluster ranges no policy
// may masquerade.
type MasqueradePolicies struct {
	policies []MasqueradePolicy
	cluster  []netip.Prefix
	setCache
}

// NewMasqueradePolicies returns the set, in name order.
func NewMasqueradePolicies(policies []MasqueradePolicy, cluster []netip.Prefix) (*MasqueradePolicies, error) {
	ps := slices.Clone(policies)
	slices.SortFunc(ps, func(a, b MasqueradePolicy) int { return strings.Compare(a.Name, b.Name) })
	for i := 1; i < len(ps); i++ {
		if ps[i].Name == ps[i-1].Name {
			return nil, fmt.Errorf("two MasqueradePolicies named %q", ps[i].Name)
		}
	}
	return &MasqueradePolicies{policies: ps, cluster: slices.Clone(cluster)}, nil
}

// ErrNoMasqueradePolicy says no policy selecting the pod contains the
// destination: the node policy decides.
var ErrNoMasqueradePolicy = errors.New("no MasqueradePolicy decides")

// Decide applies the decision rule for a flow from w to dst: among the
// policies that select w, the one whose destination entry is the most
// specific prefix containing dst (its exceptions removed) decides; on
// equal prefix length between policies with different actions,
// Masquerade wins (where two owners disagree, the pod address is not
// exposed) and conflicting names the other policies of that length. When
// no policy decides, or dst is in a cluster range (never masqueraded), it
// returns ErrNoMasqueradePolicy and the node policy decides.
func (s *MasqueradePolicies) Decide(w Workload, dst netip.Addr) (d Decision, conflicting []string, err error) {
	dst = dst.Unmap()
	for _, c := range s.cluster {
		if c.Contains(dst) {
			return Decision{}, nil, ErrNoMasqueradePolicy
		}
	}
	best := -1
	var winners []int // policies whose best entry has the best length
	for i := range s.policies {
		p := &s.policies[i]
		if !p.NamespaceSelector.Matches(w.NamespaceLabels) || !p.PodSelector.Matches(w.Labels) {
			continue
		}
		bits := -1
		for j := range p.Destinations {
			if e := &p.Destinations[j]; e.CIDR.Bits() > bits && e.contains(dst) {
				bits = e.CIDR.Bits()
			}
		}
		switch {
		case bits < 0 || bits < best:
		case bits > best:
			best, winners = bits, append(winners[:0], i)
		default:
			winners = append(winners, i)
		}
	}
	if best < 0 {
		return Decision{}, nil, ErrNoMasqueradePolicy
	}
	win := winners[0]
	for _, i := range winners[1:] {
		if s.policies[win].Action != Masquerade && s.policies[i].Action == Masquerade {
			win = i // Masquerade wins a tie
		}
	}
	for _, i := range winners {
		if s.policies[i].Action != s.policies[win].Action {
			// Owners disagree at this length: every policy of it conflicts.
			for _, j := range winners {
				conflicting = append(conflicting, s.policies[j].Name)
			}
			break
		}
	}
	p := &s.policies[win]
	return Decision{Action: p.Action, Prefix: netip.PrefixFrom(dst, best).Masked(), Source: SourceMasqueradePolicy, Origin: p.Name}, conflicting, nil
}

// Conflict is a tie between two policies: both list CIDR with different
// actions, and their selectors may select the same pod.
type Conflict struct {
	With string
	CIDR netip.Prefix
}

// Conflicts returns, for each policy that has any, the policies it may
// tie with: the same destination CIDR with the other action, and
// selectors that are not provably disjoint (In or = against In or = with
// no common value, In against NotIn covering it, Exists against
// DoesNotExist, on the same key, in the pod or the namespace selector).
// The answer depends on the policies alone, not on the pods of a node, so
// every agent reports the same. Masquerade wins where they do tie.
func (s *MasqueradePolicies) Conflicts() map[string][]Conflict {
	byCIDR := map[netip.Prefix][]int{}
	for i := range s.policies {
		for _, d := range s.policies[i].Destinations {
			if l := byCIDR[d.CIDR]; len(l) == 0 || l[len(l)-1] != i {
				byCIDR[d.CIDR] = append(l, i)
			}
		}
	}
	out := map[string][]Conflict{}
	for cidr, ps := range byCIDR {
		for _, a := range ps {
			for _, b := range ps {
				pa, pb := &s.policies[a], &s.policies[b]
				if a == b || pa.Action == pb.Action || !selectorsMayOverlap(pa, pb) {
					continue
				}
				out[pa.Name] = append(out[pa.Name], Conflict{With: pb.Name, CIDR: cidr})
			}
		}
	}
	for name, cs := range out {
		slices.SortFunc(cs, func(x, y Conflict) int {
			if c := strings.Compare(x.With, y.With); c != 0 {
				return c
			}
			if c := x.CIDR.Addr().Compare(y.CIDR.Addr()); c != 0 {
				return c
			}
			return x.CIDR.Bits() - y.CIDR.Bits()
		})
		out[name] = cs
	}
	return out
}

func selectorsMayOverlap(a, b *MasqueradePolicy) bool {
	return !disjoint(a.PodSelector, b.PodSelector) && !disjoint(a.NamespaceSelector, b.NamespaceSelector)
}

// disjoint reports whether no label set can match both selectors, as far
// as requirement pairs on one key show it.
func disjoint(a, b labels.Selector) bool {
	ra, _ := a.Requirements()
	rb, _ := b.Requirements()
	for _, x := range ra {
		for _, y := range rb {
			if x.Key() == y.Key() && (excludes(x, y) || excludes(y, x)) {
				return true
			}
		}
	}
	return false
}

// excludes reports whether requirements x and y on the same key cannot
// both hold.
func excludes(x, y labels.Requirement) bool {
	positive := func(r labels.Requirement) bool {
		switch r.Operator() {
		case selection.In, selection.Equals, selection.DoubleEquals:
			return true
		}
		return false
	}
	switch {
	case positive(x) && positive(y):
		return x.Values().Intersection(y.Values()).Len() == 0
	case positive(x) && (y.Operator() == selection.NotIn || y.Operator() == selection.NotEquals):
		return y.Values().IsSuperset(x.Values())
	case positive(x) || x.Operator() == selection.Exists:
		return y.Operator() == selection.DoesNotExist
	}
	return false
}
