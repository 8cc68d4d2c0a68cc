package rules

import (
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/mark"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		edit    func(*Config)
		wantErr string
	}{
		{"defaults", func(*Config) {}, ""},
		{"no pod CIDR", func(c *Config) { c.PodCIDRs = nil }, "no pod CIDR"},
		{"host bits", func(c *Config) { c.PodCIDRs = prefixes(t, "10.244.1.1/24") }, "did you mean 10.244.1.0/24"},
		{"IPv6 pod without IPv6", func(c *Config) { c.PodCIDRs = prefixes(t, "fd00::/64") }, "IPv6 is not enabled"},
		{"IPv6 in the IPv4 list", func(c *Config) { c.NonMasquerade4 = prefixes(t, "fd00::/8") }, "in the IPv4 list"},
		{"4in6", func(c *Config) { c.EnableIPv6 = true; c.NonMasquerade6 = prefixes(t, "::ffff:10.0.0.0/104") }, "plain"},
		{"one-bit mask", func(c *Config) {
			c.Mark = mark.Layout{Mask: 0x1000, Masquerade: 0x1000, Passthrough: 0x1000, Fallback: 0x1000}
		}, "fewer than 2 bits"},
		{"same marks", func(c *Config) { c.Mark.Passthrough = c.Mark.Masquerade }, "both"},
		{"mark outside mask", func(c *Config) { c.Mark.Fallback = 0x10 }, "inside the mask"},
		{"marks unused in kernel-only", func(c *Config) { c.Mark = mark.Layout{}; c.QueueEnabled = false }, ""},
		{"zero queues", func(c *Config) { c.Queues = 0 }, "at least 1"},
		{"queues past 65535", func(c *Config) { c.QueueNum, c.Queues = 65535, 2 }, "past 65535"},
		{"single port", func(c *Config) { c.ToPorts = "40000" }, ""},
		{"no ports", func(c *Config) { c.ToPorts = "" }, ""},
		{"reversed ports", func(c *Config) { c.ToPorts = "2-1" }, "to-ports"},
		{"port zero", func(c *Config) { c.ToPorts = "0-10" }, "to-ports"},
		{"port too big", func(c *Config) { c.ToPorts = "1-65536" }, "to-ports"},
		{"negative threshold", func(c *Config) { c.IPSetThreshold = -1 }, "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t)
			tt.edit(&cfg)
			err := cfg.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate = %v, want an error mentioning %q", err, tt.wantErr)
			}
		})
	}
}

func TestUsesSet(t *testing.T) {
	tests := []struct {
		name      string
		list      []string
		threshold int
		want      bool
	}{
		{"short list", ipMasqAgentDefaults, 4, false},
		{"over the threshold", ipMasqAgentDefaults, 3, true},
		{"threshold 0", []string{"10.0.0.0/8"}, 0, true},
		{"empty list", nil, 0, false},
		{"default route", []string{"0.0.0.0/0", "10.0.0.0/8"}, 0, false},
	}
	for _, tt := range tests {
		cfg := testConfig(t)
		cfg.NonMasquerade4 = prefixes(t, tt.list...)
		cfg.IPSetThreshold = tt.threshold
		if got := cfg.usesSet(IPv4); got != tt.want {
			t.Errorf("%s: usesSet = %v, want %v", tt.name, got, tt.want)
		}
	}
}
