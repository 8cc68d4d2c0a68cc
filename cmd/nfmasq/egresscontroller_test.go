package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// TestEgressControllerStartupErrors checks that every bad invocation stops
// before touching a cluster, with exit status 2 and a message naming the
// flag.
func TestEgressControllerStartupErrors(t *testing.T) {
	// No in-cluster service account here, whatever machine runs the test.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	missing := filepath.Join(t.TempDir(), "kubeconfig")
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no cluster ranges", nil, "--cluster-cidr is required"},
		{"not a cidr", []string{"--cluster-cidr", "10.0.0.0"}, `--cluster-cidr "10.0.0.0": netip.ParsePrefix`},
		{"host bits", []string{"--cluster-cidr", "10.244.0.1/16"}, "has host bits set; did you mean 10.244.0.0/16?"},
		{"one bad among good", []string{"--cluster-cidr", "10.244.0.0/16,fd00::1/64"}, `--cluster-cidr "fd00::1/64" has host bits set`},
		{"configmap without namespace", []string{"--cluster-cidr", "10.244.0.0/16", "--configmap", "ip-masq-agent"}, `--configmap "ip-masq-agent": want NAMESPACE/NAME`},
		{"empty key", []string{"--cluster-cidr", "10.244.0.0/16", "--configmap-key", ""}, "--configmap-key is empty"},
		{"bad resync", []string{"--cluster-cidr", "10.244.0.0/16", "--resync", "0s"}, "--resync 0s: must be positive"},
		{"bad log level", []string{"--cluster-cidr", "10.244.0.0/16", "--log-level", "loud"}, "--log-level"},
		{"not in a cluster", []string{"--cluster-cidr", "10.244.0.0/16"}, "no --kubeconfig given and not running in a cluster"},
		{"missing kubeconfig", []string{"--cluster-cidr", "10.244.0.0/16", "--kubeconfig", missing}, "kubeconfig " + missing},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := nfmasq(t, append([]string{"egress-controller"}, tt.args...)...)
			if code != exitConfig || !strings.Contains(stderr, tt.wantErr) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, stderr, exitConfig, tt.wantErr)
			}
		})
	}
}

// TestEgressControllerOptions checks how flags become the controller's
// options where the mapping is more than a copy.
func TestEgressControllerOptions(t *testing.T) {
	tests := []struct {
		name         string
		args         []string
		wantGenerate bool
		wantCIDRs    string
	}{
		{"defaults", nil, true, "[10.244.0.0/16]"},
		{"no default policy", []string{"--generate-default-policy=false"}, false, "[10.244.0.0/16]"},
		{"explicitly on", []string{"--generate-default-policy"}, true, "[10.244.0.0/16]"},
		{"ranges repeated and listed", []string{"--cluster-cidr", "10.96.0.0/12, fd00::/108"}, true, "[10.244.0.0/16 10.96.0.0/12 fd00::/108]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var f egressControllerFlags
			cmd := egressControllerCmd(&f)
			if err := cmd.ParseFlags(append([]string{"--cluster-cidr=10.244.0.0/16"}, tt.args...)); err != nil {
				t.Fatal(err)
			}
			opts, err := f.options()
			if err != nil {
				t.Fatal(err)
			}
			if opts.GenerateDefaultPolicy != tt.wantGenerate {
				t.Errorf("GenerateDefaultPolicy %v, want %v", opts.GenerateDefaultPolicy, tt.wantGenerate)
			}
			if got := fmt.Sprint(opts.ClusterCIDRs); got != tt.wantCIDRs {
				t.Errorf("ClusterCIDRs %s, want %s", got, tt.wantCIDRs)
			}
			if opts.ConfigMap.String() != "kube-system/ip-masq-agent" {
				t.Errorf("ConfigMap %s", opts.ConfigMap)
			}
		})
	}
}
