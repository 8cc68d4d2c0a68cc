package kube

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"
)

var testConfigMap = types.NamespacedName{Namespace: "kube-system", Name: "ip-masq-agent"}

// fakeCluster is a controller running against fake clients.
type fakeCluster struct {
	c        *EgressController
	client   *fake.Clientset
	dyn      *dynamicfake.FakeDynamicClient
	recorder *record.FakeRecorder
}

func startFake(t *testing.T, cluster []netip.Prefix, objs ...runtime.Object) *fakeCluster {
	t.Helper()
	return startFakeWith(t, cluster, nil, objs...)
}

// startFakeWith is startFake with a hook that can add reactors to the
// clientset before the controller starts.
func startFakeWith(t *testing.T, cluster []netip.Prefix, hook func(*fake.Clientset), objs ...runtime.Object) *fakeCluster {
	t.Helper()
	return startFakeOptions(t, EgressOptions{ClusterCIDRs: cluster}, hook, objs...)
}

// startFakeOptions is startFakeWith with the controller's options; the
// ConfigMap and the recorder are always the test's.
func startFakeOptions(t *testing.T, opts EgressOptions, hook func(*fake.Clientset), objs ...runtime.Object) *fakeCluster {
	t.Helper()
	var policies, core []runtime.Object
	for _, o := range objs {
		if _, ok := o.(*unstructured.Unstructured); ok {
			policies = append(policies, o)
		} else {
			core = append(core, o)
		}
	}
	f := &fakeCluster{
		client: fake.NewClientset(core...),
		dyn: dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
			map[schema.GroupVersionResource]string{EgressPolicyResource: "EgressNATPolicyList"}, policies...),
		recorder: record.NewFakeRecorder(100),
	}
	f.dyn.PrependReactor("update", EgressPolicyResource.Resource, statusSubresource(f.dyn.Tracker()))
	if hook != nil {
		hook(f.client)
	}
	opts.ConfigMap = testConfigMap
	opts.Recorder = f.recorder
	c, err := NewEgressController(f.client, f.dyn, opts)
	if err != nil {
		t.Fatal(err)
	}
	f.c = c
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return f
}

// statusSubresource makes the fake dynamic client keep spec and status
// apart as the API server does for a CRD with a status subresource: an
// update of the status changes only the status, and an update of the
// object keeps the stored status. Without it the fake replaces the whole
// object, so a condition written from a stale cache would undo a test's
// edit of the spec.
func statusSubresource(tracker k8stesting.ObjectTracker) k8stesting.ReactionFunc {
	return func(action k8stesting.Action) (bool, runtime.Object, error) {
		update, ok := action.(k8stesting.UpdateAction)
		if !ok {
			return false, nil, nil
		}
		submitted, ok := update.GetObject().(*unstructured.Unstructured)
		if !ok {
			return false, nil, nil
		}
		gvr := action.GetResource()
		current, err := tracker.Get(gvr, "", submitted.GetName())
		if err != nil {
			return true, nil, err
		}
		stored := current.(*unstructured.Unstructured).DeepCopy()
		kept := submitted.DeepCopy()
		if action.GetSubresource() == "status" {
			stored.Object["status"] = kept.Object["status"]
			kept = stored
		} else if status, ok := stored.Object["status"]; ok {
			kept.Object["status"] = status
		} else {
			delete(kept.Object, "status")
		}
		if err := tracker.Update(gvr, kept, ""); err != nil {
			return true, nil, err
		}
		return true, kept, nil
	}
}

// synced reports whether the controller's caches hold exactly what the
// fake clients store, so that a reconciliation now would work from the
// current state.
func (f *fakeCluster) synced(ctx context.Context) (bool, error) {
	list, err := f.dyn.Resource(EgressPolicyResource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return false, err
	}
	cached := map[string]any{}
	for _, item := range f.c.policyInformer.GetStore().List() {
		cached[item.(*unstructured.Unstructured).GetName()] = item.(*unstructured.Unstructured).Object
	}
	if len(cached) != len(list.Items) {
		return false, nil
	}
	for _, item := range list.Items {
		if !reflect.DeepEqual(cached[item.GetName()], item.Object) {
			return false, nil
		}
	}
	stored, err := f.client.CoreV1().ConfigMaps(testConfigMap.Namespace).Get(ctx, testConfigMap.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		stored, err = nil, nil
	}
	if err != nil {
		return false, err
	}
	cm, err := f.c.configMaps.ConfigMaps(testConfigMap.Namespace).Get(testConfigMap.Name)
	if apierrors.IsNotFound(err) {
		cm, err = nil, nil
	}
	return err == nil && reflect.DeepEqual(cm, stored), err
}

// agentConfig returns the ConfigMap's agent config, "" when absent.
func (f *fakeCluster) agentConfig(ctx context.Context) (string, error) {
	cm, err := f.client.CoreV1().ConfigMaps(testConfigMap.Namespace).Get(ctx, testConfigMap.Name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return cm.Data[AgentConfigKey], nil
}

func (f *fakeCluster) waitConfig(t *testing.T, want string) {
	t.Helper()
	var got string
	waitFor(t, 10*time.Second, "configmap content", func(ctx context.Context) (bool, error) {
		var err error
		got, err = f.agentConfig(ctx)
		return got == want, err
	})
}

func (f *fakeCluster) condition(ctx context.Context, name string) (metav1.Condition, error) {
	obj, err := f.dyn.Resource(EgressPolicyResource).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return metav1.Condition{}, err
	}
	conds, err := conditions(obj)
	if err != nil {
		return metav1.Condition{}, err
	}
	for _, c := range conds {
		if c.Type == ConditionValid {
			return c, nil
		}
	}
	return metav1.Condition{}, fmt.Errorf("policy %s has no %s condition", name, ConditionValid)
}

// writes counts the write requests the controller sent to either client.
func (f *fakeCluster) writes() int {
	n := 0
	for _, list := range [][]k8stesting.Action{f.client.Actions(), f.dyn.Actions()} {
		for _, a := range list {
			switch a.GetVerb() {
			case "create", "update", "patch", "delete":
				n++
			}
		}
	}
	return n
}

// settle waits until the controller has finished n more reconciliations.
func (f *fakeCluster) settle(t *testing.T, n int64, kick func()) {
	t.Helper()
	target := f.c.reconciled.Load() + n
	kick()
	waitFor(t, 10*time.Second, "reconciliations", func(ctx context.Context) (bool, error) {
		if f.c.reconciled.Load() < target || f.c.queue.Len() != 0 {
			return false, nil
		}
		return f.synced(ctx)
	})
}

func TestEgressControllerUnion(t *testing.T) {
	cluster := prefixes("10.96.0.0/12", "10.244.0.0/16")
	f := startFake(t, cluster,
		policy("default", "NoSNAT", "10.0.0.0/8", "192.168.0.0/16"),
		policy("extra", "NoSNAT", "203.0.113.0/24", "fd00::/8"),
	)
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n- 203.0.113.0/24\n- fd00::/8\n")

	ctx := t.Context()
	managed, err := f.dyn.Resource(EgressPolicyResource).Get(ctx, f.c.ManagedPolicy(), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("managed policy: %v", err)
	}
	if got := managed.GetLabels()[ManagedByLabel]; got != ManagedByValue {
		t.Errorf("managed policy label %q", got)
	}
	for _, name := range []string{"default", "extra"} {
		waitFor(t, 10*time.Second, name+" condition", func(ctx context.Context) (bool, error) {
			c, err := f.condition(ctx, name)
			return c.Status == metav1.ConditionTrue, err
		})
	}

	// Deleting a policy removes its ranges.
	if err := f.dyn.Resource(EgressPolicyResource).Delete(ctx, "extra", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n")
}

func TestEgressControllerInvalidPolicy(t *testing.T) {
	f := startFake(t, nil,
		policy("good", "NoSNAT", "10.0.0.0/8"),
		policy("misaligned", "NoSNAT", "172.16.0.0/12", "10.0.0.1/8"),
	)
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n")
	var cond metav1.Condition
	waitFor(t, 10*time.Second, "the False condition", func(ctx context.Context) (bool, error) {
		var err error
		cond, err = f.condition(ctx, "misaligned")
		return cond.Status == metav1.ConditionFalse, err
	})
	if cond.Reason != ReasonInvalidDestination || !strings.Contains(cond.Message, `"10.0.0.1/8" is not aligned`) {
		t.Errorf("condition %+v", cond)
	}
	select {
	case ev := <-f.recorder.Events:
		if !strings.HasPrefix(ev, "Warning InvalidDestination ") || !strings.Contains(ev, "10.0.0.1/8") {
			t.Errorf("event %q", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no Warning event")
	}

	// Fixing the policy brings its ranges in and flips the condition.
	ctx := t.Context()
	fixed := policy("misaligned", "NoSNAT", "172.16.0.0/12", "10.0.0.0/8")
	if _, err := f.dyn.Resource(EgressPolicyResource).Update(ctx, fixed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 172.16.0.0/12\n")
	waitFor(t, 10*time.Second, "the True condition", func(ctx context.Context) (bool, error) {
		c, err := f.condition(ctx, "misaligned")
		return c.Status == metav1.ConditionTrue, err
	})
}

func TestEgressControllerRestoresManagedPolicy(t *testing.T) {
	cluster := prefixes("10.244.0.0/16")
	f := startFake(t, cluster, policy("default", "NoSNAT", "10.0.0.0/8"))
	want := "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.244.0.0/16\n"
	f.waitConfig(t, want)
	ctx := t.Context()
	res := f.dyn.Resource(EgressPolicyResource)
	name := f.c.ManagedPolicy()

	edited := policy(name, "NoSNAT", "10.244.0.0/16", "0.0.0.0/0")
	if _, err := res.Update(ctx, edited, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the edit undone", func(ctx context.Context) (bool, error) {
		obj, err := res.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		dests, _, _ := unstructured.NestedSlice(obj.Object, "spec", "destinations")
		return len(dests) == 1, nil
	})
	f.waitConfig(t, want)

	if err := res.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the managed policy back", func(ctx context.Context) (bool, error) {
		_, err := res.Get(ctx, name, metav1.GetOptions{})
		return err == nil, nil
	})
	f.waitConfig(t, want)
}

func TestEgressControllerWritesOnlyOnChange(t *testing.T) {
	existing := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: testConfigMap.Namespace, Name: testConfigMap.Name},
		Data: map[string]string{
			AgentConfigKey: "masqLinkLocal: true\nnonMasqueradeCIDRs: [192.0.2.0/24]\n",
			"notes":        "kept as is",
		},
	}
	f := startFake(t, prefixes("10.244.0.0/16"), existing, policy("default", "NoSNAT", "10.0.0.0/8"))
	f.waitConfig(t, "masqLinkLocal: true\nnonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.244.0.0/16\n")
	ctx := t.Context()
	waitFor(t, 10*time.Second, "conditions on both policies", func(ctx context.Context) (bool, error) {
		for _, name := range []string{"default", f.c.ManagedPolicy()} {
			if c, err := f.condition(ctx, name); err != nil || c.Status != metav1.ConditionTrue {
				return false, err
			}
		}
		return true, nil
	})
	cm, err := f.client.CoreV1().ConfigMaps(testConfigMap.Namespace).Get(ctx, testConfigMap.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data["notes"] != "kept as is" {
		t.Errorf("other data keys lost: %v", cm.Data)
	}

	// Let the controller see its own writes, then poke it: a steady state
	// must produce no further writes.
	f.settle(t, 1, func() { f.c.queue.Add(syncKey) })
	before := f.writes()
	for range 3 {
		f.settle(t, 1, func() { f.c.queue.Add(syncKey) })
	}
	if after := f.writes(); after != before {
		t.Errorf("steady state wrote %d times", after-before)
	}
}

func TestNewEgressControllerOptions(t *testing.T) {
	client := fake.NewClientset()
	dyn := dynamicfake.NewSimpleDynamicClient(runtime.NewScheme())
	tests := []struct {
		name string
		opts EgressOptions
	}{
		{name: "no configmap", opts: EgressOptions{}},
		{name: "no namespace", opts: EgressOptions{ConfigMap: types.NamespacedName{Name: "x"}}},
		{name: "host bits", opts: EgressOptions{ConfigMap: testConfigMap, ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/8")}}},
		{name: "zero prefix", opts: EgressOptions{ConfigMap: testConfigMap, ClusterCIDRs: []netip.Prefix{{}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewEgressController(client, dyn, tt.opts); err == nil {
				t.Error("accepted")
			}
		})
	}
}

// The controller's metrics count reconciliations by result and say when
// the ConfigMap last agreed with the policies.
func TestEgressControllerMetrics(t *testing.T) {
	f := startFake(t, prefixes("10.96.0.0/12"), policy("default", "NoSNAT", "10.0.0.0/8"))
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n")
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(f.c)
	// sample sums the series of name whose labels include label (if any).
	sample := func(name, label string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var v float64
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				if label == "" || slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetValue() == label }) {
					v += m.GetGauge().GetValue() + m.GetCounter().GetValue()
				}
			}
		}
		return v
	}
	waitFor(t, 10*time.Second, "a successful reconcile counted", func(context.Context) (bool, error) {
		return sample("nfmasq_egress_controller_reconciles_total", "success") >= 1, nil
	})
	if sample("nfmasq_egress_controller_leading", "") != 1 ||
		sample("nfmasq_egress_controller_last_success_timestamp_seconds", "") < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Error("the running controller is not leading, or has no recent success")
	}
}
