package main

import (
	"slices"
	"strings"
	"testing"
)

func TestExplain(t *testing.T) {
	egress := writeFile(t, "policies.yaml", `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: default}
spec: {action: NoSNAT, destinations: [{cidr: 10.0.0.0/8}]}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: partners}
spec: {action: NoSNAT, destinations: [{cidr: 203.0.113.0/24}]}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: broken}
spec: {action: NoSNAT, destinations: [{cidr: 10.0.0.1/8}]}
`)
	egressDup := writeFile(t, "more.yaml", "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: partners}\nspec: {action: NoSNAT, destinations: [{cidr: 8.8.8.0/24}]}\n")
	custom := writeFile(t, "custom.yaml", "nonMasqueradeCIDRs:\n  - 192.168.0.0/16\n  - \"fd00::/8\"\nnonMasqueradeCidr: [1.0.0.0/8]\n")
	everything := writeFile(t, "all.yaml", `{"nonMasqueradeCIDRs": ["0.0.0.0/0"]}`)

	tests := []struct {
		name       string
		args       []string
		wantOut    string
		wantCode   int
		wantStderr []string
	}{
		{
			name: "the issue's examples, built-in defaults",
			args: []string{"8.8.8.8", "10.1.2.3"},
			wantOut: `{"dst":"8.8.8.8","action":"masquerade","prefix":"","source":"none"}
{"dst":"10.1.2.3","action":"passthrough","prefix":"10.0.0.0/8","source":"default"}
`,
			wantStderr: []string{"warning: no config file at", "using defaults"},
		},
		{
			name: "bad addresses are reported per argument, the rest still decided",
			args: []string{"not-an-ip", "100.64.0.1", "10.0.0.0/8", "fe80::1%eth0"},
			wantOut: `{"dst":"not-an-ip","error":"ParseAddr(\"not-an-ip\"): unable to parse IP"}
{"dst":"100.64.0.1","action":"passthrough","prefix":"100.64.0.0/10","source":"default"}
{"dst":"10.0.0.0/8","error":"ParseAddr(\"10.0.0.0/8\"): unexpected character (at \"/8\")"}
{"dst":"fe80::1%eth0","error":"address \"fe80::1%eth0\" has a zone; packets carry none"}
`,
			wantCode:   exitFailure,
			wantStderr: []string{"nfmasq: 3 of 4 arguments are not IP addresses"},
		},
		{
			name: "RFC 1918 only",
			args: []string{"--nomasq-all-reserved-ranges=false", "100.64.0.1", "172.16.0.1"},
			wantOut: `{"dst":"100.64.0.1","action":"masquerade","prefix":"","source":"none"}
{"dst":"172.16.0.1","action":"passthrough","prefix":"172.16.0.0/12","source":"default"}
`,
		},
		{
			name: "custom list with IPv6, unknown key warned",
			args: []string{"--config", custom, "--enable-ipv6", "192.168.1.1", "10.1.1.1", "fd00::5", "fe80::1", "2001:db8::1", "169.254.169.254"},
			wantOut: `{"dst":"192.168.1.1","action":"passthrough","prefix":"192.168.0.0/16","source":"config"}
{"dst":"10.1.1.1","action":"masquerade","prefix":"","source":"none"}
{"dst":"fd00::5","action":"passthrough","prefix":"fd00::/8","source":"config"}
{"dst":"fe80::1","action":"passthrough","prefix":"fe80::/10","source":"link-local"}
{"dst":"2001:db8::1","action":"masquerade","prefix":"","source":"none"}
{"dst":"169.254.169.254","action":"passthrough","prefix":"169.254.0.0/16","source":"link-local"}
`,
			wantStderr: []string{`warning: unknown key "nonMasqueradeCidr" ignored`},
		},
		{
			name: "0.0.0.0/0 keeps the pod address for the internet",
			args: []string{"--config", everything, "8.8.8.8"},
			wantOut: `{"dst":"8.8.8.8","action":"passthrough","prefix":"0.0.0.0/0","source":"config"}
`,
		},
		{
			name: "no agent, --disable-default-snat: everything keeps the pod address; the config is not read",
			args: []string{"--config", custom, "--agent=false", "--disable-default-snat", "8.8.8.8"},
			wantOut: `{"dst":"8.8.8.8","action":"passthrough","prefix":"0.0.0.0/0","source":"disable-default-snat"}
`,
			wantStderr: []string{"note: no masquerade agent and --disable-default-snat", "note: no masquerade agent (--agent=false): the config file is not read"},
		},
		{
			name: "no agent, no --disable-default-snat: defaults",
			args: []string{"--config", custom, "--agent=false", "192.168.1.1", "10.1.1.1", "8.8.8.8"},
			wantOut: `{"dst":"192.168.1.1","action":"passthrough","prefix":"192.168.0.0/16","source":"default"}
{"dst":"10.1.1.1","action":"passthrough","prefix":"10.0.0.0/8","source":"default"}
{"dst":"8.8.8.8","action":"masquerade","prefix":"","source":"none"}
`,
		},
		{
			name: "--disable-default-snat with the agent has no effect",
			args: []string{"--config", noConfig(t), "--disable-default-snat", "8.8.8.8"},
			wantOut: `{"dst":"8.8.8.8","action":"masquerade","prefix":"","source":"none"}
`,
			wantStderr: []string{"note: --disable-default-snat has no effect while the masquerade agent runs"},
		},
		{
			name: "egress policies: origin named, invalid object and duplicate skipped, cluster ranges",
			args: []string{"--config", noConfig(t), "--egress-policy", egress, "--egress-policy", egressDup,
				"--cluster-cidr", "34.118.224.0/20,10.244.0.0/14", "203.0.113.7", "10.9.9.9", "10.245.0.1", "34.118.224.1", "100.64.0.1", "8.8.8.8"},
			wantOut: `{"dst":"203.0.113.7","action":"passthrough","prefix":"203.0.113.0/24","source":"egress-policy","origin":"partners"}
{"dst":"10.9.9.9","action":"passthrough","prefix":"10.0.0.0/8","source":"egress-policy","origin":"default"}
{"dst":"10.245.0.1","action":"passthrough","prefix":"10.244.0.0/14","source":"cluster"}
{"dst":"34.118.224.1","action":"passthrough","prefix":"34.118.224.0/20","source":"cluster"}
{"dst":"100.64.0.1","action":"masquerade","prefix":"","source":"none"}
{"dst":"8.8.8.8","action":"masquerade","prefix":"","source":"none"}
`,
			wantStderr: []string{
				`: document at line 11: EgressNATPolicy "broken": spec.destinations[0].cidr: CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"; skipped`,
				`more.yaml: EgressNATPolicy "partners" is also defined in `,
			},
		},
		{
			name: "IPv6 not enabled",
			args: []string{"--config", noConfig(t), "2001:db8::1"},
			wantOut: `{"dst":"2001:db8::1","action":"passthrough","prefix":"::/0","source":"ipv6-disabled"}
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"explain"}, tt.args...)
			if !strings.Contains(strings.Join(tt.args, " "), "--config") {
				args = append(args, "--config", noConfig(t))
			}
			stdout, stderr, code := nfmasq(t, args...)
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d (stderr %q)", code, tt.wantCode, stderr)
			}
			if stdout != tt.wantOut {
				t.Errorf("stdout:\n%s\nwant:\n%s", stdout, tt.wantOut)
			}
			for _, w := range tt.wantStderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q lacks %q", stderr, w)
				}
			}
		})
	}
}

func TestExplainConfigErrors(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		args    []string
		wantErr string
	}{
		{name: "unparsable CIDR", file: "nonMasqueradeCIDRs: [abcdefg]\n", wantErr: `CIDR "abcdefg" could not be parsed, invalid CIDR address: abcdefg`},
		{name: "misaligned CIDR", file: "nonMasqueradeCIDRs: [10.0.0.1/8]\n", wantErr: `CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"`},
		{name: "cidrLimit", file: "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\n", wantErr: "the daemon can only accept up to 2 CIDRs (excluding link-local), but got 3 CIDRs (excluding link local)"},
		{name: "ipv6 without --enable-ipv6", file: "nonMasqueradeCIDRs: [\"fd00::/8\"]\n", wantErr: "Enable ipv6 using --enable-ipv6 agent flag"},
		{name: "yaml syntax", file: "masqLinkLocal: true\nnonMasqueradeCIDRs: [10.0.0.0/8\n", wantErr: "yaml: line 3: did not find expected ',' or ']'"},
		{name: "json syntax", file: "{\n\"masqLinkLocal\": tru\n}", wantErr: `invalid character '\n' in literal true (expecting 'e') at line 2, column 21`},
		{name: "resyncInterval without unit", file: "resyncInterval: 60\n", wantErr: `expected string value for unmarshal to field of type Duration, got "60"`},
		{name: "bad cluster CIDR", file: "", args: []string{"--cluster-cidr", "10.244.1.0/14"}, wantErr: `--cluster-cidr: CIDR "10.244.1.0/14" is not aligned`},
		{name: "missing egress policy file", file: "", args: []string{"--egress-policy", "/nonexistent/policies.yaml"}, wantErr: "--egress-policy: open /nonexistent/policies.yaml: no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, "ip-masq-agent", tt.file)
			args := append([]string{"explain", "--config", path}, tt.args...)
			stdout, stderr, code := nfmasq(t, append(args, "8.8.8.8")...)
			if code != exitConfig || stdout != "" {
				t.Errorf("exit %d, stdout %q; want exit 2 and no output", code, stdout)
			}
			if !strings.HasPrefix(stderr, "nfmasq: ") || !strings.Contains(stderr, tt.wantErr) {
				t.Errorf("stderr %q, want %q", stderr, tt.wantErr)
			}
			// config reports the same error the same way.
			stdout, stderr2, code := nfmasq(t, append([]string{"config"}, args[1:]...)...)
			if code != exitConfig || stdout != "" || stderr2 != stderr {
				t.Errorf("config: exit %d, stdout %q, stderr %q; want exit 2 and %q", code, stdout, stderr2, stderr)
			}
		})
	}
}

// explain models MasqueradePolicies for a pod given by its namespace and
// labels; invalid objects are reported and skipped.
func TestExplainMasqueradePolicy(t *testing.T) {
	policies := writeFile(t, "policies.yaml", `apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: partner-keeps-pod-ips}
spec:
  namespaceSelector: {matchLabels: {team: payments}}
  podSelector: {matchLabels: {app: billing}}
  action: NoSNAT
  destinations: [{cidr: 11.0.0.0/24, except: [11.0.0.128/25]}]
---
apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: broken}
spec: {action: Drop, destinations: [{cidr: 1.0.0.0/8}]}
`)
	args := []string{"explain", "--config", noConfig(t), "--masquerade-policy", policies, "--pod-namespace", "pay",
		"--pod-labels", "app=billing", "--namespace-labels", "team=payments"}
	stdout, stderr, code := nfmasq(t, append(args, "11.0.0.7", "11.0.0.200")...)
	if code != 0 || !strings.Contains(stderr, `MasqueradePolicy "broken"`) {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	want := `{"dst":"11.0.0.7","action":"passthrough","prefix":"11.0.0.0/24","source":"masquerade-policy","origin":"partner-keeps-pod-ips"}
{"dst":"11.0.0.200","action":"masquerade","prefix":"","source":"none"}
`
	if stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", stdout, want)
	}
	// Another pod: the node policy.
	other := slices.Clone(args)
	other[len(other)-3] = "app=web"
	if stdout, _, _ := nfmasq(t, append(other, "11.0.0.7")...); !strings.Contains(stdout, `"source":"none"`) {
		t.Errorf("a pod no policy selects: %s", stdout)
	}
	if _, stderr, code := nfmasq(t, "explain", "--config", noConfig(t), "--masquerade-policy", policies, "11.0.0.7"); code != exitConfig || !strings.Contains(stderr, "--pod-namespace") {
		t.Errorf("no pod namespace: exit %d, %q", code, stderr)
	}
}
