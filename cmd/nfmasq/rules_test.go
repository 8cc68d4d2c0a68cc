package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/rules"
)

func TestRulesCommand(t *testing.T) {
	noConfig := "--config=" + t.TempDir() + "/none"
	tests := []struct {
		name     string
		args     []string
		wantCode int
		want     []string // lines or fragments of stdout
		notWant  []string
		wantErr  string // fragment of stderr
	}{
		{
			name: "defaults",
			args: []string{"--pod-cidr", "10.244.1.0/24"},
			want: []string{
				"# IPv4: iptables-restore -w --noflush\n",
				"-A NFMASQ-FORWARD -s 10.244.1.0/24 -m connmark --mark 0x0/0x3000 ",
				"-j NFQUEUE --queue-num 150 --queue-bypass\n",
				"-A NFMASQ-FALLBACK -d 100.64.0.0/10 ", // GKE's defaults
				"-j MASQUERADE --to-ports 32768-65535 --random-fully\n",
			},
			notWant: []string{"ipset", "IPv6"},
		},
		{
			name: "every dataplane flag",
			args: []string{"--pod-cidr", "10.244.1.0/24,fd00:10:244:1::/64", "--enable-ipv6",
				"--mark-mask", "0x30", "--queue-num", "200", "--queues", "2", "--random-fully=false",
				"--to-ports", "", "--ipset-threshold", "0", "--iptables-backend", "legacy"},
			want: []string{
				"# IPv4: ipset restore\ncreate nfmasq-nomasq-v4-tmp hash:net family inet ",
				"# IPv6: ipset restore\ncreate nfmasq-nomasq-v6-tmp hash:net family inet6 ",
				"# IPv4: iptables-legacy-restore -w --noflush\n",
				"# IPv6: ip6tables-legacy-restore -w --noflush\n",
				"-s fd00:10:244:1::/64 -m connmark --mark 0x0/0x30 ",
				"--queue-balance 200:201 --queue-bypass\n",
				"-m connmark --mark 0x10/0x30 ",
				"-m set --match-set nfmasq-nomasq-v6 dst ",
				"-j MASQUERADE\n",
			},
			notWant: []string{"--random-fully", "--to-ports"},
		},
		{
			name: "masquerade nothing",
			args: []string{"--pod-cidr", "10.244.1.0/24", "--nomasq-all-reserved-ranges=false",
				"--cluster-cidr", "0.0.0.0/0"},
			want: []string{`-A NFMASQ-FALLBACK -m comment --comment "nfmasq: non-masquerade: every destination" -j RETURN` + "\n"},
		},
		{
			name: "a pod's MasqueradePolicies",
			args: []string{"--pod-cidr", "10.244.1.0/24", "--cluster-cidr", "10.244.0.0/16",
				"--masquerade-policy", writeFile(t, "mp.yaml", "apiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: keep}\nspec: {action: NoSNAT, podSelector: {matchLabels: {app: billing}}, destinations: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]}\n"),
				"--pod-namespace", "pay", "--pod-labels", "app=billing", "--pod-ip", "10.244.1.7"},
			want: []string{
				"# IPv4: ipset restore (MasqueradePolicy sets)\n",
				"add nfmasq-mp-",
				"-s4-t 10.244.1.7\n",
				"-k4-t 203.0.113.128/25 nomatch\n",
				"-k4-t 10.244.0.0/16 nomatch\n", // a cluster range: the node policy's
				`dst -m comment --comment "nfmasq: MasqueradePolicy set `,
			},
			notWant: []string{"-m4"},
		},
		{name: "a pod's MasqueradePolicies without its address", args: []string{"--pod-cidr", "10.244.1.0/24", "--masquerade-policy", "x.yaml", "--pod-namespace", "pay"},
			wantCode: exitConfig, wantErr: "--masquerade-policy needs --pod-ip"},
		{name: "no pod CIDR", args: nil, wantCode: exitConfig, wantErr: "--pod-cidr is required"},
		{name: "IPv6 pod CIDR without IPv6", args: []string{"--pod-cidr", "fd00::/64"}, wantCode: exitConfig, wantErr: "add --enable-ipv6"},
		{name: "bad pod CIDR", args: []string{"--pod-cidr", "10.244.1.0"}, wantCode: exitConfig, wantErr: "--pod-cidr"},
		{name: "host bits", args: []string{"--pod-cidr", "10.244.1.1/24"}, wantCode: exitConfig, wantErr: "did you mean 10.244.1.0/24"},
		{name: "mark mask with one bit", args: []string{"--pod-cidr", "10.244.1.0/24", "--mark-mask", "0x1000"}, wantCode: exitConfig, wantErr: "fewer than 2 bits"},
		{name: "mark mask on Calico's bits", args: []string{"--pod-cidr", "10.244.1.0/24", "--mark-mask", "0x30000"}, wantCode: exitConfig, wantErr: "Calico"},
		{name: "bad backend", args: []string{"--pod-cidr", "10.244.1.0/24", "--iptables-backend", "ebpf"}, wantCode: exitConfig, wantErr: "want auto, nft or legacy"},
		{name: "bad ports", args: []string{"--pod-cidr", "10.244.1.0/24", "--to-ports", "9-1"}, wantCode: exitConfig, wantErr: "to-ports"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"rules", noConfig}, tt.args...), &stdout, &stderr)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, tt.wantCode, stderr.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout.String())
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(stdout.String(), w) {
					t.Errorf("stdout has %q:\n%s", w, stdout.String())
				}
			}
			if !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("stderr lacks %q:\n%s", tt.wantErr, stderr.String())
			}
		})
	}
}

// The printed payload is exactly what the rules package renders for the
// same Config: the flags add nothing of their own.
func TestRulesCommandMatchesRender(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"rules", "--config=" + t.TempDir() + "/none", "--pod-cidr=10.244.1.0/24",
		"--nomasq-all-reserved-ranges=false"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	cfg := rules.DefaultConfig()
	cfg.PodCIDRs = rulesTestPrefixes(t, "10.244.1.0/24")
	cfg.NonMasquerade4 = rulesTestPrefixes(t, "10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
	want, err := rules.Render(cfg, "")
	if err != nil {
		t.Fatal(err)
	}
	if stdout.String() != want {
		t.Errorf("nfmasq rules printed:\n%s\nwant:\n%s", stdout.String(), want)
	}
}

func rulesTestPrefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}
