package kube

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nfmasq/nfmasq/nat"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/yaml"
)

// EgressPolicyResource is the EgressNATPolicy resource the controller
// watches (cluster-scoped).
var EgressPolicyResource = schema.GroupVersionResource{Group: "networking.gke.io", Version: "v1", Resource: "egressnatpolicies"}

// Names the controller writes into the objects it owns or judges.
const (
	// ConditionValid is the status condition type on every policy: True
	// when its destinations are in the agent's config, False (with the
	// reason) when the policy is skipped.
	ConditionValid = "Valid"

	// ReasonValid, ReasonUnsupportedAction, ReasonInvalidDestination and
	// ReasonInvalidSpec are the condition's reasons; the last three are
	// also the reasons of the Warning events.
	ReasonValid              = "Valid"
	ReasonUnsupportedAction  = "UnsupportedAction"
	ReasonInvalidDestination = "InvalidDestination"
	ReasonInvalidSpec        = "InvalidSpec"

	// ReasonRestored is the Normal event on the managed policy after the
	// controller created it again or undid an edit.
	ReasonRestored = "Restored"
	// ReasonGenerated is the Normal event on the default policy after the
	// controller created it.
	ReasonGenerated = "Generated"

	// DefaultPolicyName is the policy holding GKE's default ranges, which
	// the controller generates (EgressOptions.GenerateDefaultPolicy).
	DefaultPolicyName = "default"

	// ManagedByLabel marks the objects whose content the controller owns:
	// the managed policy and the ConfigMap.
	ManagedByLabel = "app.kubernetes.io/managed-by"
	// CreatedByLabel marks the default policy, which the controller
	// creates but the operator owns.
	CreatedByLabel = "app.kubernetes.io/created-by"
	// ManagedByValue is the value of ManagedByLabel and CreatedByLabel,
	// and the controller's field manager and event source.
	ManagedByValue = "nfmasq-egress-controller"

	// AgentConfigKey is the data key of the agent's ConfigMap that the
	// DaemonSet mounts as /etc/config/ip-masq-agent (key "config", as for
	// ip-masq-agent on GKE).
	AgentConfigKey = "config"

	// nonMasqueradeKey is the one field of the agent's config that the
	// controller owns; the others (masqLinkLocal, resyncInterval, ...) are
	// the operator's and are kept.
	nonMasqueradeKey = "nonMasqueradeCIDRs"
)

// ManagedPolicyName returns the name of the policy holding the cluster's
// own ranges, "gke-<hash>-1": the hash is a short digest of the set (order
// and duplicates do not matter), so a cluster keeps its name across
// restarts of the controller and a change of ranges gives a new name.
func ManagedPolicyName(clusterCIDRs []netip.Prefix) string {
	texts := prefixTexts(clusterCIDRs)
	sum := sha256.Sum256([]byte(strings.Join(texts, ",")))
	return "gke-" + hex.EncodeToString(sum[:])[:10] + "-1"
}

// prefixTexts returns the canonical texts of prefixes, sorted (IPv4
// before IPv6, then by address and length) and without duplicates.
func prefixTexts(prefixes []netip.Prefix) []string {
	ps := make([]netip.Prefix, 0, len(prefixes))
	for _, p := range prefixes {
		ps = append(ps, p.Masked())
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	ps = slices.Compact(ps)
	texts := make([]string, len(ps))
	for i, p := range ps {
		texts[i] = p.String()
	}
	return texts
}

// managedPolicySpec is the spec of the managed policy as it must be.
func managedPolicySpec(clusterCIDRs []netip.Prefix) map[string]any {
	texts := prefixTexts(clusterCIDRs)
	dests := make([]any, len(texts))
	for i, s := range texts {
		dests[i] = map[string]any{"cidr": s}
	}
	return map[string]any{"action": nat.EgressPolicyNoSNAT, "destinations": dests}
}

// DefaultPolicy returns the default policy as the controller generates it:
// GKE's default non-masquerade ranges in GKE's order, action NoSNAT.
// Link-local 169.254.0.0/16 is not in it: the agent keeps the pod address
// for it unless masqLinkLocal is set, as on GKE.
func DefaultPolicy() *unstructured.Unstructured {
	cidrs := nat.DefaultNonMasqueradeCIDRs(true)
	dests := make([]any, len(cidrs))
	for i, s := range cidrs {
		dests[i] = map[string]any{"cidr": s}
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": EgressPolicyResource.GroupVersion().String(),
		"kind":       "EgressNATPolicy",
		"metadata": map[string]any{
			"name":   DefaultPolicyName,
			"labels": map[string]any{CreatedByLabel: ManagedByValue},
		},
		"spec": map[string]any{"action": nat.EgressPolicyNoSNAT, "destinations": dests},
	}}
}

// verdict is the controller's judgement of one policy.
type verdict struct {
	policy    nat.EgressPolicy // valid only when cond.Status is True
	condition metav1.Condition
}

// judge validates one EgressNATPolicy object with the agent's own rules
// (nat.NewEgressPolicy), so that what the controller accepts is exactly
// what the agent would accept from a file.
func judge(obj *unstructured.Unstructured) verdict {
	invalid := func(reason, msg string) verdict {
		return verdict{condition: metav1.Condition{
			Type: ConditionValid, Status: metav1.ConditionFalse, Reason: reason,
			Message: msg, ObservedGeneration: obj.GetGeneration(),
		}}
	}
	action, _, err := unstructured.NestedString(obj.Object, "spec", "action")
	if err != nil {
		return invalid(ReasonInvalidSpec, "spec.action: "+err.Error())
	}
	if action != nat.EgressPolicyNoSNAT {
		return invalid(ReasonUnsupportedAction, fmt.Sprintf("spec.action %q is not supported, want %q; the policy is skipped", action, nat.EgressPolicyNoSNAT))
	}
	items, _, err := unstructured.NestedSlice(obj.Object, "spec", "destinations")
	if err != nil {
		return invalid(ReasonInvalidSpec, "spec.destinations: "+err.Error())
	}
	cidrs := make([]string, len(items))
	for i, item := range items {
		m, ok := item.(map[string]any)
		if !ok {
			return invalid(ReasonInvalidSpec, fmt.Sprintf("spec.destinations[%d] is not an object; the policy is skipped", i))
		}
		cidrs[i], ok = m["cidr"].(string)
		if !ok {
			return invalid(ReasonInvalidSpec, fmt.Sprintf("spec.destinations[%d].cidr is not a string; the policy is skipped", i))
		}
	}
	p, err := nat.NewEgressPolicy(obj.GetName(), action, cidrs)
	if err != nil {
		return invalid(ReasonInvalidDestination, err.Error()+"; the policy is skipped")
	}
	return verdict{policy: p, condition: metav1.Condition{
		Type: ConditionValid, Status: metav1.ConditionTrue, Reason: ReasonValid,
		Message:            fmt.Sprintf("%d destinations keep the pod address", len(p.Destinations)),
		ObservedGeneration: obj.GetGeneration(),
	}}
}

// nonMasqueradeCIDRs is the agent's list: the union of the destinations
// of the valid policies, canonical, sorted and without duplicates.
func nonMasqueradeCIDRs(verdicts []verdict) []string {
	var all []netip.Prefix
	for _, v := range verdicts {
		if v.condition.Status == metav1.ConditionTrue {
			all = append(all, v.policy.Destinations...)
		}
	}
	return prefixTexts(all)
}

// renderAgentConfig returns the agent's config text with nonMasqueradeCIDRs
// set to cidrs and every other field of current kept, and whether that
// differs from current. Text that is not a YAML object (a broken hand edit)
// is replaced whole, since the agent cannot read it anyway; the returned
// note says so for the log. Kept fields lose their comments and order:
// the text is re-serialised with sorted keys.
func renderAgentConfig(current string, exists bool, cidrs []string) (text string, changed bool, note string, err error) {
	fields := map[string]any{}
	if strings.TrimSpace(current) != "" {
		if uerr := yaml.Unmarshal([]byte(current), &fields); uerr != nil {
			fields = map[string]any{}
			note = fmt.Sprintf("the existing config is not a YAML object and is replaced (%v)", uerr)
		} else if fields == nil {
			fields = map[string]any{} // "null" or comments only: nothing to keep
		}
	}
	if exists && note == "" && sameStrings(fields[nonMasqueradeKey], cidrs) {
		return current, false, "", nil
	}
	list := make([]any, len(cidrs))
	for i, s := range cidrs {
		list[i] = s
	}
	fields[nonMasqueradeKey] = list
	out, err := yaml.Marshal(fields)
	if err != nil {
		return "", false, "", fmt.Errorf("agent config: %w", err)
	}
	return string(out), true, note, nil
}

// sameStrings reports whether v, a decoded YAML value, is exactly the
// list want.
func sameStrings(v any, want []string) bool {
	list, ok := v.([]any)
	if !ok || len(list) != len(want) {
		return false
	}
	for i, x := range list {
		if s, ok := x.(string); !ok || s != want[i] {
			return false
		}
	}
	return true
}
