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
	var ctl appsv1.Deployment
	for _, r := range built.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case r.GetKind() == "DaemonSet" && r.GetName() == "nfmasq":
			err = yaml.Unmarshal(y, &ds)
		case r.GetKind() == "Deployment" && r.GetName() == "nfmasq-egress-controller":
			err = yaml.Unmarshal(y, &ctl)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	c := ds.Spec.Template.Spec.Containers[0]
	hostIP := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "HOST_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	})
	if c.Name != "nfmasq" || hostIP < 0 || !slices.Contains(c.Args, "--metrics-scrape-addr=$(HOST_IP):9741") || !slices.Contains(c.Args, "--metrics-addr=127.0.0.1:9741") {
		t.Errorf("agent container with the component: env %v, args %v", c.Env, c.Args)
	}
	cc := ctl.Spec.Template.Spec.Containers[0]
	if !slices.Contains(cc.Args, "--metrics-addr=:9742") {
		t.Errorf("controller args with the component: %v", cc.Args)
	}
	// Each PodMonitor selects one workload's pods, on a port they declare.
	data, err := os.ReadFile("monitoring/podmonitor.yaml")
	if err != nil {
		t.Fatal(err)
	}
	docs := strings.Split(string(data), "\n---\n")
	if len(docs) != 2 {
		t.Fatalf("%d PodMonitors, want the agent's and the controller's", len(docs))
	}
	for i, tmpl := range []corev1.PodTemplateSpec{ds.Spec.Template, ctl.Spec.Template} {
		var pm struct {
			Spec struct {
				Selector struct {
					MatchLabels map[string]string `json:"matchLabels"`
				}
				PodMetricsEndpoints []struct{ Port string } `json:"podMetricsEndpoints"`
			}
		}
		if err := yaml.Unmarshal([]byte(docs[i]), &pm); err != nil {
			t.Fatal(err)
		}
		for k, v := range pm.Spec.Selector.MatchLabels {
			if tmpl.Labels[k] != v {
				t.Errorf("PodMonitor %d selects %s=%s, the pods have %v", i, k, v, tmpl.Labels)
			}
		}
		ports := tmpl.Spec.Containers[0].Ports
		if len(pm.Spec.PodMetricsEndpoints) != 1 || !slices.ContainsFunc(ports, func(p corev1.ContainerPort) bool { return p.Name == pm.Spec.PodMetricsEndpoints[0].Port }) {
			t.Errorf("PodMonitor %d scrapes port %v, the container declares %v", i, pm.Spec.PodMetricsEndpoints, ports)
		}
	}
}
