package kube

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/restmapper"

	"github.com/nfmasq/nfmasq/nat"
)

// removeCRDs deletes the CRDs among objs and waits until discovery no
// longer serves their kinds, so the next apply meets a cluster on which
// nfmasq was never installed.
func (s *testServer) removeCRDs(t *testing.T, objs []manifest) {
	t.Helper()
	crds := s.dyn.Resource(apiextensionsv1.SchemeGroupVersion.WithResource("customresourcedefinitions"))
	for _, m := range objs {
		if m.obj.GetKind() != "CustomResourceDefinition" {
			continue
		}
		name := m.obj.GetName()
		if err := crds.Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m.obj.Object, &crd); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 60*time.Second, "CRD "+name+" gone from discovery", func(ctx context.Context) (bool, error) {
			if _, err := crds.Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, err
			}
			groups, err := restmapper.GetAPIGroupResources(s.client.Discovery())
			if err != nil {
				return false, err
			}
			_, err = restmapper.NewDiscoveryRESTMapper(groups).RESTMapping(
				schema.GroupKind{Group: crd.Spec.Group, Kind: crd.Spec.Names.Kind}, crd.Spec.Versions[0].Name)
			return meta.IsNoMatchError(err), nil
		})
	}
}

// TestIntegrationInstallInOneRun is the first `kubectl apply -k deploy/`
// on a cluster without nfmasq: one server-side apply run of everything
// kustomize builds must succeed, and the controller then generates the
// `default` policy that the kustomization cannot hold. It also shows the
// failure this avoids: an EgressNATPolicy in the same run cannot be mapped.
func TestIntegrationInstallInOneRun(t *testing.T) {
	s := apiServer(t)
	ctx := t.Context()
	built, err := kustomizeBuild()
	if err != nil {
		t.Fatal(err)
	}
	example, err := readManifests(filepath.Join(deployDir, "examples", "default-policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("a policy in the same run fails, as it did with kubectl", func(t *testing.T) {
		s.removeCRDs(t, built)
		err := s.applyOneRun(ctx, append(slices.Clone(built), example...))
		if !meta.IsNoMatchError(err) {
			t.Fatalf("apply with the default policy in the run: %v, want a no-match error for EgressNATPolicy", err)
		}
		t.Logf("as expected: %v", err)
	})

	t.Run("deploy/ applies in one run", func(t *testing.T) {
		s.removeCRDs(t, built)
		if err := s.applyOneRun(ctx, built); err != nil {
			t.Fatalf("first apply of kustomize build deploy/: %v", err)
		}
		for _, m := range built {
			if m.obj.GetKind() == "CustomResourceDefinition" {
				if err := waitEstablished(ctx, s.dyn, m.obj.GetName()); err != nil {
					t.Fatal(err)
				}
			}
		}
	})

	// Removing the CRD removed every policy; the example ConfigMap that
	// connect applied would still be there.
	s.resetPolicies(t)
	res := s.dyn.Resource(EgressPolicyResource)
	opts := EgressOptions{ClusterCIDRs: prefixes("10.244.0.0/16"), GenerateDefaultPolicy: true}
	// The controller outlives the subtests: started (and restarted) with
	// the parent's t, whose cleanup stops it.
	parent := t
	_, stop := s.startController(parent, opts)

	t.Run("the controller generates default", func(t *testing.T) {
		s.waitConfig(t, gkeDefaultsAndPods)
		obj, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := destinations(t, obj); !slices.Equal(got, nat.DefaultNonMasqueradeCIDRs(true)) {
			t.Errorf("destinations %v, want GKE's defaults", got)
		}
		if obj.GetLabels()[CreatedByLabel] != ManagedByValue {
			t.Errorf("labels %v", obj.GetLabels())
		}
		s.waitCondition(t, DefaultPolicyName, metav1.ConditionTrue)
	})

	edited := []string{"172.16.0.0/12", "192.168.0.0/16"}
	wantEdited := configOf("10.244.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
	t.Run("an operator's edit stands across a restart", func(t *testing.T) {
		obj, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Object["spec"] = policy("", "NoSNAT", edited...).Object["spec"]
		if _, err := res.Update(ctx, obj, metav1.UpdateOptions{FieldManager: "kubectl-edit"}); err != nil {
			t.Fatal(err)
		}
		s.waitConfig(t, wantEdited)
		s.waitCondition(t, DefaultPolicyName, metav1.ConditionTrue)
		before, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}

		stop()
		c, _ := s.startController(parent, opts)
		waitFor(t, 30*time.Second, "the restarted controller idle", func(context.Context) (bool, error) {
			return c.reconciled.Load() > 0 && c.queue.Len() == 0, nil
		})
		after, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if after.GetUID() != before.GetUID() || after.GetGeneration() != before.GetGeneration() ||
			!slices.Equal(destinations(t, after), edited) {
			t.Errorf("after a restart: uid %s generation %d destinations %v; before: uid %s generation %d destinations %v",
				after.GetUID(), after.GetGeneration(), destinations(t, after), before.GetUID(), before.GetGeneration(), edited)
		}
		s.waitConfig(t, wantEdited)
	})

	t.Run("a deletion brings the defaults back", func(t *testing.T) {
		old, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Delete(ctx, DefaultPolicyName, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "a new default policy", func(ctx context.Context) (bool, error) {
			obj, err := res.Get(ctx, DefaultPolicyName, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return err == nil && obj.GetUID() != old.GetUID(), err
		})
		s.waitConfig(t, gkeDefaultsAndPods)
	})
}
