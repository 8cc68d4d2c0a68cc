package kube

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/nfmasq/nfmasq/nat"
)

// masqPolicy returns a MasqueradePolicy object from its spec in YAML.
func masqPolicy(t *testing.T, name, spec string) *unstructured.Unstructured {
	t.Helper()
	obj := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte("apiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: "+name+"}\nspec:\n"+spec), &obj.Object); err != nil {
		t.Fatal(err)
	}
	return obj
}

// The API server rejects what the CRD's schema and CEL rules can: a
// CIDR's syntax and host bits, an except outside its CIDR, the action,
// selector operators.
func TestIntegrationMasqueradePolicyValidation(t *testing.T) {
	s := apiServer(t)
	res := s.dyn.Resource(MasqueradePolicyResource)
	for _, tt := range []struct{ name, spec, want string }{
		{"bad-cidr", "  action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/33}]", "CIDR"},
		{"host-bits", "  action: NoSNAT\n  destinations: [{cidr: 10.0.0.1/8}]", "host bits"},
		{"except-outside", "  action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]", "inside cidr"},
		{"except-equal", "  action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]", "inside cidr"},
		{"except-family", "  action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8, except: ['fd00::/16']}]", "inside cidr"},
		{"action", "  action: Drop\n  destinations: [{cidr: 10.0.0.0/8}]", "Unsupported value"},
		{"no-destinations", "  action: NoSNAT\n  destinations: []", "destinations"},
		{"operator", "  action: NoSNAT\n  podSelector: {matchExpressions: [{key: a, operator: Near}]}\n  destinations: [{cidr: 10.0.0.0/8}]", "Unsupported value"},
		{"in-without-values", "  action: NoSNAT\n  podSelector: {matchExpressions: [{key: a, operator: In}]}\n  destinations: [{cidr: 10.0.0.0/8}]", "need values"},
	} {
		_, err := res.Create(t.Context(), masqPolicy(t, "invalid-"+tt.name, tt.spec), metav1.CreateOptions{})
		if err == nil {
			_ = res.Delete(context.Background(), "invalid-"+tt.name, metav1.DeleteOptions{})
			t.Errorf("%s: accepted", tt.name)
			continue
		}
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v; want Invalid about %q", tt.name, err, tt.want)
		}
	}
	ok := masqPolicy(t, "valid-"+fmt.Sprint(time.Now().UnixNano()), "  action: NoSNAT\n  namespaceSelector: {matchLabels: {team: a}}\n  destinations: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}, {cidr: '2001:db8::/32'}]")
	if _, err := res.Create(t.Context(), ok, metav1.CreateOptions{}); err != nil {
		t.Fatalf("a valid policy: %v", err)
	}
	_ = res.Delete(context.Background(), ok.GetName(), metav1.DeleteOptions{})
}

// The watcher, as the agent's service account: policies, namespace labels
// and pod labels make the per-pod decisions; both conditions are written;
// a label change on a pod or a namespace re-decides that pod without
// compiling the policies again.
func TestIntegrationMasqueradeWatcher(t *testing.T) {
	s := apiServer(t)
	ctx := t.Context()
	suffix := fmt.Sprint(time.Now().UnixNano() % 1000000)
	node := "mp-node-" + suffix
	res := s.dyn.Resource(MasqueradePolicyResource)
	nsName := "mp-" + suffix
	if _, err := s.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nsName, Labels: map[string]string{"team": "payments"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = s.client.CoreV1().Namespaces().Delete(context.Background(), nsName, metav1.DeleteOptions{})
	})
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if _, err := s.client.CoreV1().ServiceAccounts(nsName).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	billing := mkRunningPod(t, s, nsName, "billing", node, map[string]string{"app": "billing"}, "10.244.9.2")
	mkRunningPod(t, s, nsName, "web", node, map[string]string{"app": "web"}, "10.244.9.3")

	policies := map[string]string{
		"keep-billing-" + suffix: "  namespaceSelector: {matchLabels: {team: payments}}\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [billing]}]}\n  action: NoSNAT\n  destinations: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]",
		"hide-all-" + suffix:     "  action: Masquerade\n  destinations: [{cidr: 203.0.113.0/24}, {cidr: 198.51.100.0/24}]",
		// Valid for the API server, invalid for the agent: a selector
		// key the label parser refuses.
		"bad-key-" + suffix: "  podSelector: {matchLabels: {'-bad-': x}}\n  action: NoSNAT\n  destinations: [{cidr: 192.0.2.0/24}]",
	}
	for name, spec := range policies {
		if _, err := res.Create(ctx, masqPolicy(t, name, spec), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = res.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	}

	client, dyn := s.as(t, agentAccount)
	idx, err := NewPodIndex(client, node, 0)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer idx.Shutdown()
	defer cancel()
	go idx.Run(runCtx)
	// Two agents, as on two nodes: each status change is written once.
	var watchers []*MasqueradeWatcher
	for range 2 {
		w, err := NewMasqueradeWatcher(client, dyn, idx, MasqueradeOptions{
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.9.0/24")}, ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
			Node: node, Logger: testLogger(t), StatusJitter: 50 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		go w.Run(runCtx)
		watchers = append(watchers, w)
	}
	w := watchers[0]
	decide := func(src, dst string) nat.Decision {
		set, _ := w.Workloads().Pod(netip.MustParseAddr(src))
		d, _ := set.Decide(netip.MustParseAddr(dst))
		return d
	}
	waitFor(t, 30*time.Second, "the billing pod's policies", func(context.Context) (bool, error) {
		return w.Workloads() != nil && decide("10.244.9.2", "203.0.113.7").Origin == "hide-all-"+suffix, nil
	})
	// The tie on 203.0.113.0/24: Masquerade wins for billing; in the
	// except range hide-all decides alone; web is not selected by keep.
	for _, c := range []struct{ src, dst, origin string }{
		{"10.244.9.2", "203.0.113.7", "hide-all-" + suffix},
		{"10.244.9.2", "203.0.113.200", "hide-all-" + suffix},
		{"10.244.9.3", "198.51.100.1", "hide-all-" + suffix},
	} {
		if d := decide(c.src, c.dst); d.Origin != c.origin || d.Action != nat.Masquerade {
			t.Errorf("%s → %s: %+v, want Masquerade by %s", c.src, c.dst, d, c.origin)
		}
	}
	if !w.Workloads().Unknown(netip.MustParseAddr("10.244.9.50")) {
		t.Error("an address of the pod range no pod has is not unknown while policies exist")
	}

	cond := func(name, typ string) *metav1.Condition {
		obj, err := res.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		conds, _ := conditions(obj)
		return meta.FindStatusCondition(conds, typ)
	}
	waitFor(t, 30*time.Second, "conditions", func(context.Context) (bool, error) {
		c1, c2, c3 := cond("keep-billing-"+suffix, ConditionConflicting), cond("hide-all-"+suffix, ConditionConflicting), cond("bad-key-"+suffix, ConditionValid)
		return c1 != nil && c1.Status == metav1.ConditionTrue && c2 != nil && c2.Status == metav1.ConditionTrue && c3 != nil && c3.Status == metav1.ConditionFalse, nil
	})
	if c := cond("keep-billing-"+suffix, ConditionConflicting); !strings.Contains(c.Message, "hide-all-"+suffix+" on 203.0.113.0/24") {
		t.Errorf("Conflicting message %q does not name the other policy and range", c.Message)
	}
	if c := cond("bad-key-"+suffix, ConditionValid); c.Reason != ReasonInvalid || !strings.Contains(c.Message, "-bad-") {
		t.Errorf("Valid condition %+v; want Invalid naming the key", c)
	}
	if c := cond("hide-all-"+suffix, ConditionValid); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("hide-all Valid %+v", c)
	}
	// One Warning event per finding, though two agents judged it.
	waitFor(t, 30*time.Second, "events", func(ctx context.Context) (bool, error) {
		evs, err := s.client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		n := 0
		for _, ev := range evs.Items {
			if ev.InvolvedObject.Name == "bad-key-"+suffix && ev.Reason == ReasonInvalid {
				n += int(ev.Count)
			}
		}
		if n > 1 {
			return false, fmt.Errorf("%d Invalid events for one policy", n)
		}
		return n == 1, nil
	})

	// Fix the tie: hide-all now masquerades only 198.51.100.0/24.
	patch := []byte(`{"spec":{"destinations":[{"cidr":"198.51.100.0/24"}]}}`)
	if _, err := res.Patch(ctx, "hide-all-"+suffix, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the edit", func(context.Context) (bool, error) {
		d := decide("10.244.9.2", "203.0.113.7")
		return d.Origin == "keep-billing-"+suffix && d.Action == nat.Passthrough, nil
	})
	waitFor(t, 30*time.Second, "the tie gone", func(context.Context) (bool, error) {
		c := cond("keep-billing-"+suffix, ConditionConflicting)
		return c != nil && c.Status == metav1.ConditionFalse, nil
	})

	// A pod label change: billing becomes web, so keep-billing no longer
	// selects it; no policy compile.
	compiled := w.Policies()
	billing.Labels = map[string]string{"app": "web"}
	if _, err := s.client.CoreV1().Pods(nsName).Update(ctx, billing, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the pod relabelled", func(context.Context) (bool, error) {
		set, known := w.Workloads().Pod(netip.MustParseAddr("10.244.9.2"))
		_, ok := set.Decide(netip.MustParseAddr("203.0.113.7"))
		return known && !ok, nil
	})
	if w.Policies() != compiled {
		t.Error("a pod label change compiled the policies again")
	}
	// A namespace label change: team payments → none; relabel the pod back.
	billing, _ = s.client.CoreV1().Pods(nsName).Get(ctx, billing.Name, metav1.GetOptions{})
	billing.Labels = map[string]string{"app": "billing"}
	if _, err := s.client.CoreV1().Pods(nsName).Update(ctx, billing, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the pod back to billing", func(context.Context) (bool, error) {
		return decide("10.244.9.2", "203.0.113.7").Origin == "keep-billing-"+suffix, nil
	})
	ns, _ := s.client.CoreV1().Namespaces().Get(ctx, nsName, metav1.GetOptions{})
	ns.Labels["team"] = "web"
	if _, err := s.client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the namespace relabelled", func(context.Context) (bool, error) {
		return decide("10.244.9.2", "203.0.113.7").Origin == "", nil
	})

	// Every policy gone: nothing waits for an identity any more.
	for name := range policies {
		if err := res.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "no policies", func(context.Context) (bool, error) {
		return !w.Workloads().Holding(), nil
	})
}

// mkRunningPod creates a Running pod on node, deleted at the test's end.
func mkRunningPod(t *testing.T, s *testServer, ns, name, node string, labels map[string]string, ips ...string) *corev1.Pod {
	t.Helper()
	var addrs []netip.Addr
	for _, ip := range ips {
		addrs = append(addrs, netip.MustParseAddr(ip))
	}
	pod, err := CreateRunningPod(t.Context(), s.client, ns, name, node, labels, addrs...)
	if err != nil {
		t.Fatal(err)
	}
	zero := int64(0)
	t.Cleanup(func() {
		_ = s.client.CoreV1().Pods(ns).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	})
	return pod
}
