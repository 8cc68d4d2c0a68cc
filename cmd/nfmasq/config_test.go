package main

import (
	"strings"
	"testing"
)

func TestConfigCommand(t *testing.T) {
	partial := writeFile(t, "partial.yaml", "masqLinkLocal: true\nresyncInterval: 5m\n")
	custom := writeFile(t, "custom.json", `{"nonMasqueradeCIDRs": ["192.168.0.0/16", "10.0.0.0/08", "FD00::/8"], "cidrLimit": 3, "masqLinkLocalIPv6": true}`)
	egress := writeFile(t, "p.yaml", "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: default}\nspec: {action: NoSNAT, destinations: [{cidr: 10.0.0.0/8}]}\n")
	tests := []struct {
		name       string
		args       []string
		want       string
		wantStderr string
	}{
		{
			name:       "no file: GKE defaults",
			args:       []string{"--config", noConfig(t)},
			want:       `{"nonMasqueradeCIDRs":["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16","100.64.0.0/10","192.0.0.0/24","192.0.2.0/24","192.88.99.0/24","198.18.0.0/15","198.51.100.0/24","203.0.113.0/24","240.0.0.0/4"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`,
			wantStderr: "warning: no config file at",
		},
		{
			name: "partial override, RFC 1918 defaults",
			args: []string{"--config", partial, "--nomasq-all-reserved-ranges=false"},
			want: `{"nonMasqueradeCIDRs":["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16"],"masqLinkLocal":true,"masqLinkLocalIPv6":false,"resyncInterval":"5m0s","cidrLimit":200000}`,
		},
		{
			name: "custom JSON list, canonical output, cluster ranges added",
			args: []string{"--config", custom, "--enable-ipv6", "--cluster-cidr", "10.244.0.0/14"},
			want: `{"nonMasqueradeCIDRs":["192.168.0.0/16","10.0.0.0/8","fd00::/8","10.244.0.0/14"],"masqLinkLocal":false,"masqLinkLocalIPv6":true,"resyncInterval":"1m0s","cidrLimit":3}`,
		},
		{
			name: "custom JSON list, canonical output",
			args: []string{"--config", custom, "--enable-ipv6"},
			want: `{"nonMasqueradeCIDRs":["192.168.0.0/16","10.0.0.0/8","fd00::/8"],"masqLinkLocal":false,"masqLinkLocalIPv6":true,"resyncInterval":"1m0s","cidrLimit":3}`,
		},
		{
			name:       "egress policies replace the list",
			args:       []string{"--config", partial, "--egress-policy", egress},
			want:       `{"nonMasqueradeCIDRs":["10.0.0.0/8"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"5m0s","cidrLimit":200000}`,
			wantStderr: "note: masqLinkLocal and masqLinkLocalIPv6 are ignored with egress policies",
		},
		{
			name:       "no agent, --disable-default-snat",
			args:       []string{"--config", custom, "--agent=false", "--disable-default-snat"},
			want:       `{"nonMasqueradeCIDRs":["0.0.0.0/0","::/0"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`,
			wantStderr: "note: no masquerade agent (--agent=false): the config file is not read",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := nfmasq(t, append([]string{"config"}, tt.args...)...)
			if code != exitOK {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			if stdout != tt.want+"\n" {
				t.Errorf("stdout:\n%s\nwant:\n%s", stdout, tt.want)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q lacks %q", stderr, tt.wantStderr)
			}
			// Without flags that add to or replace the file's list, the
			// output is itself a config file, and reads back the same.
			flags := strings.Join(tt.args, " ")
			if strings.Contains(flags, "--egress-policy") || strings.Contains(flags, "--agent=false") || strings.Contains(flags, "--cluster-cidr") {
				return
			}
			again := writeFile(t, "again.json", stdout)
			args := append([]string{"config", "--config", again}, tt.args[2:]...)
			back, stderr, code := nfmasq(t, args...)
			if code != exitOK || back != stdout {
				t.Errorf("read back: exit %d, %q (stderr %q), want %q", code, back, stderr, stdout)
			}
		})
	}
}
