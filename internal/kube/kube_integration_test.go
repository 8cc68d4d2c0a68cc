package kube

// Integration tests against a real kube-apiserver and etcd, as started by
// hack/kube-apiserver.sh. They run only with NFMASQ_KUBE=1 (then they must
// not skip): the KUBECONFIG the script prints, or its default location.
// The server must be on a loopback address, so that pointing KUBECONFIG at
// a real cluster by mistake cannot make these tests write to it.
//
// The controller and the agent's informers run as their service accounts
// (impersonated), so the RBAC rules in deploy/ are tested too.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

const (
	deployDir         = "../../deploy"
	testFieldManager  = "nfmasq-integration-test"
	controllerAccount = "system:serviceaccount:kube-system:nfmasq-egress-controller"
	agentAccount      = "system:serviceaccount:kube-system:nfmasq-agent"
	leaseName         = "nfmasq-egress-controller" // the only Lease the controller's Role allows
)

// agentConfigMap is the only ConfigMap the controller's Role allows.
var agentConfigMap = types.NamespacedName{Namespace: "kube-system", Name: "ip-masq-agent"}

// testServer is the API server under test, as its admin.
type testServer struct {
	config *rest.Config
	client kubernetes.Interface
	dyn    dynamic.Interface
}

var (
	serverOnce sync.Once
	server     *testServer
	serverErr  error
)

// apiServer returns the test API server with the deploy/ manifests
// applied, skipping the test unless NFMASQ_KUBE=1.
func apiServer(t *testing.T) *testServer {
	t.Helper()
	if os.Getenv("NFMASQ_KUBE") != "1" {
		t.Skip("needs a test API server: hack/kube-apiserver.sh up, then NFMASQ_KUBE=1")
	}
	serverOnce.Do(func() { server, serverErr = connect() })
	if serverErr != nil {
		t.Fatal(serverErr)
	}
	return server
}

func connect() (*testServer, error) {
	kubeconfig := os.Getenv("KUBECONFIG")
	if kubeconfig == "" {
		run := os.Getenv("NFMASQ_KUBE_RUN")
		if run == "" {
			run = filepath.Join(os.TempDir(), fmt.Sprintf("nfmasq-kube-%d", os.Getuid()))
		}
		kubeconfig = filepath.Join(run, "kubeconfig")
	}
	cfg, err := Config(kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("NFMASQ_KUBE=1 but no test API server (run hack/kube-apiserver.sh up): %w", err)
	}
	u, err := url.Parse(cfg.Host)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(u.Hostname()); (ip == nil || !ip.IsLoopback()) && u.Hostname() != "localhost" {
		return nil, fmt.Errorf("refusing to test against %s: the test API server listens on loopback only", cfg.Host)
	}
	cfg.QPS, cfg.Burst = 200, 400 // the tests' own writes should not queue client-side
	s := &testServer{config: cfg}
	if s.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if s.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := s.applyDeploy(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// as returns clients that act as the named user, with the groups the API
// server gives a service account.
func (s *testServer) as(t *testing.T, user string) (kubernetes.Interface, dynamic.Interface) {
	t.Helper()
	cfg := rest.CopyConfig(s.config)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: user,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"},
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return client, dyn
}

// manifest is one object to apply; from names where it came from.
type manifest struct {
	from string
	obj  *unstructured.Unstructured
}

// kustomizeBuild returns the objects `kubectl apply -k deploy/` applies,
// built by the kustomize library that kubectl embeds, in the order of
// `kustomize build` (legacy order: CRDs and RBAC before workloads).
func kustomizeBuild() ([]manifest, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy
	built, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), deployDir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build deploy/: %w", err)
	}
	var out []manifest
	for _, r := range built.Resources() {
		m, err := r.Map()
		if err != nil {
			return nil, fmt.Errorf("kustomize build deploy/: %s %s: %w", r.GetKind(), r.GetName(), err)
		}
		out = append(out, manifest{from: "kustomize build deploy/", obj: &unstructured.Unstructured{Object: m}})
	}
	return out, nil
}

// readManifests reads every object of the YAML files named.
func readManifests(files ...string) ([]manifest, error) {
	var out []manifest
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var m map[string]any
			if err := dec.Decode(&m); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if len(m) == 0 {
				continue
			}
			out = append(out, manifest{from: filepath.Base(f), obj: &unstructured.Unstructured{Object: m}})
		}
	}
	return out, nil
}

// exampleManifests reads deploy/examples, which an operator applies on
// their own once nfmasq is installed.
func exampleManifests() ([]manifest, error) {
	files, err := filepath.Glob(filepath.Join(deployDir, "examples", "*.yaml"))
	if err != nil {
		return nil, err
	}
	return readManifests(files...)
}

// applyOneRun applies objs server-side the way one `kubectl apply
// --server-side` run does: every kind is mapped through the API discovery
// read once, before anything is applied, so a kind whose CRD is created in
// the same run cannot be mapped; an object that fails is reported and the
// others are still applied. The error joins every failure.
func (s *testServer) applyOneRun(ctx context.Context, objs []manifest) error {
	groups, err := restmapper.GetAPIGroupResources(s.client.Discovery())
	if err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	var errs []error
	for _, m := range objs {
		gvk := m.obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %s %s: %w", m.from, gvk.Kind, m.obj.GetName(), err))
			continue
		}
		var res dynamic.ResourceInterface = s.dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			ns := m.obj.GetNamespace()
			if ns == "" {
				errs = append(errs, fmt.Errorf("%s: %s %s has no namespace", m.from, gvk.Kind, m.obj.GetName()))
				continue
			}
			res = s.dyn.Resource(mapping.Resource).Namespace(ns)
		}
		if _, err := res.Apply(ctx, m.obj.GetName(), m.obj,
			metav1.ApplyOptions{FieldManager: testFieldManager, Force: true}); err != nil {
			errs = append(errs, fmt.Errorf("apply %s: %s %s: %w", m.from, gvk.Kind, m.obj.GetName(), err))
		}
	}
	return errors.Join(errs...)
}

// applyDeploy installs nfmasq as the README says, `kubectl apply -k
// deploy/` in one run, waits for the CRDs to be served, and then applies
// the examples in a second run, as an operator would.
func (s *testServer) applyDeploy(ctx context.Context) error {
	built, err := kustomizeBuild()
	if err != nil {
		return err
	}
	if err := s.applyOneRun(ctx, built); err != nil {
		return fmt.Errorf("kubectl apply -k deploy/: %w", err)
	}
	for _, m := range built {
		if m.obj.GetKind() == "CustomResourceDefinition" {
			if err := waitEstablished(ctx, s.dyn, m.obj.GetName()); err != nil {
				return err
			}
		}
	}
	examples, err := exampleManifests()
	if err != nil {
		return err
	}
	if err := s.applyOneRun(ctx, examples); err != nil {
		return fmt.Errorf("kubectl apply -f deploy/examples: %w", err)
	}
	return nil
}

func waitEstablished(ctx context.Context, dyn dynamic.Interface, name string) error {
	crdResource := apiextensionsv1.SchemeGroupVersion.WithResource("customresourcedefinitions")
	for {
		obj, err := dyn.Resource(crdResource).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("crd %s: %w", name, err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, &crd); err != nil {
			return err
		}
		for _, c := range crd.Status.Conditions {
			if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
				return nil
			}
		}
		// Watching one object would need its own informer; the CRD is
		// established within a second, so a short poll is the simpler wait.
		select {
		case <-ctx.Done():
			return fmt.Errorf("crd %s not established: %w", name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// resetPolicies deletes every EgressNATPolicy and the agent's ConfigMap,
// so a test sees only the objects it makes.
func (s *testServer) resetPolicies(t *testing.T) {
	t.Helper()
	ctx := t.Context()
	res := s.dyn.Resource(EgressPolicyResource)
	if err := res.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}
	err := s.client.CoreV1().ConfigMaps(agentConfigMap.Namespace).Delete(ctx, agentConfigMap.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "no policies left", func(ctx context.Context) (bool, error) {
		list, err := res.List(ctx, metav1.ListOptions{})
		return err == nil && len(list.Items) == 0, err
	})
}

func (s *testServer) createPolicy(t *testing.T, obj *unstructured.Unstructured) {
	t.Helper()
	if _, err := s.dyn.Resource(EgressPolicyResource).Create(t.Context(), obj, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create policy %s: %v", obj.GetName(), err)
	}
}

func (s *testServer) agentConfig(ctx context.Context) (*corev1.ConfigMap, error) {
	return s.client.CoreV1().ConfigMaps(agentConfigMap.Namespace).Get(ctx, agentConfigMap.Name, metav1.GetOptions{})
}

func (s *testServer) waitConfig(t *testing.T, want string) {
	t.Helper()
	var got string
	waitFor(t, 30*time.Second, "configmap content", func(ctx context.Context) (bool, error) {
		cm, err := s.agentConfig(ctx)
		if err != nil {
			return false, err
		}
		got = cm.Data[AgentConfigKey]
		if got != want {
			return false, fmt.Errorf("configmap holds %q, want %q", got, want)
		}
		return true, nil
	})
}

func (s *testServer) waitCondition(t *testing.T, name string, status metav1.ConditionStatus) metav1.Condition {
	t.Helper()
	var cond metav1.Condition
	waitFor(t, 30*time.Second, "policy "+name+" condition "+string(status), func(ctx context.Context) (bool, error) {
		obj, err := s.dyn.Resource(EgressPolicyResource).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		conds, err := conditions(obj)
		if err != nil {
			return false, err
		}
		for _, c := range conds {
			if c.Type == ConditionValid {
				cond = c
				observed, _, _ := unstructured.NestedInt64(obj.Object, "status", "observedGeneration")
				return c.Status == status && observed == obj.GetGeneration() && c.ObservedGeneration == obj.GetGeneration(), nil
			}
		}
		return false, nil
	})
	return cond
}

// runController starts the controller as its service account, under
// leader election on the Lease the deployed Role allows.
func (s *testServer) runController(t *testing.T, cluster []netip.Prefix) *EgressController {
	t.Helper()
	c, _ := s.startController(t, EgressOptions{ClusterCIDRs: cluster})
	return c
}

// startController is runController with the controller's options (the
// ConfigMap, resync and logger are the test's). stop ends the controller
// and waits for it, releasing the Lease; the test's cleanup calls it too.
func (s *testServer) startController(t *testing.T, opts EgressOptions) (c *EgressController, stop func()) {
	t.Helper()
	client, dyn := s.as(t, controllerAccount)
	opts.ConfigMap = agentConfigMap
	opts.Resync = time.Minute
	opts.Logger = testLogger(t)
	c, err := NewEgressController(client, dyn, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- RunLeading(ctx, client, LeaderElection{
			Namespace: "kube-system", Name: leaseName,
			LeaseDuration: 2 * time.Second, RenewDeadline: time.Second, RetryPeriod: 100 * time.Millisecond,
		}, c.Run)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("controller: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return c, stop
}

// TestIntegrationDeployManifests checks that every manifest in deploy/ was
// accepted by the API server (apiServer applied them) and that the CRD
// validates what it claims to.
func TestIntegrationDeployManifests(t *testing.T) {
	s := apiServer(t)
	ctx := t.Context()
	built, err := kustomizeBuild()
	if err != nil {
		t.Fatal(err)
	}
	examples, err := exampleManifests()
	if err != nil {
		t.Fatal(err)
	}
	if len(built) < 5 || len(examples) == 0 {
		t.Fatalf("only %d objects in deploy/ and %d examples", len(built), len(examples))
	}
	// Applying again is a no-op, as `kubectl apply -k` run twice must be.
	if err := s.applyDeploy(ctx); err != nil {
		t.Fatalf("second apply: %v", err)
	}
	for _, m := range append(built, examples...) {
		t.Logf("applied %s: %s %s", m.from, m.obj.GetKind(), m.obj.GetName())
	}

	s.resetPolicies(t)
	bad := []struct {
		name string
		obj  *unstructured.Unstructured
	}{
		{"prefix length too long", policy("it-bad-length", "NoSNAT", "10.0.0.0/33")},
		{"not a CIDR", policy("it-bad-text", "NoSNAT", "example.com")},
		{"unknown action", policy("it-bad-action", "SNAT", "10.0.0.0/8")},
	}
	for _, b := range bad {
		_, err := s.dyn.Resource(EgressPolicyResource).Create(ctx, b.obj, metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) {
			t.Errorf("%s: create returned %v, want the CRD schema to reject it", b.name, err)
		}
	}
}

// TestIntegrationEgressController runs the controller through the
// scenarios the issue names, each ending in a deadline-bounded wait for
// the state it must converge to.
func TestIntegrationEgressController(t *testing.T) {
	s := apiServer(t)
	s.resetPolicies(t)
	ctx := t.Context()
	res := s.dyn.Resource(EgressPolicyResource)

	s.createPolicy(t, policy("it-default", "NoSNAT", "10.0.0.0/8", "192.168.0.0/16"))
	s.createPolicy(t, policy("it-extra", "NoSNAT", "203.0.113.0/24"))
	cluster := prefixes("10.244.0.0/16", "10.96.0.0/12", "fd00:10:244::/56")
	c := s.runController(t, cluster)
	managed := c.ManagedPolicy()

	t.Run("policies become the configmap", func(t *testing.T) {
		s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n- 203.0.113.0/24\n- fd00:10:244::/56\n")
		for _, name := range []string{"it-default", "it-extra", managed} {
			s.waitCondition(t, name, metav1.ConditionTrue)
		}
	})

	t.Run("an edit converges", func(t *testing.T) {
		obj, err := res.Get(ctx, "it-extra", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		edited := policy("it-extra", "NoSNAT", "198.51.100.0/24", "2001:db8::/32")
		edited.SetResourceVersion(obj.GetResourceVersion())
		if _, err := res.Update(ctx, edited, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n- 198.51.100.0/24\n- 2001:db8::/32\n- fd00:10:244::/56\n")
		s.waitCondition(t, "it-extra", metav1.ConditionTrue)
	})

	t.Run("a deletion converges", func(t *testing.T) {
		if err := res.Delete(ctx, "it-extra", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n- fd00:10:244::/56\n")
	})

	t.Run("an invalid policy is reported and skipped", func(t *testing.T) {
		// 10.0.0.1/8 passes the CRD's isCIDR but not ip-masq-agent's
		// alignment check, which only the controller applies.
		s.createPolicy(t, policy("it-misaligned", "NoSNAT", "100.64.0.0/10", "10.0.0.1/8"))
		cond := s.waitCondition(t, "it-misaligned", metav1.ConditionFalse)
		if cond.Reason != ReasonInvalidDestination || !strings.Contains(cond.Message, `CIDR "10.0.0.1/8" is not aligned`) {
			t.Errorf("condition %+v", cond)
		}
		waitFor(t, 30*time.Second, "a Warning event for it-misaligned", func(ctx context.Context) (bool, error) {
			events, err := s.client.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
				FieldSelector: fields.OneTermEqualSelector("involvedObject.name", "it-misaligned").String(),
			})
			if err != nil {
				return false, err
			}
			for _, e := range events.Items {
				if e.Type == corev1.EventTypeWarning && e.Reason == ReasonInvalidDestination &&
					e.InvolvedObject.Kind == "EgressNATPolicy" && strings.Contains(e.Message, "10.0.0.1/8") {
					return true, nil
				}
			}
			return false, nil
		})
		// Its valid range 100.64.0.0/10 is not in the config either.
		s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 192.168.0.0/16\n- fd00:10:244::/56\n")

		obj, err := res.Get(ctx, "it-misaligned", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fixed := policy("it-misaligned", "NoSNAT", "100.64.0.0/10", "10.0.0.0/8")
		fixed.SetResourceVersion(obj.GetResourceVersion())
		if _, err := res.Update(ctx, fixed, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitCondition(t, "it-misaligned", metav1.ConditionTrue)
		s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 100.64.0.0/10\n- 192.168.0.0/16\n- fd00:10:244::/56\n")
	})

	want := "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.96.0.0/12\n- 10.244.0.0/16\n- 100.64.0.0/10\n- 192.168.0.0/16\n- fd00:10:244::/56\n"

	t.Run("the managed policy comes back after deletion", func(t *testing.T) {
		old, err := res.Get(ctx, managed, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Delete(ctx, managed, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "a new managed policy", func(ctx context.Context) (bool, error) {
			obj, err := res.Get(ctx, managed, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return err == nil && obj.GetUID() != old.GetUID(), err
		})
		s.waitCondition(t, managed, metav1.ConditionTrue)
		s.waitConfig(t, want)
	})

	t.Run("an edit of the managed policy is undone", func(t *testing.T) {
		obj, err := res.Get(ctx, managed, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		edited := obj.DeepCopy()
		edited.Object["spec"] = policy("", "NoSNAT", "0.0.0.0/0").Object["spec"]
		if _, err := res.Update(ctx, edited, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "the managed spec restored", func(ctx context.Context) (bool, error) {
			obj, err := res.Get(ctx, managed, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			dests, _, _ := unstructured.NestedSlice(obj.Object, "spec", "destinations")
			return len(dests) == len(cluster), nil
		})
		s.waitConfig(t, want)
	})

	t.Run("a hand edit of the configmap is undone, other fields kept", func(t *testing.T) {
		cm, err := s.agentConfig(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cm.Data[AgentConfigKey] = "masqLinkLocal: true\nnonMasqueradeCIDRs: [1.0.0.0/8]\n"
		if _, err := s.client.CoreV1().ConfigMaps(cm.Namespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitConfig(t, "masqLinkLocal: true\n"+want)
	})

	t.Run("a steady state writes nothing", func(t *testing.T) {
		// Wait for the controller to go idle after the previous writes.
		waitFor(t, 30*time.Second, "an idle controller", func(context.Context) (bool, error) {
			return c.queue.Len() == 0, nil
		})
		before, err := s.agentConfig(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			// An annotation changes the object without changing its
			// meaning: the controller reconciles and must write nothing.
			n := c.reconciled.Load()
			patch := fmt.Sprintf(`{"metadata":{"annotations":{"nfmasq.test/poke":"%d"}}}`, i)
			if _, err := res.Patch(ctx, "it-default", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 30*time.Second, "a reconciliation", func(context.Context) (bool, error) {
				return c.reconciled.Load() > n && c.queue.Len() == 0, nil
			})
		}
		after, err := s.agentConfig(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if after.ResourceVersion != before.ResourceVersion {
			t.Errorf("configmap rewritten: resourceVersion %s -> %s", before.ResourceVersion, after.ResourceVersion)
		}
		obj, err := res.Get(ctx, "it-default", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		conds, _ := conditions(obj)
		if len(conds) != 1 || conds[0].Status != metav1.ConditionTrue {
			t.Errorf("conditions %+v", conds)
		}
	})
}

// TestIntegrationPodIndex resolves pods created through the API (there is
// no kubelet: the test writes the status a kubelet would).
func TestIntegrationPodIndex(t *testing.T) {
	s := apiServer(t)
	ctx := t.Context()
	node := fmt.Sprintf("it-node-%d", time.Now().UnixNano())
	pods := s.client.CoreV1().Pods(metav1.NamespaceDefault)
	zero := int64(0)

	mkpod := func(name, nodeName string, hostNetwork bool, ips ...string) *corev1.Pod {
		t.Helper()
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{
				NodeName: nodeName, HostNetwork: hostNetwork,
				Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}},
			},
		}
		created, err := pods.Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = pods.Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		})
		created.Status.Phase = corev1.PodRunning
		for _, ip := range ips {
			created.Status.PodIPs = append(created.Status.PodIPs, corev1.PodIP{IP: ip})
		}
		if len(ips) > 0 {
			created.Status.PodIP = ips[0]
		}
		updated, err := pods.UpdateStatus(ctx, created, metav1.UpdateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return updated
	}
	// No controller-manager creates the namespace's default service
	// account, which a server with the ServiceAccount admission plugin on
	// requires of every pod.
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if _, err := s.client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	suffix := fmt.Sprint(time.Now().UnixNano() % 100000)
	mkpod("web-"+suffix, node, false, "10.244.7.2", "fd00:10:244:7::2")
	mkpod("proxy-"+suffix, node, true, "192.168.7.1")
	mkpod("away-"+suffix, node+"-other", false, "10.244.8.2")

	client, _ := s.as(t, agentAccount)
	x, err := NewPodIndex(client, node, 0)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer x.Shutdown()
	defer cancel()
	if err := x.Run(runCtx); err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]string{
		"10.244.7.2":       "default/web-" + suffix,
		"fd00:10:244:7::2": "default/web-" + suffix,
		"192.168.7.1":      "", // host network
		"10.244.8.2":       "", // another node's pod
	} {
		if got := x.Lookup(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Lookup(%s) = %q, want %q", addr, got, want)
		}
	}

	mkpod("late-"+suffix, node, false, "10.244.7.3")
	waitFor(t, 30*time.Second, "the new pod", func(context.Context) (bool, error) {
		return x.Lookup(netip.MustParseAddr("10.244.7.3")) == "default/late-"+suffix, nil
	})
	if err := pods.Delete(ctx, "web-"+suffix, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the deleted pod gone", func(context.Context) (bool, error) {
		return x.Lookup(netip.MustParseAddr("10.244.7.2")) == "", nil
	})
}

// TestIntegrationNodePodCIDRs reads pod CIDRs from Node objects as the
// agent's service account.
func TestIntegrationNodePodCIDRs(t *testing.T) {
	s := apiServer(t)
	ctx := t.Context()
	suffix := fmt.Sprint(time.Now().UnixNano())
	mknode := func(name string, cidrs ...string) {
		t.Helper()
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
		if len(cidrs) > 0 {
			n.Spec.PodCIDR = cidrs[0]
		}
		if _, err := s.client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	}
	mknode("it-dual-"+suffix, "10.244.3.0/24", "fd00:10:244:3::/64")
	mknode("it-bare-" + suffix)

	agent, _ := s.as(t, agentAccount)
	got, err := NodePodCIDRs(ctx, agent, "it-dual-"+suffix)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[10.244.3.0/24 fd00:10:244:3::/64]" {
		t.Errorf("pod CIDRs %v", got)
	}
	_, err = NodePodCIDRs(ctx, agent, "it-bare-"+suffix)
	if !errors.Is(err, ErrNoPodCIDRs) || err.Error() != "no --pod-cidr given and node it-bare-"+suffix+" has no spec.podCIDRs" {
		t.Errorf("node without pod CIDRs: %v", err)
	}
	_, err = NodePodCIDRs(ctx, agent, "it-missing-"+suffix)
	if !apierrors.IsNotFound(err) {
		t.Errorf("missing node: %v, want NotFound", err)
	}
}
