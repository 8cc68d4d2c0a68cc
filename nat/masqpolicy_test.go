package nat

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

const masqPolicies = `apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: partner-keeps-pod-ips}
spec:
  namespaceSelector: {matchLabels: {team: payments}}
  podSelector: {matchExpressions: [{key: app, operator: In, values: [billing]}]}
  action: NoSNAT
  destinations:
    - cidr: 203.0.113.0/24
      except: [203.0.113.128/25]
    - cidr: 2001:db8:100::/48
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: hide-inside-partner}
spec:
  action: Masquerade
  destinations:
    - cidr: 203.0.113.0/26
---
# A tie with partner-keeps-pod-ips on 2001:db8:100::/48 for billing pods.
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: v6-masquerade}
spec:
  podSelector: {matchExpressions: [{key: tier, operator: Exists}]}
  action: Masquerade
  destinations:
    - cidr: 2001:db8:100::/48
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: keep-for-untiered}
spec:
  podSelector:
    matchExpressions:
      - {key: tier, operator: DoesNotExist}
      - {key: app, operator: NotIn, values: [batch]}
  action: NoSNAT
  destinations:
    - cidr: 198.51.100.0/24
    - cidr: 10.244.0.0/16
`

// The decision rule, table by table: nesting across policies, except,
// ties (Masquerade wins, both conflict), both families, every selector
// operator, cluster ranges never masqueraded, and no policy → node policy.
func TestMasqueradePoliciesDecide(t *testing.T) {
	ps, errs := ParseMasqueradePolicies([]byte(masqPolicies))
	if len(errs) != 0 || len(ps) != 4 {
		t.Fatalf("parsed %d policies, errors %v", len(ps), errs)
	}
	set, err := NewMasqueradePolicies(ps, []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")})
	if err != nil {
		t.Fatal(err)
	}
	billing := Workload{Namespace: "pay", Labels: labels.Set{"app": "billing", "tier": "backend"}, NamespaceLabels: labels.Set{"team": "payments"}}
	billingNoTier := Workload{Namespace: "pay", Labels: labels.Set{"app": "billing"}, NamespaceLabels: labels.Set{"team": "payments"}}
	web := Workload{Namespace: "web", Labels: labels.Set{"app": "web"}, NamespaceLabels: labels.Set{"team": "web"}}
	batch := Workload{Namespace: "jobs", Labels: labels.Set{"app": "batch"}}
	for _, tt := range []struct {
		name        string
		w           Workload
		dst         string
		action      Action // with origin and prefix, when a policy decides
		origin      string
		prefix      string
		conflicting []string
	}{
		{"billing to the partner: NoSNAT", billing, "203.0.113.70", Passthrough, "partner-keeps-pod-ips", "203.0.113.0/24", nil},
		{"nested /26 inside: Masquerade wins by length", billing, "203.0.113.10", Masquerade, "hide-inside-partner", "203.0.113.0/26", nil},
		{"in the except range: the node policy", billing, "203.0.113.200", 0, "", "", nil},
		{"another namespace: not selected", web, "203.0.113.70", 0, "", "", nil},
		{"another namespace, the all-pods /26", web, "203.0.113.10", Masquerade, "hide-inside-partner", "203.0.113.0/26", nil},
		{"IPv6 tie: Masquerade wins, both conflict", billing, "2001:db8:100::10", Masquerade, "v6-masquerade", "2001:db8:100::/48", []string{"partner-keeps-pod-ips", "v6-masquerade"}},
		{"IPv6 without the tier label: NoSNAT alone", billingNoTier, "2001:db8:100::10", Passthrough, "partner-keeps-pod-ips", "2001:db8:100::/48", nil},
		{"DoesNotExist and NotIn select", billingNoTier, "198.51.100.7", Passthrough, "keep-for-untiered", "198.51.100.0/24", nil},
		{"NotIn excludes batch", batch, "198.51.100.7", 0, "", "", nil},
		{"Exists excludes untiered from v6-masquerade", web, "2001:db8:100::10", 0, "", "", nil},
		{"a cluster range: never a policy's", web, "10.244.3.4", 0, "", "", nil},
		{"outside every policy", billing, "8.8.8.8", 0, "", "", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d, conflicting, err := set.Decide(tt.w, netip.MustParseAddr(tt.dst))
			// The compiled set answers as the linear rule does.
			ps, cerr := set.For(tt.w)
			if cerr != nil {
				t.Fatal(cerr)
			}
			var cd Decision
			var decides bool
			if ps != nil {
				cd, decides = ps.Decide(netip.MustParseAddr(tt.dst))
			}
			if decides != (err == nil) || cd != d {
				t.Errorf("compiled set decided %+v (%v), the rule %+v (%v)", cd, decides, d, err)
			}
			if tt.origin == "" {
				if !errors.Is(err, ErrNoMasqueradePolicy) {
					t.Errorf("decided %+v, want the node policy to decide", d)
				}
				return
			}
			if err != nil || d.Action != tt.action || d.Origin != tt.origin || d.Prefix.String() != tt.prefix || d.Source != SourceMasqueradePolicy {
				t.Errorf("decided %+v (%v), want %v by %s on %s", d, err, tt.action, tt.origin, tt.prefix)
			}
			if !slices.Equal(conflicting, tt.conflicting) {
				t.Errorf("conflicting %v, want %v", conflicting, tt.conflicting)
			}
		})
	}
}

func TestParseMasqueradePoliciesErrors(t *testing.T) {
	for _, tt := range []struct{ spec, want string }{
		{"action: Drop\n  destinations: [{cidr: 10.0.0.0/8}]", `action "Drop"`},
		{"action: NoSNAT\n  destinations: [{cidr: 10.0.0.1/8}]", "not a CIDR"},
		{"action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]", "not inside"},
		{"action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]", "not inside"},
		{"action: NoSNAT\n  destinations: []", "no destinations"},
		{"action: NoSNAT\n  podSelector: {matchExpressions: [{key: a, operator: Near}]}\n  destinations: [{cidr: 10.0.0.0/8}]", "podSelector"},
		{"action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8}]\n  extra: 1", "unknown field"},
	} {
		doc := "apiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: p}\nspec:\n  " + tt.spec + "\n"
		// A valid policy beside the invalid one is kept.
		good := "---\napiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: ok}\nspec: {action: Masquerade, destinations: [{cidr: 1.2.3.0/24}]}\n"
		ps, errs := ParseMasqueradePolicies([]byte(doc + good))
		if len(errs) != 1 || !strings.Contains(errs[0].Error(), tt.want) || len(ps) != 1 || ps[0].Name != "ok" {
			t.Errorf("%q: policies %d, errors %v; want the valid one and an error about %s", tt.spec, len(ps), errs, tt.want)
		}
	}
	// A List, as `kubectl get -o yaml` prints it.
	list := `{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"nfmasq.io/v1alpha1","kind":"MasqueradePolicy","metadata":{"name":"a"},"spec":{"action":"NoSNAT","destinations":[{"cidr":"10.0.0.0/8"}]}}]}`
	if ps, errs := ParseMasqueradePolicies([]byte(list)); len(ps) != 1 || len(errs) != 0 {
		t.Errorf("List: %d policies, errors %v", len(ps), errs)
	}
}
