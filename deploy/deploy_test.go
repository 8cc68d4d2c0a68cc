package deploy

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/nfmasq/nfmasq/nat"
)

// gkeDefaultRanges are GKE's default non-masquerade destinations, in the
// order of GKE's documentation (shared/GKE-BEHAVIOUR.md).
var gkeDefaultRanges = []string{
	"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
	"192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
	"198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
}

const (
	namespace     = "kube-system"
	configMapName = "ip-masq-agent"
	// configMapKey is the ConfigMap key that GKE and upstream ip-masq-agent
	// use, so an existing ConfigMap keeps working.
	configMapKey = "config"
)

// egressNATPolicy mirrors the CRD's schema, for strict decoding: no Go type
// for it exists in k8s.io/api.
type egressNATPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Action       string `json:"action"`
		Destinations []struct {
			CIDR string `json:"cidr"`
		} `json:"destinations"`
	} `json:"spec"`
	Status *struct {
		ObservedGeneration int64              `json:"observedGeneration,omitempty"`
		Conditions         []metav1.Condition `json:"conditions,omitempty"`
	} `json:"status,omitempty"`
}

func newScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme, apiextensionsv1.AddToScheme,
	} {
		if err := add(s); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// decodeStrict decodes one manifest into its k8s.io/api type, failing on
// unknown or duplicate fields and on an apiVersion/kind the scheme does not
// know (which is how a stale apiVersion would show up).
func decodeStrict(t *testing.T, decoder runtime.Decoder, m Manifest) any {
	t.Helper()
	if m.APIVersion == "networking.gke.io/v1" && m.Kind == "EgressNATPolicy" {
		var p egressNATPolicy
		if err := yaml.UnmarshalStrict(m.YAML, &p); err != nil {
			t.Fatalf("%s: %s %s: %v", m.File, m.Kind, m.Name, err)
		}
		return &p
	}
	obj, _, err := decoder.Decode(m.YAML, nil, nil)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", m.File, m.Kind, m.Name, err)
	}
	return obj
}

// objects decodes every manifest listed in kustomization.yaml, keyed by
// "Kind namespace/name".
func objects(t *testing.T) map[string]any {
	t.Helper()
	ms, err := Manifests()
	if err != nil {
		t.Fatal(err)
	}
	decoder := serializer.NewCodecFactory(newScheme(t), serializer.EnableStrict).UniversalDeserializer()
	out := map[string]any{}
	for _, m := range ms {
		key := objectKey(m.Kind, m.Namespace, m.Name)
		if _, dup := out[key]; dup {
			t.Fatalf("%s: %s declared twice", m.File, key)
		}
		out[key] = decodeStrict(t, decoder, m)
	}
	return out
}

func objectKey(kind, ns, name string) string { return kind + " " + ns + "/" + name }

func get[T any](t *testing.T, objs map[string]any, kind, ns, name string) T {
	t.Helper()
	o, ok := objs[objectKey(kind, ns, name)]
	if !ok {
		t.Fatalf("no %s in the kustomization", objectKey(kind, ns, name))
	}
	typed, ok := o.(T)
	if !ok {
		t.Fatalf("%s decoded as %T", objectKey(kind, ns, name), o)
	}
	return typed
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	listed, err := Resources()
	if err != nil {
		t.Fatal(err)
	}
	onDisk, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	onDisk = slices.DeleteFunc(onDisk, func(f string) bool { return f == KustomizationFile })
	sortedListed := slices.Sorted(slices.Values(listed))
	if !slices.Equal(sortedListed, onDisk) {
		t.Errorf("kustomization.yaml resources %v, deploy/*.yaml files %v: every manifest must be listed and every listed file must exist", sortedListed, onDisk)
	}
	if len(slices.Compact(sortedListed)) != len(listed) {
		t.Errorf("kustomization.yaml lists a file twice: %v", listed)
	}
	for _, f := range listed {
		if strings.HasPrefix(f, "examples/") {
			t.Errorf("%s: examples are documentation and are not applied", f)
		}
	}
}

func TestManifestsDecodeStrictly(t *testing.T) {
	objs := objects(t)
	crd := get[*apiextensionsv1.CustomResourceDefinition](t, objs, "CustomResourceDefinition", "", "egressnatpolicies.networking.gke.io")

	// Whether a kind is namespaced decides whether it must carry
	// kube-system or nothing; a kind missing here fails the test so a new
	// file gets the same check.
	namespaced := map[string]bool{
		"ServiceAccount": true, "Role": true, "RoleBinding": true,
		"DaemonSet": true, "Deployment": true, "ConfigMap": true,
		"ClusterRole": false, "ClusterRoleBinding": false, "CustomResourceDefinition": false,
		crd.Spec.Names.Kind: crd.Spec.Scope == apiextensionsv1.NamespaceScoped,
	}
	ms, err := Manifests()
	if err != nil {
		t.Fatal(err)
	}
	examples, err := Examples()
	if err != nil {
		t.Fatal(err)
	}
	if len(examples) == 0 {
		t.Fatal("no examples found")
	}
	decoder := serializer.NewCodecFactory(newScheme(t), serializer.EnableStrict).UniversalDeserializer()
	for _, m := range append(ms, examples...) {
		t.Run(m.File+"/"+m.Kind+"/"+m.Name, func(t *testing.T) {
			decodeStrict(t, decoder, m)
			ns, known := namespaced[m.Kind]
			switch {
			case !known:
				t.Errorf("kind %s: say in this test whether it is namespaced", m.Kind)
			case ns && m.Namespace != namespace:
				t.Errorf("namespace %q, want %q", m.Namespace, namespace)
			case !ns && m.Namespace != "":
				t.Errorf("cluster-scoped %s has namespace %q", m.Kind, m.Namespace)
			}
			if m.Kind != "CustomResourceDefinition" && !strings.HasPrefix(m.Name, "nfmasq") &&
				m.Name != "default" && m.Name != configMapName {
				t.Errorf("name %q: nfmasq's objects are named nfmasq*", m.Name)
			}
		})
	}
}

// TestKustomizeBuild builds deploy/ with the kustomize library that kubectl
// embeds and checks that it yields exactly the objects of the files, so
// `kubectl apply -k deploy/` and `kubectl apply -f` of each file agree.
func TestKustomizeBuild(t *testing.T) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	built, err := k.Run(filesys.MakeFsOnDisk(), ".")
	if err != nil {
		t.Fatalf("kustomize build deploy/: %v", err)
	}
	ms, err := Manifests()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]map[string]any{}
	for _, m := range ms {
		var obj map[string]any
		if err := yaml.Unmarshal(m.JSON, &obj); err != nil {
			t.Fatal(err)
		}
		want[objectKey(m.Kind, m.Namespace, m.Name)] = obj
	}
	got := map[string]map[string]any{}
	for _, r := range built.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		// Through YAML so numbers get the same Go types as the files'.
		var obj map[string]any
		if err := yaml.Unmarshal(y, &obj); err != nil {
			t.Fatal(err)
		}
		got[objectKey(r.GetKind(), r.GetNamespace(), r.GetName())] = obj
	}
	if !reflect.DeepEqual(sortedKeys(got), sortedKeys(want)) {
		t.Fatalf("kustomize build yields %v, files hold %v", sortedKeys(got), sortedKeys(want))
	}
	for key, w := range want {
		if diff := cmp.Diff(w, got[key]); diff != "" {
			t.Errorf("%s: kustomize build differs from the file (-file +build):\n%s", key, diff)
		}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// flags turns ["agent", "--a=b", "--c", "d", "--e"] into a map of flag name to
// values (repeatable flags keep every value); a flag without a value maps
// to [""].
func flags(t *testing.T, args []string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			t.Fatalf("argument %q is not a --flag; subcommand and flags only", a)
		}
		name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
			value = args[i+1]
			i++
		}
		out[name] = append(out[name], value)
	}
	return out
}

func oneFlag(t *testing.T, f map[string][]string, name string) string {
	t.Helper()
	v := f[name]
	if len(v) != 1 {
		t.Fatalf("flag --%s given %d times, want once", name, len(v))
	}
	return v[0]
}

func TestAgentDaemonSet(t *testing.T) {
	objs := objects(t)
	ds := get[*appsv1.DaemonSet](t, objs, "DaemonSet", namespace, "nfmasq")
	pod := ds.Spec.Template.Spec

	t.Run("scheduling", func(t *testing.T) {
		if !pod.HostNetwork {
			t.Error("hostNetwork must be true: the agent programs the node's netfilter tables")
		}
		if pod.PriorityClassName != "system-node-critical" {
			t.Errorf("priorityClassName %q", pod.PriorityClassName)
		}
		if want := []corev1.Toleration{{Operator: corev1.TolerationOpExists}}; !reflect.DeepEqual(pod.Tolerations, want) {
			t.Errorf("tolerations %+v, want exactly %+v (tolerate every taint)", pod.Tolerations, want)
		}
		if g := pod.TerminationGracePeriodSeconds; g == nil || *g <= 0 || *g > 60 {
			t.Errorf("terminationGracePeriodSeconds %v, want set, 1..60", g)
		}
		sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
		if err != nil {
			t.Fatal(err)
		}
		if !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
			t.Errorf("selector %v does not match the pod labels %v", sel, ds.Spec.Template.Labels)
		}
	})

	t.Run("rolling update", func(t *testing.T) {
		u := ds.Spec.UpdateStrategy
		if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil {
			t.Fatalf("updateStrategy %+v, want RollingUpdate", u)
		}
		if mu := u.RollingUpdate.MaxUnavailable; mu == nil || mu.String() != "1" {
			t.Errorf("maxUnavailable %v, want 1", mu)
		}
		if ms := u.RollingUpdate.MaxSurge; ms != nil && ms.String() != "0" {
			t.Errorf("maxSurge %v: two agents on one node would fight over the queue", ms)
		}
	})

	if len(pod.Containers) != 1 || len(pod.InitContainers) != 1 {
		t.Fatalf("want exactly one container and one init container, got %d and %d", len(pod.Containers), len(pod.InitContainers))
	}
	c := pod.Containers[0]

	t.Run("node-prep init container", func(t *testing.T) {
		ic := pod.InitContainers[0]
		if ic.Name != "node-prep" || ic.Image != c.Image {
			t.Errorf("init container %q image %q, want node-prep with the agent's image %q", ic.Name, ic.Image, c.Image)
		}
		// It is privileged, so it may run nothing but `nfmasq node-prep`:
		// the image's entrypoint, one argument.
		if len(ic.Command) != 0 || !slices.Equal(ic.Args, []string{"node-prep"}) {
			t.Errorf("command %q args %q, want the entrypoint with args [node-prep] only", ic.Command, ic.Args)
		}
		sc := ic.SecurityContext
		if sc == nil || sc.Privileged == nil || !*sc.Privileged {
			t.Error("node-prep must be privileged: runtimes mount /proc/sys read-only otherwise")
		}
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Error("readOnlyRootFilesystem must be true: node-prep writes only /proc/sys")
		}
		// A restartPolicy would make it a sidecar that runs beside the
		// agent for the pod's life; it must finish before the agent starts.
		if ic.RestartPolicy != nil {
			t.Errorf("restartPolicy %v: node-prep is a plain init container", *ic.RestartPolicy)
		}
		if len(ic.VolumeMounts)+len(ic.VolumeDevices)+len(ic.Env)+len(ic.EnvFrom)+len(ic.Ports) != 0 {
			t.Errorf("node-prep needs no volumes, env or ports: %+v", ic)
		}
		checkResources(t, ic.Resources)
	})
	if len(c.Command) != 0 || len(c.Args) == 0 || c.Args[0] != "agent" {
		t.Fatalf("command %q args %q: want the image's entrypoint with args [agent ...]", c.Command, c.Args)
	}
	f := flags(t, c.Args[1:])

	t.Run("probes use the metrics listener", func(t *testing.T) {
		host, port, err := splitHostPort(oneFlag(t, f, "metrics-addr"))
		if err != nil {
			t.Fatal(err)
		}
		if host != "127.0.0.1" {
			t.Errorf("--metrics-addr host %q: keep the listener on loopback", host)
		}
		for _, p := range []struct {
			name  string
			probe *corev1.Probe
			path  string
		}{
			{"startupProbe", c.StartupProbe, "/healthz"},
			{"livenessProbe", c.LivenessProbe, "/healthz"},
			{"readinessProbe", c.ReadinessProbe, "/readyz"},
		} {
			if p.probe == nil || p.probe.HTTPGet == nil {
				t.Errorf("%s: want an httpGet probe", p.name)
				continue
			}
			g := p.probe.HTTPGet
			if g.Host != host || g.Port.IntValue() != port || g.Path != p.path {
				t.Errorf("%s: http://%s:%s%s, want http://%s:%d%s", p.name, g.Host, g.Port.String(), g.Path, host, port, p.path)
			}
		}
		if len(c.Ports) != 1 || int(c.Ports[0].ContainerPort) != port {
			t.Errorf("ports %+v, want the metrics port %d declared", c.Ports, port)
		}
	})

	t.Run("NODE_NAME from the downward API", func(t *testing.T) {
		if _, ok := f["pod-cidr"]; ok {
			t.Error("--pod-cidr is cluster-specific: the agent must discover it from its Node")
		}
		for _, e := range c.Env {
			if e.Name == "NODE_NAME" {
				if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
					t.Errorf("NODE_NAME %+v, want fieldRef spec.nodeName", e)
				}
				return
			}
		}
		t.Error("no NODE_NAME env")
	})

	t.Run("least privilege", func(t *testing.T) {
		sc := c.SecurityContext
		if sc == nil || sc.Capabilities == nil {
			t.Fatal("no securityContext.capabilities")
		}
		if sc.Privileged == nil || *sc.Privileged {
			t.Error("privileged must be set to false")
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Error("allowPrivilegeEscalation must be false")
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Error("readOnlyRootFilesystem must be true")
		}
		if !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("drop %v, want [ALL]", sc.Capabilities.Drop)
		}
		if got := agentCapabilities(t, ds); !slices.Equal(got, []string{"NET_ADMIN", "NET_RAW"}) {
			t.Errorf("add %v, want [NET_ADMIN NET_RAW] (kernel_linux_test.go says why)", got)
		}
		if pod.SecurityContext == nil || pod.SecurityContext.SeccompProfile == nil ||
			pod.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Error("pod seccompProfile must be RuntimeDefault")
		}
	})

	t.Run("volumes", func(t *testing.T) {
		mounts := map[string]corev1.VolumeMount{}
		for _, m := range c.VolumeMounts {
			mounts[m.Name] = m
		}
		vols := map[string]corev1.Volume{}
		var hostPaths []string
		for _, v := range pod.Volumes {
			vols[v.Name] = v
			if v.HostPath != nil {
				hostPaths = append(hostPaths, v.HostPath.Path)
			}
		}
		if !slices.Equal(hostPaths, []string{"/run/xtables.lock"}) {
			t.Errorf("hostPath volumes %v, want only /run/xtables.lock", hostPaths)
		}

		cfg := vols["config"]
		if cfg.ConfigMap == nil || cfg.ConfigMap.Name != configMapName ||
			cfg.ConfigMap.Optional == nil || !*cfg.ConfigMap.Optional {
			t.Fatalf("config volume %v, want ConfigMap %s, optional", cfg.ConfigMap, configMapName)
		}
		if len(cfg.ConfigMap.Items) != 1 || cfg.ConfigMap.Items[0].Key != configMapKey {
			t.Fatalf("config items %+v, want the single key %q", cfg.ConfigMap.Items, configMapKey)
		}
		m, ok := mounts["config"]
		if !ok || m.MountPath != "/etc/config" || !m.ReadOnly {
			t.Errorf("config mount %+v, want /etc/config read-only", m)
		}
		if got, want := oneFlag(t, f, "config"), filepath.Join(m.MountPath, cfg.ConfigMap.Items[0].Path); got != want {
			t.Errorf("--config %q, but the ConfigMap key appears at %q", got, want)
		}

		lock := vols["xtables-lock"]
		if lock.HostPath == nil || lock.HostPath.Type == nil || *lock.HostPath.Type != corev1.HostPathFileOrCreate {
			t.Errorf("xtables-lock volume %+v, want hostPath FileOrCreate", lock)
		}
		if m := mounts["xtables-lock"]; m.MountPath != "/run/xtables.lock" || m.ReadOnly {
			t.Errorf("xtables-lock mount %+v, want /run/xtables.lock writable", m)
		}
		if len(mounts) != len(c.VolumeMounts) || len(vols) != len(pod.Volumes) || len(mounts) != len(vols) {
			t.Errorf("mounts %v and volumes %v do not pair up", c.VolumeMounts, pod.Volumes)
		}
	})

	t.Run("resources", func(t *testing.T) {
		checkResources(t, c.Resources)
	})

	t.Run("service account", func(t *testing.T) {
		checkServiceAccount(t, objs, pod.ServiceAccountName, "ClusterRole nfmasq-agent")
	})
}

func TestEgressControllerDeployment(t *testing.T) {
	objs := objects(t)
	d := get[*appsv1.Deployment](t, objs, "Deployment", namespace, "nfmasq-egress-controller")
	ds := get[*appsv1.DaemonSet](t, objs, "DaemonSet", namespace, "nfmasq")
	pod := d.Spec.Template.Spec

	if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
		t.Errorf("replicas %v, want 1", d.Spec.Replicas)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.Image != ds.Spec.Template.Spec.Containers[0].Image {
		t.Errorf("image %q, the agent runs %q: one image serves both", c.Image, ds.Spec.Template.Spec.Containers[0].Image)
	}
	if len(c.Command) != 0 || len(c.Args) == 0 || c.Args[0] != "egress-controller" {
		t.Fatalf("command %q args %q: want args [egress-controller ...]", c.Command, c.Args)
	}
	f := flags(t, c.Args[1:])
	if v, ok := f["leader-elect"]; !ok || (v[0] != "" && v[0] != "true") {
		t.Errorf("--leader-elect %v: a rolling update runs two pods for a moment", v)
	}
	// The kustomization holds no EgressNATPolicy (see
	// TestKustomizationAppliesInOneRun); the controller makes `default`.
	if got := oneFlag(t, f, "generate-default-policy"); got != "true" {
		t.Errorf("--generate-default-policy=%q, want true: nothing else creates the default policy", got)
	}
	if got, want := oneFlag(t, f, "configmap"), namespace+"/"+ds.Spec.Template.Spec.Volumes[0].ConfigMap.Name; got != want {
		t.Errorf("--configmap %q, but the agent mounts %q", got, want)
	}
	if len(f["cluster-cidr"]) == 0 {
		t.Error("no --cluster-cidr: the managed policy would be empty")
	}
	for _, s := range f["cluster-cidr"] {
		if p, err := netip.ParsePrefix(s); err != nil || p.Masked() != p {
			t.Errorf("--cluster-cidr %q: want an aligned CIDR (%v)", s, err)
		}
	}
	// The agents keep the same ranges out of every MasqueradePolicy.
	agent := flags(t, ds.Spec.Template.Spec.Containers[0].Args[1:])
	if !slices.Equal(agent["cluster-cidr"], f["cluster-cidr"]) {
		t.Errorf("the agent's --cluster-cidr %q, the controller's %q: a MasqueradePolicy could masquerade traffic inside the cluster", agent["cluster-cidr"], f["cluster-cidr"])
	}

	t.Run("non-root, no capabilities", func(t *testing.T) {
		psc, sc := pod.SecurityContext, c.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
			t.Errorf("pod securityContext %+v, want runAsNonRoot with a non-zero runAsUser", psc)
		}
		if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Error("pod seccompProfile must be RuntimeDefault")
		}
		if sc == nil || sc.Capabilities == nil {
			t.Fatal("no container securityContext.capabilities")
		}
		if !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
			t.Errorf("capabilities %+v, want drop [ALL] and nothing added", sc.Capabilities)
		}
		if sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("securityContext %+v, want privileged=false, allowPrivilegeEscalation=false, readOnlyRootFilesystem=true", sc)
		}
		if pod.HostNetwork {
			t.Error("the controller needs no host network")
		}
	})

	t.Run("resources", func(t *testing.T) {
		checkResources(t, c.Resources)
	})

	t.Run("service account", func(t *testing.T) {
		checkServiceAccount(t, objs, pod.ServiceAccountName,
			"ClusterRole nfmasq-egress-controller", "Role nfmasq-egress-controller")
	})
}

// checkResources wants CPU and memory requests and a memory limit, and no
// CPU limit: throttling stalls a NAT path or a watch without making either
// safer, while a memory limit contains a leak.
func checkResources(t *testing.T, r corev1.ResourceRequirements) {
	t.Helper()
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if q, ok := r.Requests[name]; !ok || q.IsZero() {
			t.Errorf("no %s request", name)
		}
	}
	lim, ok := r.Limits[corev1.ResourceMemory]
	if !ok || lim.Cmp(r.Requests[corev1.ResourceMemory]) < 0 {
		t.Errorf("memory limit %v, want one at least the request", lim.String())
	}
	if _, ok := r.Limits[corev1.ResourceCPU]; ok {
		t.Error("CPU limit set: CFS throttling would stall the packet path")
	}
}

// checkServiceAccount checks that name exists in kube-system and that it is
// bound to exactly the roles given (as "Kind name").
func checkServiceAccount(t *testing.T, objs map[string]any, name string, roles ...string) {
	t.Helper()
	if name == "" || name == "default" {
		t.Fatalf("serviceAccountName %q: each component has its own", name)
	}
	get[*corev1.ServiceAccount](t, objs, "ServiceAccount", namespace, name)
	var bound []string
	for _, o := range objs {
		var ref rbacv1.RoleRef
		var subjects []rbacv1.Subject
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			ref, subjects = b.RoleRef, b.Subjects
		case *rbacv1.RoleBinding:
			ref, subjects = b.RoleRef, b.Subjects
		default:
			continue
		}
		for _, s := range subjects {
			if s.Kind == rbacv1.ServiceAccountKind && s.Name == name && s.Namespace == namespace {
				bound = append(bound, ref.Kind+" "+ref.Name)
			}
		}
	}
	sort.Strings(bound)
	want := slices.Sorted(slices.Values(roles))
	if !slices.Equal(bound, want) {
		t.Errorf("service account %s is bound to %v, want %v", name, bound, want)
	}
}

// rule is an RBAC rule in a form that compares with ==.
type rule struct {
	groups, resources, names, verbs string
}

func (r rule) String() string {
	return fmt.Sprintf("{groups:[%s] resources:[%s] names:[%s] verbs:[%s]}", r.groups, r.resources, r.names, r.verbs)
}

func rulesOf(t *testing.T, policy []rbacv1.PolicyRule) []rule {
	t.Helper()
	var out []rule
	for _, p := range policy {
		for _, list := range [][]string{p.APIGroups, p.Resources, p.ResourceNames, p.Verbs} {
			if slices.Contains(list, "*") {
				t.Errorf("rule %+v has a wildcard", p)
			}
		}
		if len(p.NonResourceURLs) > 0 {
			t.Errorf("rule %+v grants non-resource URLs", p)
		}
		// RBAC matches resourceNames against the request URL, which for a
		// create carries no name: such a rule would never allow anything.
		if len(p.ResourceNames) > 0 && slices.Contains(p.Verbs, "create") {
			t.Errorf("rule %+v: create cannot be limited by resourceNames", p)
		}
		sortedJoin := func(s []string) string { return strings.Join(slices.Sorted(slices.Values(s)), ",") }
		out = append(out, rule{sortedJoin(p.APIGroups), sortedJoin(p.Resources), sortedJoin(p.ResourceNames), sortedJoin(p.Verbs)})
	}
	return out
}

// TestRBACIsMinimal pins every rule: a new right must be added here too,
// with the reason in the manifest.
func TestRBACIsMinimal(t *testing.T) {
	objs := objects(t)
	tests := []struct {
		kind, ns, name string
		want           []rule
	}{
		{"ClusterRole", "", "nfmasq-agent", []rule{
			{"", "nodes", "", "get"},
			{"", "pods", "", "list,watch"},
			{"nfmasq.io", "masqueradepolicies", "", "list,watch"},
			{"nfmasq.io", "masqueradepolicies/status", "", "patch"},
			{"", "namespaces", "", "list,watch"},
			{"", "events", "", "create,patch"},
		}},
		{"ClusterRole", "", "nfmasq-egress-controller", []rule{
			{"networking.gke.io", "egressnatpolicies", "", "create,list,update,watch"},
			{"networking.gke.io", "egressnatpolicies/status", "", "update"},
			{"", "events", "", "create,patch"},
		}},
		{"Role", namespace, "nfmasq-egress-controller", []rule{
			{"", "configmaps", configMapName, "list,update,watch"},
			{"", "configmaps", "", "create"},
			{"coordination.k8s.io", "leases", "nfmasq-egress-controller", "get,update"},
			{"coordination.k8s.io", "leases", "", "create"},
		}},
	}
	roles := 0
	for _, o := range objs {
		switch o.(type) {
		case *rbacv1.ClusterRole, *rbacv1.Role:
			roles++
		}
	}
	if roles != len(tests) {
		t.Errorf("%d roles in the manifests, %d pinned here", roles, len(tests))
	}
	for _, tt := range tests {
		t.Run(tt.kind+"/"+tt.name, func(t *testing.T) {
			var got []rule
			switch tt.kind {
			case "ClusterRole":
				got = rulesOf(t, get[*rbacv1.ClusterRole](t, objs, tt.kind, tt.ns, tt.name).Rules)
			case "Role":
				got = rulesOf(t, get[*rbacv1.Role](t, objs, tt.kind, tt.ns, tt.name).Rules)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("rules\n got %v\nwant %v", got, tt.want)
			}
		})
	}

	// Every binding points at a role and a service account of these
	// manifests, in the right namespace.
	for key, o := range objs {
		var ref rbacv1.RoleRef
		var subjects []rbacv1.Subject
		refNS := ""
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			ref, subjects = b.RoleRef, b.Subjects
		case *rbacv1.RoleBinding:
			ref, subjects = b.RoleRef, b.Subjects
			if ref.Kind == "Role" {
				refNS = b.Namespace
			}
		default:
			continue
		}
		if _, ok := objs[objectKey(ref.Kind, refNS, ref.Name)]; !ok || ref.APIGroup != rbacv1.GroupName {
			t.Errorf("%s: roleRef %+v not in the manifests", key, ref)
		}
		for _, s := range subjects {
			if _, ok := objs[objectKey("ServiceAccount", s.Namespace, s.Name)]; !ok || s.Kind != rbacv1.ServiceAccountKind {
				t.Errorf("%s: subject %+v is not one of our service accounts", key, s)
			}
		}
	}
}

// TestKustomizationAppliesInOneRun: kubectl maps every object's kind from
// the API discovery it reads before applying anything, so the first
// `kubectl apply -k deploy/` fails on any object whose kind a CRD of the
// same run defines. Every kind must be one the API server has built in.
func TestKustomizationAppliesInOneRun(t *testing.T) {
	ms, err := Manifests()
	if err != nil {
		t.Fatal(err)
	}
	builtIn := newScheme(t)
	defined := map[string]bool{}
	for _, o := range objects(t) {
		if crd, ok := o.(*apiextensionsv1.CustomResourceDefinition); ok {
			defined[crd.Spec.Group+"/"+crd.Spec.Names.Kind] = true
		}
	}
	for _, m := range ms {
		gv, err := schema.ParseGroupVersion(m.APIVersion)
		if err != nil {
			t.Fatalf("%s: %v", m.File, err)
		}
		if defined[gv.Group+"/"+m.Kind] || !builtIn.Recognizes(gv.WithKind(m.Kind)) {
			t.Errorf("%s: %s %s is not a built-in kind: the first kubectl apply -k cannot map it", m.File, m.Kind, m.Name)
		}
	}
}

// TestOnlyNodePrepIsPrivileged: of every container in the manifests, only
// the agent's node-prep init container runs privileged.
func TestOnlyNodePrepIsPrivileged(t *testing.T) {
	var privileged []string
	for key, o := range objects(t) {
		var pod corev1.PodSpec
		switch w := o.(type) {
		case *appsv1.DaemonSet:
			pod = w.Spec.Template.Spec
		case *appsv1.Deployment:
			pod = w.Spec.Template.Spec
		default:
			continue
		}
		for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
			if sc := c.SecurityContext; sc != nil && sc.Privileged != nil && *sc.Privileged {
				privileged = append(privileged, key+" "+c.Name)
			}
		}
	}
	if want := []string{"DaemonSet kube-system/nfmasq node-prep"}; !slices.Equal(privileged, want) {
		t.Errorf("privileged containers %v, want %v", privileged, want)
	}
}

// TestDefaultPolicyHasGKEDefaults checks the example of the policy the
// egress controller generates (internal/kube tests that it generates
// exactly this file).
func TestDefaultPolicyHasGKEDefaults(t *testing.T) {
	examples, err := Examples()
	if err != nil {
		t.Fatal(err)
	}
	decoder := serializer.NewCodecFactory(newScheme(t), serializer.EnableStrict).UniversalDeserializer()
	objs := map[string]any{}
	for _, m := range examples {
		objs[objectKey(m.Kind, m.Namespace, m.Name)] = decodeStrict(t, decoder, m)
	}
	p := get[*egressNATPolicy](t, objs, "EgressNATPolicy", "", "default")
	if p.Spec.Action != "NoSNAT" {
		t.Errorf("action %q, want NoSNAT", p.Spec.Action)
	}
	var got []string
	for _, d := range p.Spec.Destinations {
		got = append(got, d.CIDR)
	}
	if !slices.Equal(got, gkeDefaultRanges) {
		t.Errorf("destinations\n got %v\nwant %v (GKE's 11 defaults)", got, gkeDefaultRanges)
	}
	// The agent's own defaults (no ConfigMap) are the same list, so
	// installing the controller with this policy changes no decision.
	if agent := nat.DefaultNonMasqueradeCIDRs(true); !slices.Equal(agent, gkeDefaultRanges) {
		t.Errorf("the agent's defaults %v differ from GKE's %v", agent, gkeDefaultRanges)
	}

	// And the parser the agent and controller use accepts the file.
	for _, m := range examples {
		if m.Kind != "EgressNATPolicy" {
			continue
		}
		policies, errs := nat.ParseEgressPolicies(m.YAML)
		if len(errs) > 0 || len(policies) != 1 || policies[0].Name != m.Name {
			t.Errorf("%s: nat.ParseEgressPolicies gives %+v, errors %v", m.File, policies, errs)
		}
	}
}

// configFile is ip-masq-agent's config file; decoding into it strictly
// catches a misspelt key in the example.
type configFile struct {
	NonMasqueradeCIDRs []string `json:"nonMasqueradeCIDRs"`
	CIDRLimit          *int     `json:"cidrLimit,omitempty"`
	MasqLinkLocal      bool     `json:"masqLinkLocal"`
	MasqLinkLocalIPv6  bool     `json:"masqLinkLocalIPv6"`
	ResyncInterval     string   `json:"resyncInterval"`
}

func TestExampleConfigMap(t *testing.T) {
	examples, err := Examples()
	if err != nil {
		t.Fatal(err)
	}
	decoder := serializer.NewCodecFactory(newScheme(t), serializer.EnableStrict).UniversalDeserializer()
	var found bool
	for _, m := range examples {
		cm, ok := decodeStrict(t, decoder, m).(*corev1.ConfigMap)
		if !ok || cm.Name != configMapName {
			continue
		}
		found = true
		if cm.Namespace != namespace {
			t.Errorf("namespace %q", cm.Namespace)
		}
		if len(cm.Data) != 1 {
			t.Errorf("data keys %v, want only %q", sortedKeys(cm.Data), configMapKey)
		}
		var cfg configFile
		if err := yaml.UnmarshalStrict([]byte(cm.Data[configMapKey]), &cfg); err != nil {
			t.Fatalf("data[%q]: %v", configMapKey, err)
		}
		if !slices.Equal(cfg.NonMasqueradeCIDRs, gkeDefaultRanges) {
			t.Errorf("nonMasqueradeCIDRs %v, want GKE's defaults as the starting point", cfg.NonMasqueradeCIDRs)
		}
		if cfg.ResyncInterval == "" {
			t.Error("resyncInterval missing")
		}

		// The agent's own parser: no error, no warning, and as shipped the
		// example behaves exactly like having no ConfigMap.
		parsed, warnings, err := nat.ParseConfig([]byte(cm.Data[configMapKey]), nat.ParseOptions{AllReservedRanges: true})
		if err != nil || len(warnings) > 0 {
			t.Fatalf("nat.ParseConfig: %v, warnings %v", err, warnings)
		}
		parsed.CustomCIDRs = false
		if want := nat.DefaultConfig(true); !reflect.DeepEqual(parsed, want) {
			t.Errorf("the example parses to %+v, the defaults are %+v", parsed, want)
		}
	}
	if !found {
		t.Fatalf("no ConfigMap %s among the examples", configMapName)
	}
}

func splitHostPort(addr string) (string, int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("--metrics-addr %q: %w", addr, err)
	}
	return ap.Addr().String(), int(ap.Port()), nil
}

// agentCapabilities returns the capabilities the DaemonSet adds, sorted.
func agentCapabilities(t *testing.T, ds *appsv1.DaemonSet) []string {
	t.Helper()
	var caps []string
	for _, c := range ds.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add {
		caps = append(caps, string(c))
	}
	sort.Strings(caps)
	return caps
}

// readRepoFile reads a file at the repository root.
func readRepoFile(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
