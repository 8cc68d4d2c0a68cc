package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The plain rules file and the PrometheusRule hold the same groups.
func TestMonitoringRulesIdentical(t *testing.T) {
	var plain struct {
		Groups []any `json:"groups"`
	}
	var crd struct {
		APIVersion string `json:"apiVersion"`
		Kind       string
		Metadata   map[string]any
		Spec       struct {
			Groups []any `json:"groups"`
		}
	}
	for path, v := range map[string]any{"monitoring/rules.yaml": &plain, "monitoring/prometheusrule.yaml": &crd} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.UnmarshalStrict(data, v); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	if crd.Kind != "PrometheusRule" || len(plain.Groups) == 0 || !reflect.DeepEqual(plain.Groups, crd.Spec.Groups) {
		t.Error("monitoring/prometheusrule.yaml does not hold monitoring/rules.yaml's groups")
	}
}

// promtool (Debian's prometheus package, 2.42) checks the rules and runs
// their unit tests: every alert fires on its fault's series and stays
// silent on a healthy node's.
func TestMonitoringRulesPromtool(t *testing.T) {
	if _, err := exec.LookPath("promtool"); err != nil {
		if os.Getenv("NFMASQ_E2E") == "1" {
			t.Fatal("promtool not found (NFMASQ_E2E=1: required; Debian: apt-get install prometheus)")
		}
		t.Skip("promtool not found")
	}
	for _, args := range [][]string{{"check", "rules", "rules.yaml"}, {"test", "rules", "rules_test.yaml"}} {
		cmd := exec.Command("promtool", args...)
		cmd.Dir = "monitoring"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// The monitoring component makes the agent serve /metrics on the node's
// address as well, and the PodMonitor selects the agent's pods and port.
func TestMonitoringComponent(t *testing.T) {
	deployDir, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rel, err := filepath.Rel(dir, deployDir) // kustomize refuses absolute paths
	if err != nil {
		t.Fatal(err)
	}
	kust := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [" + rel + "]\ncomponents: [" + filepath.Join(rel, "monitoring") + "]\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := krusty.MakeDefaultOptions()
	opts.LoadRestrictions = types.LoadRestrictionsNone
	built, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build with the monitoring component: %v", err)
	}
	var ds appsv1.DaemonSet
	for _, r := range built.Resources() {
		if r.GetKind() == "DaemonSet" && r.GetName() == "nfmasq" {
			y, err := r.AsYAML()
			if err != nil {
				t.Fatal(err)
			}
			if err := yaml.Unmarshal(y, &ds); err != nil {
				t.Fatal(err)
			}
		}
	}
	c := ds.Spec.Template.Spec.Containers[0]
	hostIP := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "HOST_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	})
	if c.Name != "nfmasq" || hostIP < 0 || !slices.Contains(c.Args, "--metrics-scrape-addr=$(HOST_IP):9741") || !slices.Contains(c.Args, "--metrics-addr=127.0.0.1:9741") {
		t.Errorf("agent container with the component: env %v, args %v", c.Env, c.Args)
	}
	// The PodMonitor selects the DaemonSet's pods, on a port they declare.
	var pm struct {
		Spec struct {
			Selector struct {
				MatchLabels map[string]string `json:"matchLabels"`
			}
			PodMetricsEndpoints []struct{ Port string } `json:"podMetricsEndpoints"`
		}
	}
	data, err := os.ReadFile("monitoring/podmonitor.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &pm); err != nil {
		t.Fatal(err)
	}
	for k, v := range pm.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("PodMonitor selects %s=%s, the agent's pods have %v", k, v, ds.Spec.Template.Labels)
		}
	}
	if len(pm.Spec.PodMetricsEndpoints) != 1 || !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == pm.Spec.PodMetricsEndpoints[0].Port }) {
		t.Errorf("PodMonitor scrapes port %v, the container declares %v", pm.Spec.PodMetricsEndpoints, c.Ports)
	}
}
