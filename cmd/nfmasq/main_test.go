package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// nfmasq runs the CLI in-process. Runs share the command tree, so CLI
// tests must not be parallel.
func nfmasq(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// writeFile writes content to a fresh file in the test's directory.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// noConfig is a --config path that does not exist, so tests never read the
// machine's /etc/config/ip-masq-agent.
func noConfig(t *testing.T) string {
	return filepath.Join(t.TempDir(), "ip-masq-agent")
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"unknown command", []string{"frobnicate"}, `nfmasq: unknown command "frobnicate"`},
		{"unknown flag", []string{"explain", "--bogus", "1.1.1.1"}, "nfmasq: unknown flag: --bogus"},
		{"bad flag value", []string{"explain", "--agent=maybe", "1.1.1.1"}, `invalid argument "maybe" for "--agent"`},
		{"explain without addresses", []string{"explain"}, "nfmasq: requires at least 1 arg(s), only received 0"},
		{"config takes no arguments", []string{"config", "extra"}, `unknown command "extra" for "nfmasq config"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := nfmasq(t, tt.args...)
			if code != exitConfig || stdout != "" || !strings.Contains(stderr, tt.wantErr) || !strings.Contains(stderr, "nfmasq --help") {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 2 and %q with a usage hint", code, stdout, stderr, tt.wantErr)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{nil, {"--help"}, {"explain", "--help"}} {
		stdout, _, code := nfmasq(t, args...)
		if code != exitOK || !strings.Contains(stdout, "Usage:") {
			t.Errorf("nfmasq %q: exit %d, stdout %q", args, code, stdout)
		}
	}
}

// TestFlagsDoNotLeakBetweenRuns: a flag set in one run is back at its
// default in the next, as in a fresh process.
func TestFlagsDoNotLeakBetweenRuns(t *testing.T) {
	cfg := noConfig(t)
	policy := writeFile(t, "p.yaml", "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: p}\nspec: {action: NoSNAT, destinations: [{cidr: 8.8.8.0/24}]}\n")
	first, _, _ := nfmasq(t, "explain", "--config", cfg, "--agent=false", "--disable-default-snat", "--egress-policy", policy, "--cluster-cidr", "1.1.1.0/24", "1.1.1.1")
	if !strings.Contains(first, `"source":"cluster"`) {
		t.Fatalf("first run: %s", first)
	}
	second, _, _ := nfmasq(t, "explain", "--config", cfg, "1.1.1.1", "8.8.8.8")
	want := `{"dst":"1.1.1.1","action":"masquerade","prefix":"","source":"none"}
{"dst":"8.8.8.8","action":"masquerade","prefix":"","source":"none"}
`
	if second != want {
		t.Errorf("second run:\n%s\nwant\n%s", second, want)
	}
}

func TestVersion(t *testing.T) {
	stdout, _, code := nfmasq(t, "version")
	if code != exitOK || stdout != "dev\n" && !strings.HasPrefix(stdout, "v") {
		t.Errorf("version: exit %d, %q", code, stdout)
	}
	defer func(v string) { version = v }(version)
	version = "v1.2.3"
	if stdout, _, _ := nfmasq(t, "version"); stdout != "v1.2.3\n" {
		t.Errorf("version with ldflags = %q", stdout)
	}
}
