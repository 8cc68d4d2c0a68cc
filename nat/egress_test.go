package nat

import (
	"net/netip"
	"slices"
	"testing"
)

func TestParseEgressPolicies(t *testing.T) {
	tests := []struct {
		name string
		file string
		want []EgressPolicy
		errs []string
	}{
		{
			name: "one policy",
			file: `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: default
spec:
  action: NoSNAT
  destinations:
  - cidr: 10.0.0.0/8
  - cidr: 172.16.0.0/12
`,
			want: []EgressPolicy{{Name: "default", Destinations: prefixes("10.0.0.0/8", "172.16.0.0/12")}},
		},
		{
			name: "several documents, invalid ones skipped",
			file: `# leading comment
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: a}
spec: {action: NoSNAT, destinations: [{cidr: 10.0.0.0/8}]}
--- # a comment after the separator
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: bad-cidr}
spec: {action: NoSNAT, destinations: [{cidr: 10.0.0.0/8}, {cidr: 10.0.0.1/8}]}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: bad-action}
spec: {action: SNAT, destinations: [{cidr: 10.0.0.0/8}]}
---
apiVersion: networking.gke.io/v1beta1
kind: EgressNATPolicy
metadata: {name: old}
spec: {action: NoSNAT}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
spec: {action: NoSNAT}
---
key: [unclosed
---

---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: v6}
spec: {action: NoSNAT, destinations: [{cidr: "fd00::/8"}, {cidr: "2001:db8::/32"}]}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: typed}
spec: {action: NoSNAT, destinations: "10.0.0.0/8"}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: oops
---
- 1
- 2
`,
			want: []EgressPolicy{
				{Name: "a", Destinations: prefixes("10.0.0.0/8")},
				{Name: "v6", Destinations: prefixes("fd00::/8", "2001:db8::/32")},
			},
			errs: []string{
				`document at line 8: EgressNATPolicy "bad-cidr": spec.destinations[1].cidr: CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"`,
				`document at line 13: EgressNATPolicy "bad-action": spec.action "SNAT" is not supported, want "NoSNAT"`,
				`document at line 18: EgressNATPolicy "old": apiVersion "networking.gke.io/v1beta1" is not networking.gke.io/v1`,
				`document at line 23: object "cm": kind "ConfigMap" is not EgressNATPolicy`,
				`document at line 27: EgressNATPolicy: metadata.name is empty`,
				`document at line 31: yaml: line 2: did not find expected ',' or ']'`,
				`document at line 40: EgressNATPolicy "typed": spec.destinations: got string, want a list`,
				`document at line 45: metadata: got string, want an object`,
				`document at line 49: got array, want an object`,
			},
		},
		{
			name: "a List, as kubectl get -o yaml writes",
			file: `apiVersion: v1
kind: List
items:
- apiVersion: networking.gke.io/v1
  kind: EgressNATPolicy
  metadata: {name: default}
  spec:
    action: NoSNAT
    destinations: [{cidr: 10.0.0.0/8}]
- apiVersion: networking.gke.io/v1
  kind: EgressNATPolicy
  metadata: {name: broken}
  spec: {action: NoSNAT, destinations: [{cidr: nonsense}]}
- apiVersion: networking.gke.io/v1
  kind: EgressNATPolicy
  metadata: {name: gke-abc123-1}
  spec: {action: NoSNAT, destinations: [{cidr: 10.244.0.0/14}]}
`,
			want: []EgressPolicy{
				{Name: "default", Destinations: prefixes("10.0.0.0/8")},
				{Name: "gke-abc123-1", Destinations: prefixes("10.244.0.0/14")},
			},
			errs: []string{`document at line 1: items[1]: EgressNATPolicy "broken": spec.destinations[0].cidr: CIDR "nonsense" could not be parsed, invalid CIDR address: nonsense`},
		},
		{
			name: "JSON, and a typed List kind",
			file: `{"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicyList", "items": [
  {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": "j"},
   "spec": {"action": "NoSNAT", "destinations": [{"cidr": "192.168.0.0/16"}]},
   "status": {"conditions": []}}]}`,
			want: []EgressPolicy{{Name: "j", Destinations: prefixes("192.168.0.0/16")}},
		},
		{
			name: "no destinations is valid and adds nothing",
			file: "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: empty}\nspec: {action: NoSNAT}\n",
			want: []EgressPolicy{{Name: "empty", Destinations: []netip.Prefix{}}},
		},
		{name: "empty file", file: ""},
		{name: "only separators and comments", file: "---\n# nothing\n---\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := ParseEgressPolicies([]byte(tt.file))
			var msgs []string
			for _, err := range errs {
				msgs = append(msgs, err.Error())
			}
			if !slices.Equal(msgs, tt.errs) {
				t.Errorf("errors:\n got %q\nwant %q", msgs, tt.errs)
			}
			if !slices.EqualFunc(got, tt.want, equalEgressPolicy) {
				t.Errorf("policies = %v, want %v", got, tt.want)
			}
		})
	}
}

func equalEgressPolicy(a, b EgressPolicy) bool {
	return a.Name == b.Name && slices.Equal(a.Destinations, b.Destinations)
}

func TestNewEgressPolicy(t *testing.T) {
	tests := []struct {
		name, action string
		cidrs        []string
		wantErr      string
	}{
		{"p", "NoSNAT", []string{"10.0.0.0/8", "fd00::/8"}, ""},
		{"", "NoSNAT", nil, "EgressNATPolicy: metadata.name is empty"},
		{"p", "nosnat", nil, `EgressNATPolicy "p": spec.action "nosnat" is not supported, want "NoSNAT"`},
		{"p", "NoSNAT", []string{"10.0.0.0/8", ""}, `EgressNATPolicy "p": spec.destinations[1].cidr: CIDR "" could not be parsed, invalid CIDR address: `},
		{"p", "NoSNAT", []string{"::ffff:10.0.0.0/104"}, `EgressNATPolicy "p": spec.destinations[0].cidr: CIDR "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR`},
	}
	for _, tt := range tests {
		_, err := NewEgressPolicy(tt.name, tt.action, tt.cidrs)
		if errString(err) != tt.wantErr {
			t.Errorf("NewEgressPolicy(%q, %q, %q) error = %q, want %q", tt.name, tt.action, tt.cidrs, errString(err), tt.wantErr)
		}
	}
}

func TestSplitDocuments(t *testing.T) {
	tests := []struct {
		in    string
		docs  []string
		lines []int
	}{
		{"a: 1\n", []string{"a: 1\n"}, []int{1}},
		{"a: 1\n---\nb: 2", []string{"a: 1\n", "b: 2"}, []int{1, 3}},
		{"---\na: 1\n---   \n--- #c\nb: 2\n", []string{"", "a: 1\n", "", "b: 2\n"}, []int{1, 2, 4, 5}},
		{"a: |\n  --- not a separator\n---x\n", []string{"a: |\n  --- not a separator\n---x\n"}, []int{1}},
		{"a: 1\r\n---\r\nb: 2\r\n", []string{"a: 1\r\n", "b: 2\r\n"}, []int{1, 3}},
	}
	for _, tt := range tests {
		got := splitDocuments([]byte(tt.in))
		var docs []string
		var lines []int
		for _, d := range got {
			docs = append(docs, string(d.data))
			lines = append(lines, d.line)
		}
		if !slices.Equal(docs, tt.docs) || !slices.Equal(lines, tt.lines) {
			t.Errorf("splitDocuments(%q) = %q at %v, want %q at %v", tt.in, docs, lines, tt.docs, tt.lines)
		}
	}
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}
