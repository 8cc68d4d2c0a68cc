package kube

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"

	"github.com/nfmasq/nfmasq/nat"
)

// configOf is the agent config the controller writes for cidrs (already
// in the controller's order).
func configOf(cidrs ...string) string {
	return "nonMasqueradeCIDRs:\n- " + strings.Join(cidrs, "\n- ") + "\n"
}

// gkeDefaultsAndPods is GKE's default ranges plus the pod range
// 10.244.0.0/16, in the controller's order (by address).
var gkeDefaultsAndPods = configOf("10.0.0.0/8", "10.244.0.0/16", "100.64.0.0/10", "172.16.0.0/12",
	"192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
	"198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4")

func TestDefaultPolicy(t *testing.T) {
	p := DefaultPolicy()
	if p.GetName() != DefaultPolicyName || p.GetLabels()[CreatedByLabel] != ManagedByValue {
		t.Errorf("name %q labels %v", p.GetName(), p.GetLabels())
	}
	if _, ok := p.GetLabels()[ManagedByLabel]; ok {
		t.Errorf("labels %v: the operator owns the default policy's spec, not the controller", p.GetLabels())
	}
	v := judge(p)
	if v.condition.Status != metav1.ConditionTrue {
		t.Fatalf("the generated policy is judged %+v", v.condition)
	}
	var got []string
	for _, d := range v.policy.Destinations {
		got = append(got, d.String())
	}
	if want := nat.DefaultNonMasqueradeCIDRs(true); !slices.Equal(got, want) {
		t.Errorf("destinations %v, want GKE's defaults %v in their order", got, want)
	}

	// deploy/examples/default-policy.yaml documents what the controller
	// generates; it must say exactly that.
	data, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", "default-policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var example map[string]any
	if err := yaml.Unmarshal(data, &example); err != nil {
		t.Fatal(err)
	}
	// Through JSON on both sides, so numbers and maps compare alike.
	generated, err := yaml.Marshal(p.Object)
	if err != nil {
		t.Fatal(err)
	}
	var want map[string]any
	if err := yaml.Unmarshal(generated, &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(example, want) {
		t.Errorf("deploy/examples/default-policy.yaml:\n%s\nthe controller generates:\n%s", data, generated)
	}
}

// policyWrites returns the names of the policies the controller created
// and of those whose object (not status) it updated.
func policyWrites(f *fakeCluster) (created, updated []string) {
	for _, a := range f.dyn.Actions() {
		if a.GetResource() != EgressPolicyResource || a.GetSubresource() != "" {
			continue
		}
		// By verb: CreateAction and UpdateAction are the same interface.
		obj, ok := a.(k8stesting.CreateAction)
		if !ok {
			continue
		}
		name := obj.GetObject().(*unstructured.Unstructured).GetName()
		switch a.GetVerb() {
		case "create":
			created = append(created, name)
		case "update":
			updated = append(updated, name)
		}
	}
	return created, updated
}

func destinations(t *testing.T, obj *unstructured.Unstructured) []string {
	t.Helper()
	items, _, err := unstructured.NestedSlice(obj.Object, "spec", "destinations")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, item := range items {
		out = append(out, item.(map[string]any)["cidr"].(string))
	}
	return out
}

// TestEgressControllerGeneratesDefaultPolicy: with GenerateDefaultPolicy
// a missing default policy is created with GKE's ranges, one that exists
// is left exactly as it is, and without the option none is made.
func TestEgressControllerGeneratesDefaultPolicy(t *testing.T) {
	cluster := prefixes("10.244.0.0/16")
	tests := []struct {
		name     string
		generate bool
		existing []runtime.Object
		// wantConfig is the agent's config once the controller settles;
		// wantDests the default policy's destinations, nil for none.
		wantConfig  string
		wantDests   []string
		wantCreated bool
	}{
		{
			name: "missing: generated", generate: true,
			wantConfig: gkeDefaultsAndPods, wantDests: nat.DefaultNonMasqueradeCIDRs(true), wantCreated: true,
		},
		{
			name: "an operator's edit is kept", generate: true,
			existing:   []runtime.Object{policy(DefaultPolicyName, "NoSNAT", "192.0.2.0/24", "10.0.0.0/8")},
			wantConfig: configOf("10.0.0.0/8", "10.244.0.0/16", "192.0.2.0/24"),
			wantDests:  []string{"192.0.2.0/24", "10.0.0.0/8"},
		},
		{
			name: "emptied by the operator: kept empty", generate: true,
			existing:   []runtime.Object{policy(DefaultPolicyName, "NoSNAT")},
			wantConfig: configOf("10.244.0.0/16"),
			wantDests:  []string{},
		},
		{
			name: "an invalid default is reported, not replaced", generate: true,
			existing:   []runtime.Object{policy(DefaultPolicyName, "NoSNAT", "10.0.0.1/8")},
			wantConfig: configOf("10.244.0.0/16"),
			wantDests:  []string{"10.0.0.1/8"},
		},
		{
			name:       "not asked for: none",
			wantConfig: configOf("10.244.0.0/16"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := startFakeOptions(t, EgressOptions{ClusterCIDRs: cluster, GenerateDefaultPolicy: tt.generate}, nil, tt.existing...)
			f.waitConfig(t, tt.wantConfig)
			// Let the controller see its own writes and go idle.
			f.settle(t, 1, func() { f.c.queue.Add(syncKey) })

			obj, err := f.dyn.Resource(EgressPolicyResource).Get(t.Context(), DefaultPolicyName, metav1.GetOptions{})
			switch {
			case tt.wantDests == nil && err == nil:
				t.Errorf("a default policy exists: %v", obj.Object)
			case tt.wantDests != nil && err != nil:
				t.Fatalf("default policy: %v", err)
			case tt.wantDests != nil:
				if got := destinations(t, obj); !slices.Equal(got, tt.wantDests) {
					t.Errorf("destinations %v, want %v", got, tt.wantDests)
				}
			}
			created, updated := policyWrites(f)
			if got := slices.Contains(created, DefaultPolicyName); got != tt.wantCreated {
				t.Errorf("created %v: default created %v, want %v", created, got, tt.wantCreated)
			}
			if slices.Contains(updated, DefaultPolicyName) {
				t.Errorf("the controller updated the default policy's object: %v", updated)
			}
		})
	}
}

// TestEgressControllerDefaultPolicyLifecycle: the operator edits the
// generated policy and the edit stands; deleting it brings the defaults
// back at once.
func TestEgressControllerDefaultPolicyLifecycle(t *testing.T) {
	f := startFakeOptions(t, EgressOptions{ClusterCIDRs: prefixes("10.244.0.0/16"), GenerateDefaultPolicy: true}, nil)
	f.waitConfig(t, gkeDefaultsAndPods)
	// The managed policy's Restored event comes too, in either order.
	deadline := time.After(10 * time.Second)
	for generated := false; !generated; {
		select {
		case ev := <-f.recorder.Events:
			generated = strings.HasPrefix(ev, "Normal "+ReasonGenerated+" ")
		case <-deadline:
			t.Fatal("no Generated event")
		}
	}

	waitFor(t, 10*time.Second, "the default policy's condition", func(ctx context.Context) (bool, error) {
		c, err := f.condition(ctx, DefaultPolicyName)
		return c.Status == metav1.ConditionTrue, err
	})
	f.settle(t, 1, func() { f.c.queue.Add(syncKey) })

	ctx := t.Context()
	res := f.dyn.Resource(EgressPolicyResource)
	edited := DefaultPolicy()
	edited.Object["spec"] = policy("", "NoSNAT", "172.16.0.0/12").Object["spec"]
	if _, err := res.Update(ctx, edited, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.waitConfig(t, configOf("10.244.0.0/16", "172.16.0.0/12"))
	f.settle(t, 1, func() { f.c.queue.Add(syncKey) })
	obj, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := destinations(t, obj); !slices.Equal(got, []string{"172.16.0.0/12"}) {
		t.Errorf("the operator's edit was undone: destinations %v", got)
	}

	if err := res.Delete(ctx, DefaultPolicyName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the default policy generated again", func(ctx context.Context) (bool, error) {
		obj, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		return err == nil && len(destinations(t, obj)) == len(nat.DefaultNonMasqueradeCIDRs(true)), nil
	})
	f.waitConfig(t, gkeDefaultsAndPods)
}
