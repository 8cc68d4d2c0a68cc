package kube

import (
	"net/netip"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// policy is an EgressNATPolicy object as the dynamic client returns it.
func policy(name, action string, cidrs ...string) *unstructured.Unstructured {
	dests := make([]any, len(cidrs))
	for i, c := range cidrs {
		dests[i] = map[string]any{"cidr": c}
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "networking.gke.io/v1",
		"kind":       "EgressNATPolicy",
		"metadata":   map[string]any{"name": name},
		"spec":       map[string]any{"action": action, "destinations": dests},
	}}
}

func prefixes(texts ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(texts))
	for i, s := range texts {
		ps[i] = netip.MustParsePrefix(s)
	}
	return ps
}

func TestManagedPolicyName(t *testing.T) {
	a := ManagedPolicyName(prefixes("10.244.0.0/16", "10.96.0.0/12"))
	b := ManagedPolicyName(prefixes("10.96.0.0/12", "10.244.0.0/16", "10.96.0.0/12"))
	c := ManagedPolicyName(prefixes("10.244.0.0/16"))
	if a != b {
		t.Errorf("order or duplicates change the name: %s vs %s", a, b)
	}
	if a == c {
		t.Errorf("different ranges give the same name %s", a)
	}
	// A golden value: the name must not change between releases, or an
	// upgrade would leave the old managed policy behind.
	if want := "gke-18e880bd78-1"; a != want {
		t.Errorf("ManagedPolicyName = %s, want %s", a, want)
	}
}

func TestJudge(t *testing.T) {
	tests := []struct {
		name   string
		obj    *unstructured.Unstructured
		status metav1.ConditionStatus
		reason string
		msg    string
		dests  []string
	}{
		{name: "valid", obj: policy("p", "NoSNAT", "10.0.0.0/8", "fd00::/8"), status: metav1.ConditionTrue,
			reason: ReasonValid, msg: "2 destinations keep the pod address", dests: []string{"10.0.0.0/8", "fd00::/8"}},
		{name: "empty destinations", obj: policy("p", "NoSNAT"), status: metav1.ConditionTrue,
			reason: ReasonValid, msg: "0 destinations keep the pod address"},
		{name: "host bits set", obj: policy("p", "NoSNAT", "10.0.0.0/8", "10.0.0.1/8"), status: metav1.ConditionFalse,
			reason: ReasonInvalidDestination,
			msg:    `EgressNATPolicy "p": spec.destinations[1].cidr: CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"; the policy is skipped`},
		{name: "not a cidr", obj: policy("p", "NoSNAT", "10.0.0.0"), status: metav1.ConditionFalse,
			reason: ReasonInvalidDestination,
			msg:    `EgressNATPolicy "p": spec.destinations[0].cidr: CIDR "10.0.0.0" could not be parsed, invalid CIDR address: 10.0.0.0; the policy is skipped`},
		{name: "other action", obj: policy("p", "SNAT", "10.0.0.0/8"), status: metav1.ConditionFalse,
			reason: ReasonUnsupportedAction, msg: `spec.action "SNAT" is not supported, want "NoSNAT"; the policy is skipped`},
		{name: "no spec", obj: &unstructured.Unstructured{Object: map[string]any{"metadata": map[string]any{"name": "p"}}},
			status: metav1.ConditionFalse, reason: ReasonUnsupportedAction, msg: `spec.action "" is not supported, want "NoSNAT"; the policy is skipped`},
		{name: "destination not an object", obj: &unstructured.Unstructured{Object: map[string]any{
			"metadata": map[string]any{"name": "p"},
			"spec":     map[string]any{"action": "NoSNAT", "destinations": []any{"10.0.0.0/8"}},
		}}, status: metav1.ConditionFalse, reason: ReasonInvalidSpec, msg: "spec.destinations[0] is not an object; the policy is skipped"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.obj.SetGeneration(3)
			v := judge(tt.obj)
			c := v.condition
			if c.Type != ConditionValid || c.Status != tt.status || c.Reason != tt.reason || c.Message != tt.msg || c.ObservedGeneration != 3 {
				t.Errorf("condition %+v\nwant status %s reason %s message %q generation 3", c, tt.status, tt.reason, tt.msg)
			}
			var got []string
			for _, p := range v.policy.Destinations {
				got = append(got, p.String())
			}
			if !slices.Equal(got, tt.dests) {
				t.Errorf("destinations %v, want %v", got, tt.dests)
			}
		})
	}
}

func TestNonMasqueradeCIDRs(t *testing.T) {
	verdicts := []verdict{
		judge(policy("a", "NoSNAT", "192.168.0.0/16", "10.0.0.0/8", "fd00::/8")),
		judge(policy("b", "NoSNAT", "10.0.0.0/8", "10.0.0.0/16", "172.16.0.0/12")),
		judge(policy("bad", "NoSNAT", "100.64.0.0/10", "1.2.3.4/8")), // skipped whole
	}
	got := nonMasqueradeCIDRs(verdicts)
	want := []string{"10.0.0.0/8", "10.0.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestRenderAgentConfig(t *testing.T) {
	cidrs := []string{"10.0.0.0/8", "fd00::/8"}
	tests := []struct {
		name    string
		current string
		exists  bool
		want    string
		changed bool
		note    bool
	}{
		{name: "no configmap yet", exists: false, changed: true,
			want: "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
		{name: "configmap without the key", exists: true, changed: true,
			want: "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
		{name: "operator fields are kept", exists: true, changed: true,
			current: "# hand written\nmasqLinkLocal: true\nresyncInterval: 60s\nnonMasqueradeCIDRs: [1.0.0.0/8]\n",
			want:    "masqLinkLocal: true\nnonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\nresyncInterval: 60s\n"},
		{name: "same list in other formatting is not rewritten", exists: true, changed: false,
			current: "nonMasqueradeCIDRs: [\"10.0.0.0/8\", fd00::/8]  # ours\n",
			want:    "nonMasqueradeCIDRs: [\"10.0.0.0/8\", fd00::/8]  # ours\n"},
		{name: "same list, different order is rewritten", exists: true, changed: true,
			current: "nonMasqueradeCIDRs: [fd00::/8, 10.0.0.0/8]\n",
			want:    "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
		{name: "broken text is replaced", exists: true, changed: true, note: true,
			current: "nonMasqueradeCIDRs: [10.0.0.0/8\n",
			want:    "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
		{name: "comments only", exists: true, changed: true,
			current: "# nothing yet\n",
			want:    "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
		{name: "a list is not an object", exists: true, changed: true, note: true,
			current: "- 10.0.0.0/8\n",
			want:    "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, changed, note, err := renderAgentConfig(tt.current, tt.exists, cidrs)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want || changed != tt.changed || (note != "") != tt.note {
				t.Errorf("got (%q, %v, note %q), want (%q, %v, note %v)", got, changed, note, tt.want, tt.changed, tt.note)
			}
		})
	}
	empty, _, _, err := renderAgentConfig("", false, nil)
	if err != nil || empty != "nonMasqueradeCIDRs: []\n" {
		t.Errorf("no destinations: got %q, %v; want an explicit empty list", empty, err)
	}
}
