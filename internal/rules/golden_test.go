package rules

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func prefixes(t testing.TB, ss ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = p
	}
	return out
}

// ipMasqAgentDefaults are ip-masq-agent's default non-masquerade ranges
// (RFC 1918 plus link-local), canonical and sorted.
var ipMasqAgentDefaults = []string{"10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"}

func testConfig(t testing.TB) Config {
	cfg := DefaultConfig()
	cfg.PodCIDRs = prefixes(t, "10.244.1.0/24")
	cfg.NonMasquerade4 = prefixes(t, ipMasqAgentDefaults...)
	return cfg
}

func dualStack(t testing.TB, cfg *Config) {
	cfg.EnableIPv6 = true
	cfg.PodCIDRs = append(cfg.PodCIDRs, prefixes(t, "fd00:10:244:1::/64")...)
	cfg.NonMasquerade6 = prefixes(t, "fd00::/8", "fe80::/10")
}

// manyPrefixes returns n distinct, sorted /24s in 100.64.0.0/10.
func manyPrefixes(t testing.TB, n int) []netip.Prefix {
	ss := make([]string, n)
	for i := range ss {
		ss[i] = fmt.Sprintf("100.%d.%d.0/24", 64+i/256, i%256)
	}
	return prefixes(t, ss...)
}

func TestRenderGolden(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Config)
	}{
		{"defaults-ipv4", func(*Config) {}},
		{"dual-stack", func(c *Config) { dualStack(t, c) }},
		{"default-route", func(c *Config) { c.NonMasquerade4 = prefixes(t, "0.0.0.0/0") }},
		{"masq-link-local", func(c *Config) { c.NonMasquerade4 = prefixes(t, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16") }},
		{"ipset-5000", func(c *Config) { c.NonMasquerade4 = manyPrefixes(t, 5000) }},
		{"queues-2", func(c *Config) { c.Queues = 2 }},
		{"kernel-only", func(c *Config) { c.QueueEnabled = false }},
		{"no-ports-no-random", func(c *Config) { c.ToPorts, c.RandomFully = "", false }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t)
			tt.edit(&cfg)
			got, err := Render(cfg, BackendNFT)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", tt.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("Render differs from %s (-want +got):\n%s", path, diff)
			}
		})
	}
}
