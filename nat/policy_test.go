package nat

import (
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

func mustCompile(t testing.TB, in Input) *Policy {
	t.Helper()
	p, err := Compile(in)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return p
}

func mustParse(t testing.TB, file string, opts ParseOptions) Config {
	t.Helper()
	c, _, err := ParseConfig([]byte(file), opts)
	if err != nil {
		t.Fatalf("ParseConfig(%q): %v", file, err)
	}
	return c
}

func pass(prefix string, src Source) Decision {
	return Decision{Action: Passthrough, Prefix: netip.MustParsePrefix(prefix), Source: src}
}

func passFrom(prefix, policy string) Decision {
	return Decision{Action: Passthrough, Prefix: netip.MustParsePrefix(prefix), Source: SourceEgressPolicy, Origin: policy}
}

var masq = Decision{Action: Masquerade, Source: SourceNone}

type probe struct {
	dst  string
	want Decision
}

func checkDecisions(t *testing.T, p *Policy, in Input, probes []probe) {
	t.Helper()
	for _, pr := range probes {
		dst := netip.MustParseAddr(pr.dst)
		if got := p.Decide(dst); got != pr.want {
			t.Errorf("Decide(%s) = %+v, want %+v", pr.dst, got, pr.want)
		}
		if got := naiveDecide(in, dst); got != pr.want {
			t.Errorf("naiveDecide(%s) = %+v, want %+v (the test's reference disagrees)", pr.dst, got, pr.want)
		}
	}
}

// TestGKEStandardTable reproduces every row of the Standard-cluster table
// in shared/GKE-BEHAVIOUR.md, and the notes under it.
func TestGKEStandardTable(t *testing.T) {
	gkeFlags := ParseOptions{AllReservedRanges: true}
	custom := mustParse(t, "nonMasqueradeCIDRs: [192.168.0.0/16]\n", gkeFlags)
	noList := mustParse(t, "resyncInterval: 30s\n", gkeFlags)
	everything := mustParse(t, "nonMasqueradeCIDRs: [0.0.0.0/0]\n", gkeFlags)

	dir := t.TempDir()
	cm := filepath.Join(dir, "ip-masq-agent")
	if err := os.WriteFile(cm, []byte("nonMasqueradeCIDRs: [192.168.0.0/16]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	beforeDelete, _, err := LoadConfig(cm, gkeFlags)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(cm); err != nil {
		t.Fatal(err)
	}
	afterDelete, warnings, err := LoadConfig(cm, gkeFlags)
	if err != nil || len(warnings) != 1 || warnings[0].Kind != NoConfigFile {
		t.Fatalf("LoadConfig after delete: %v, %v", warnings, err)
	}

	defaults := []probe{
		{"10.1.2.3", pass("10.0.0.0/8", SourceDefault)},
		{"100.64.0.1", pass("100.64.0.0/10", SourceDefault)},
		{"198.19.255.255", pass("198.18.0.0/15", SourceDefault)},
		{"169.254.169.254", pass("169.254.0.0/16", SourceLinkLocal)},
		{"8.8.8.8", masq},
	}
	tests := []struct {
		name      string
		in        Input
		probes    []probe
		wantNotes []string
	}{
		{
			name: "DaemonSet with a custom nonMasqueradeCIDRs list: only the list keeps the pod address",
			in:   Input{Config: custom, AllReservedRanges: true},
			probes: []probe{
				{"192.168.7.7", pass("192.168.0.0/16", SourceConfig)},
				{"10.1.2.3", masq},
				{"100.64.0.1", masq},
				{"8.8.8.8", masq},
				{"169.254.169.254", pass("169.254.0.0/16", SourceLinkLocal)},
			},
		},
		{
			name:   "DaemonSet, ConfigMap without a list: defaults",
			in:     Input{Config: noList, AllReservedRanges: true},
			probes: defaults,
		},
		{
			name:   "DaemonSet, no ConfigMap at all: defaults",
			in:     Input{Config: DefaultConfig(true), AllReservedRanges: true},
			probes: defaults,
		},
		{
			name:      "no DaemonSet, cluster without --disable-default-snat: defaults (the ConfigMap is not read)",
			in:        Input{Config: custom, AllReservedRanges: true, NoAgent: true},
			probes:    defaults,
			wantNotes: []string{"no masquerade agent (--agent=false): the config file is not read, since no agent would read it"},
		},
		{
			name: "no DaemonSet, cluster with --disable-default-snat: the pod address is kept for every destination",
			in:   Input{Config: custom, AllReservedRanges: true, NoAgent: true, DisableDefaultSNAT: true},
			probes: []probe{
				{"10.1.2.3", pass("0.0.0.0/0", SourceDisableDefaultSNAT)},
				{"8.8.8.8", pass("0.0.0.0/0", SourceDisableDefaultSNAT)},
				{"169.254.169.254", pass("0.0.0.0/0", SourceDisableDefaultSNAT)},
			},
			wantNotes: []string{
				"no masquerade agent and --disable-default-snat: the pod address is kept for every destination",
				"no masquerade agent (--agent=false): the config file is not read, since no agent would read it",
			},
		},
		{
			name:      "DaemonSet present: --disable-default-snat has no effect",
			in:        Input{Config: DefaultConfig(true), AllReservedRanges: true, DisableDefaultSNAT: true},
			probes:    defaults,
			wantNotes: []string{"--disable-default-snat has no effect while the masquerade agent runs (as GKE documents)"},
		},
		{
			name: "DaemonSet present: --disable-default-snat has no effect on a custom list either",
			in:   Input{Config: custom, AllReservedRanges: true, DisableDefaultSNAT: true},
			probes: []probe{
				{"192.168.7.7", pass("192.168.0.0/16", SourceConfig)},
				{"8.8.8.8", masq},
			},
			wantNotes: []string{"--disable-default-snat has no effect while the masquerade agent runs (as GKE documents)"},
		},
		{
			name:   "the ConfigMap as it was before deletion",
			in:     Input{Config: beforeDelete, AllReservedRanges: true},
			probes: []probe{{"10.1.2.3", masq}, {"192.168.7.7", pass("192.168.0.0/16", SourceConfig)}},
		},
		{
			name:   "deleting the ConfigMap restores the defaults",
			in:     Input{Config: afterDelete, AllReservedRanges: true},
			probes: defaults,
		},
		{
			name: "nonMasqueradeCIDRs: [0.0.0.0/0] keeps the pod address for the internet too",
			in:   Input{Config: everything, AllReservedRanges: true},
			probes: []probe{
				{"8.8.8.8", pass("0.0.0.0/0", SourceConfig)},
				{"10.1.2.3", pass("0.0.0.0/0", SourceConfig)},
				{"169.254.169.254", pass("169.254.0.0/16", SourceLinkLocal)},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustCompile(t, tt.in)
			checkDecisions(t, p, tt.in, tt.probes)
			if !slices.Equal(p.Notes(), tt.wantNotes) {
				t.Errorf("Notes() = %q, want %q", p.Notes(), tt.wantNotes)
			}
		})
	}
}

// TestPolicySemantics covers issue 2 §3 rule by rule.
func TestPolicySemantics(t *testing.T) {
	v6 := ParseOptions{EnableIPv6: true}
	tests := []struct {
		name   string
		in     Input
		probes []probe
	}{
		{
			name: "GKE's eleven default ranges",
			in:   Input{Config: DefaultConfig(true)},
			probes: []probe{
				{"10.0.0.0", pass("10.0.0.0/8", SourceDefault)},
				{"172.31.255.255", pass("172.16.0.0/12", SourceDefault)},
				{"192.168.0.1", pass("192.168.0.0/16", SourceDefault)},
				{"100.127.0.1", pass("100.64.0.0/10", SourceDefault)},
				{"192.0.0.9", pass("192.0.0.0/24", SourceDefault)},
				{"192.0.2.1", pass("192.0.2.0/24", SourceDefault)},
				{"192.88.99.1", pass("192.88.99.0/24", SourceDefault)},
				{"198.18.0.1", pass("198.18.0.0/15", SourceDefault)},
				{"198.51.100.200", pass("198.51.100.0/24", SourceDefault)},
				{"203.0.113.5", pass("203.0.113.0/24", SourceDefault)},
				{"255.255.255.254", pass("240.0.0.0/4", SourceDefault)},
				{"172.32.0.1", masq},
				{"192.0.1.1", masq},
				{"1.1.1.1", masq},
				{"0.0.0.1", masq},
			},
		},
		{
			name: "--nomasq-all-reserved-ranges=false: RFC 1918 only",
			in:   Input{Config: DefaultConfig(false)},
			probes: []probe{
				{"10.0.0.1", pass("10.0.0.0/8", SourceDefault)},
				{"172.16.0.1", pass("172.16.0.0/12", SourceDefault)},
				{"192.168.0.1", pass("192.168.0.0/16", SourceDefault)},
				{"100.64.0.1", masq},
				{"240.0.0.1", masq},
			},
		},
		{
			name: "a custom list replaces the defaults, most specific prefix wins",
			in:   Input{Config: mustParse(t, "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16, 10.1.2.0/24, 10.1.0.0/16]\n", ParseOptions{AllReservedRanges: true})},
			probes: []probe{
				{"10.1.2.3", pass("10.1.2.0/24", SourceConfig)},
				{"10.1.3.3", pass("10.1.0.0/16", SourceConfig)},
				{"10.2.3.3", pass("10.0.0.0/8", SourceConfig)},
				{"172.16.0.1", masq},
			},
		},
		{
			name:   "an empty list masquerades everything but link-local",
			in:     Input{Config: mustParse(t, "nonMasqueradeCIDRs:\n", ParseOptions{})},
			probes: []probe{{"10.1.2.3", masq}, {"169.254.0.1", pass("169.254.0.0/16", SourceLinkLocal)}},
		},
		{
			name:   "masqLinkLocal masquerades 169.254.0.0/16",
			in:     Input{Config: mustParse(t, "masqLinkLocal: true\n", ParseOptions{})},
			probes: []probe{{"169.254.169.254", masq}, {"10.0.0.1", pass("10.0.0.0/8", SourceDefault)}},
		},
		{
			name:   "a listed link-local range is config's even with masqLinkLocal",
			in:     Input{Config: mustParse(t, "masqLinkLocal: true\nnonMasqueradeCIDRs: [169.254.0.0/16]\n", ParseOptions{})},
			probes: []probe{{"169.254.169.254", pass("169.254.0.0/16", SourceConfig)}},
		},
		{
			name:   "a listed link-local range is reported as config without masqLinkLocal too",
			in:     Input{Config: mustParse(t, "nonMasqueradeCIDRs: [169.254.0.0/16]\n", ParseOptions{})},
			probes: []probe{{"169.254.169.254", pass("169.254.0.0/16", SourceConfig)}},
		},
		{
			name: "0.0.0.0/0 and ::/0: everything keeps the pod address, link-local is more specific",
			in:   Input{Config: mustParse(t, "nonMasqueradeCIDRs: [0.0.0.0/0, \"::/0\"]\n", v6), EnableIPv6: true},
			probes: []probe{
				{"8.8.8.8", pass("0.0.0.0/0", SourceConfig)},
				{"2001:4860:4860::8888", pass("::/0", SourceConfig)},
				{"169.254.1.1", pass("169.254.0.0/16", SourceLinkLocal)},
				{"fe80::1", pass("fe80::/10", SourceLinkLocal)},
			},
		},
		{
			name: "IPv6 not enabled: IPv6 is never masqueraded",
			in:   Input{Config: DefaultConfig(true)},
			probes: []probe{
				{"2001:db8::1", pass("::/0", SourceIPv6Disabled)},
				{"fe80::1", pass("::/0", SourceIPv6Disabled)},
				{"::ffff:8.8.8.8", pass("::/0", SourceIPv6Disabled)},
				{"8.8.8.8", masq},
			},
		},
		{
			name: "IPv6 enabled",
			in:   Input{Config: mustParse(t, "nonMasqueradeCIDRs: [10.0.0.0/8, \"fd00::/8\"]\n", v6), EnableIPv6: true},
			probes: []probe{
				{"fd12::1", pass("fd00::/8", SourceConfig)},
				{"fe80::1", pass("fe80::/10", SourceLinkLocal)},
				{"2001:db8::1", masq},
				// Families are strict: a mapped address is IPv6 and
				// 10.0.0.0/8 does not contain it.
				{"::ffff:10.1.2.3", masq},
				{"10.1.2.3", pass("10.0.0.0/8", SourceConfig)},
			},
		},
		{
			name: "masqLinkLocalIPv6 masquerades fe80::/10",
			in:   Input{Config: mustParse(t, "masqLinkLocalIPv6: true\n", v6), EnableIPv6: true},
			probes: []probe{
				{"fe80::1", masq},
				{"169.254.0.1", pass("169.254.0.0/16", SourceLinkLocal)},
			},
		},
		{
			name: "cluster ranges are never masqueraded and win where more specific",
			in: Input{
				Config:       mustParse(t, "nonMasqueradeCIDRs: [10.0.0.0/8]\n", v6),
				EnableIPv6:   true,
				ClusterCIDRs: prefixes("10.244.0.0/14", "34.118.224.0/20", "10.0.0.0/8", "fd00:10:244::/56"),
			},
			probes: []probe{
				{"10.244.1.5", pass("10.244.0.0/14", SourceCluster)},
				{"34.118.224.10", pass("34.118.224.0/20", SourceCluster)},
				// Listed by both: the config file names it.
				{"10.9.9.9", pass("10.0.0.0/8", SourceConfig)},
				{"fd00:10:244::5", pass("fd00:10:244::/56", SourceCluster)},
				{"8.8.8.8", masq},
			},
		},
		{
			name: "cluster ranges without the agent",
			in:   Input{Config: DefaultConfig(true), AllReservedRanges: true, NoAgent: true, ClusterCIDRs: prefixes("34.118.224.0/20")},
			probes: []probe{
				{"34.118.224.10", pass("34.118.224.0/20", SourceCluster)},
				{"10.1.1.1", pass("10.0.0.0/8", SourceDefault)},
				{"8.8.8.8", masq},
			},
		},
		{
			name: "no agent and --disable-default-snat, IPv6 enabled",
			in:   Input{NoAgent: true, DisableDefaultSNAT: true, EnableIPv6: true, ClusterCIDRs: prefixes("10.244.0.0/14")},
			probes: []probe{
				{"2001:db8::1", pass("::/0", SourceDisableDefaultSNAT)},
				{"8.8.8.8", pass("0.0.0.0/0", SourceDisableDefaultSNAT)},
				{"10.244.0.1", pass("10.244.0.0/14", SourceCluster)},
			},
		},
		{
			name: "no agent: defaults follow --nomasq-all-reserved-ranges",
			in:   Input{NoAgent: true, AllReservedRanges: false},
			probes: []probe{
				{"10.1.1.1", pass("10.0.0.0/8", SourceDefault)},
				{"100.64.0.1", masq},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkDecisions(t, mustCompile(t, tt.in), tt.in, tt.probes)
		})
	}
}

// TestEgressPolicies covers the Autopilot model: the union of the
// policies' destinations plus the cluster ranges replaces the config list.
func TestEgressPolicies(t *testing.T) {
	file := `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: default}
spec:
  action: NoSNAT
  destinations: [{cidr: 10.0.0.0/8}, {cidr: 172.16.0.0/12}, {cidr: 192.168.0.0/16}]
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: gke-3f2a9c-1}
spec:
  action: NoSNAT
  destinations: [{cidr: 10.244.0.0/14}, {cidr: 34.118.224.0/20}]
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: a-partners}
spec:
  action: NoSNAT
  destinations: [{cidr: 10.0.0.0/8}, {cidr: 203.0.113.0/24}, {cidr: "2001:db8::/32"}]
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: broken}
spec: {action: NoSNAT, destinations: [{cidr: 10.0.0.1/8}]}
`
	policies, errs := ParseEgressPolicies([]byte(file))
	if len(errs) != 1 || len(policies) != 3 {
		t.Fatalf("ParseEgressPolicies: %d policies, errors %v", len(policies), errs)
	}
	cfg := mustParse(t, "nonMasqueradeCIDRs: [100.64.0.0/10]\nmasqLinkLocal: true\nresyncInterval: 10s\n", ParseOptions{EnableIPv6: true})
	in := Input{Config: cfg, EnableIPv6: true, UseEgressPolicies: true, EgressPolicies: policies, ClusterCIDRs: prefixes("10.96.0.0/12")}
	p := mustCompile(t, in)
	checkDecisions(t, p, in, []probe{
		// Listed by "default" and "a-partners": the first by name.
		{"10.1.2.3", passFrom("10.0.0.0/8", "a-partners")},
		{"172.16.0.1", passFrom("172.16.0.0/12", "default")},
		{"10.245.0.1", passFrom("10.244.0.0/14", "gke-3f2a9c-1")},
		{"203.0.113.9", passFrom("203.0.113.0/24", "a-partners")},
		{"2001:db8::1", passFrom("2001:db8::/32", "a-partners")},
		{"10.96.0.10", pass("10.96.0.0/12", SourceCluster)},
		// The config file's list is replaced; its masqLinkLocal is ignored.
		{"100.64.0.1", masq},
		{"169.254.169.254", pass("169.254.0.0/16", SourceLinkLocal)},
		{"fe80::1", pass("fe80::/10", SourceLinkLocal)},
		{"8.8.8.8", masq},
	})
	wantNotes := []string{
		"egress policies replace the config file's nonMasqueradeCIDRs",
		"masqLinkLocal and masqLinkLocalIPv6 are ignored with egress policies: link-local destinations are never masqueraded, as on Autopilot",
	}
	if !slices.Equal(p.Notes(), wantNotes) {
		t.Errorf("Notes() = %q, want %q", p.Notes(), wantNotes)
	}
	eff := p.Effective()
	wantCIDRs := []string{"10.0.0.0/8", "203.0.113.0/24", "2001:db8::/32", "172.16.0.0/12", "192.168.0.0/16", "10.244.0.0/14", "34.118.224.0/20", "10.96.0.0/12"}
	if !slices.Equal(eff.NonMasqueradeCIDRs, wantCIDRs) || eff.MasqLinkLocal || eff.ResyncInterval != cfg.ResyncInterval {
		t.Errorf("Effective() = %+v, want list %v, masqLinkLocal false, resync %v", eff, wantCIDRs, cfg.ResyncInterval)
	}

	t.Run("no valid policy leaves cluster ranges and link-local", func(t *testing.T) {
		in := Input{Config: DefaultConfig(true), UseEgressPolicies: true, ClusterCIDRs: prefixes("10.96.0.0/12")}
		checkDecisions(t, mustCompile(t, in), in, []probe{
			{"10.1.2.3", masq},
			{"10.96.0.1", pass("10.96.0.0/12", SourceCluster)},
			{"169.254.0.1", pass("169.254.0.0/16", SourceLinkLocal)},
		})
	})
	t.Run("without the agent policies are not applied", func(t *testing.T) {
		in := Input{Config: DefaultConfig(true), AllReservedRanges: true, NoAgent: true, UseEgressPolicies: true, EgressPolicies: policies}
		p := mustCompile(t, in)
		checkDecisions(t, p, in, []probe{
			{"203.0.113.9", pass("203.0.113.0/24", SourceDefault)},
			{"10.245.0.1", pass("10.0.0.0/8", SourceDefault)},
		})
		if notes := p.Notes(); !slices.Contains(notes, "no masquerade agent (--agent=false): egress policies are not applied, since no agent would apply them") {
			t.Errorf("Notes() = %q", notes)
		}
	})
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		in   Input
		want string
	}{
		{"invalid config", Input{Config: Config{NonMasqueradeCIDRs: []string{"10.0.0.1/8"}, ResyncInterval: 1, CIDRLimit: 5}}, `CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"`},
		{"ipv6 config without ipv6", Input{Config: Config{NonMasqueradeCIDRs: []string{"fd00::/8"}, ResyncInterval: 1, CIDRLimit: 5}}, "ipv6 is not enabled, but ipv6 cidr fd00::/8 provided. Enable ipv6 using --enable-ipv6 agent flag"},
		{"zero config", Input{}, "resyncInterval must be positive, got 0s"},
		{"misaligned cluster CIDR", Input{Config: DefaultConfig(true), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/14")}}, `cluster CIDR: CIDR "10.244.1.0/14" is not aligned to a CIDR block, ip: "10.244.1.0" network: "10.244.0.0/14"`},
		{"invalid cluster CIDR", Input{Config: DefaultConfig(true), ClusterCIDRs: []netip.Prefix{{}}}, `cluster CIDR: invalid prefix "invalid Prefix"`},
		{"mapped cluster CIDR", Input{Config: DefaultConfig(true), ClusterCIDRs: prefixes("::ffff:10.0.0.0/104")}, `cluster CIDR: CIDR "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR`},
		{"invalid config with egress policies", Input{UseEgressPolicies: true, Config: Config{CIDRLimit: 5}}, "resyncInterval must be positive, got 0s"},
		{"invalid egress destination", Input{Config: DefaultConfig(true), UseEgressPolicies: true, EgressPolicies: []EgressPolicy{{Name: "x", Destinations: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/8")}}}}, `EgressNATPolicy "x": CIDR "10.1.0.0/8" is not aligned to a CIDR block, ip: "10.1.0.0" network: "10.0.0.0/8"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.in)
			if errString(err) != tt.want {
				t.Errorf("Compile() error = %q, want %q", errString(err), tt.want)
			}
		})
	}
}

func TestNonMasquerade(t *testing.T) {
	v6 := ParseOptions{EnableIPv6: true}
	tests := []struct {
		name   string
		in     Input
		v4, v6 []string
	}{
		{
			name: "GKE defaults, IPv6 off",
			in:   Input{Config: DefaultConfig(true)},
			v4: []string{"10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
				"192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4"},
			v6: []string{"::/0"},
		},
		{
			name: "nested and duplicate prefixes dropped",
			in:   Input{Config: mustParse(t, "masqLinkLocal: true\nnonMasqueradeCIDRs: [10.1.0.0/16, 10.0.0.0/8, 10.0.0.0/8, 192.168.1.0/24, \"fd00::/8\", \"fd00:1::/32\"]\n", v6), EnableIPv6: true},
			v4:   []string{"10.0.0.0/8", "192.168.1.0/24"},
			v6:   []string{"fd00::/8", "fe80::/10"},
		},
		{
			name: "everything",
			in:   Input{Config: mustParse(t, "nonMasqueradeCIDRs: [0.0.0.0/0, 10.0.0.0/8]\nmasqLinkLocalIPv6: true\n", v6), EnableIPv6: true},
			v4:   []string{"0.0.0.0/0"},
			v6:   nil,
		},
		{
			name: "no agent, --disable-default-snat",
			in:   Input{NoAgent: true, DisableDefaultSNAT: true, EnableIPv6: true, ClusterCIDRs: prefixes("10.244.0.0/14")},
			v4:   []string{"0.0.0.0/0"},
			v6:   []string{"::/0"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustCompile(t, tt.in)
			if got := strs(p.NonMasquerade(false)); !slices.Equal(got, tt.v4) {
				t.Errorf("NonMasquerade(false) = %v, want %v", got, tt.v4)
			}
			if got := strs(p.NonMasquerade(true)); !slices.Equal(got, tt.v6) {
				t.Errorf("NonMasquerade(true) = %v, want %v", got, tt.v6)
			}
			// The fallback set must agree with Decide: a prefix in it is
			// passthrough at its first and last address.
			for _, v6 := range []bool{false, true} {
				for _, pr := range p.NonMasquerade(v6) {
					for _, a := range []netip.Addr{pr.Addr(), lastAddr(pr)} {
						if d := p.Decide(a); d.Action != Passthrough {
							t.Errorf("%s in NonMasquerade but Decide(%s) = %+v", pr, a, d)
						}
					}
				}
			}
		})
	}
	p := mustCompile(t, Input{Config: DefaultConfig(true)})
	s := p.NonMasquerade(false)
	s[0] = netip.Prefix{}
	if p.NonMasquerade(false)[0] != netip.MustParsePrefix("10.0.0.0/8") {
		t.Error("NonMasquerade shares its slice")
	}
}

func TestEffective(t *testing.T) {
	tests := []struct {
		name string
		in   Input
		want string
	}{
		{
			name: "defaults",
			in:   Input{Config: DefaultConfig(false)},
			want: `{"nonMasqueradeCIDRs":["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`,
		},
		{
			name: "config, canonical and deduplicated, cluster ranges appended",
			in: Input{
				Config:       mustParse(t, "nonMasqueradeCIDRs: [10.0.0.0/08, 10.0.0.0/8, \"FD00::/8\"]\nmasqLinkLocal: true\ncidrLimit: 5\nresyncInterval: 90s\n", ParseOptions{EnableIPv6: true}),
				EnableIPv6:   true,
				ClusterCIDRs: prefixes("10.0.0.0/8", "34.118.224.0/20"),
			},
			want: `{"nonMasqueradeCIDRs":["10.0.0.0/8","fd00::/8","34.118.224.0/20"],"masqLinkLocal":true,"masqLinkLocalIPv6":false,"resyncInterval":"1m30s","cidrLimit":5}`,
		},
		{
			name: "no agent ignores the config",
			in:   Input{Config: mustParse(t, "nonMasqueradeCIDRs: []\nmasqLinkLocal: true\n", ParseOptions{}), NoAgent: true},
			want: `{"nonMasqueradeCIDRs":["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`,
		},
		{
			name: "no agent, --disable-default-snat",
			in:   Input{NoAgent: true, DisableDefaultSNAT: true},
			want: `{"nonMasqueradeCIDRs":["0.0.0.0/0","::/0"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := json.Marshal(mustCompile(t, tt.in).Effective())
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("Effective() =\n %s\nwant\n %s", got, tt.want)
			}
		})
	}
}

func TestHash(t *testing.T) {
	compile := func(file string, mod func(*Input)) string {
		in := Input{Config: mustParse(t, file, ParseOptions{EnableIPv6: true}), EnableIPv6: true}
		if mod != nil {
			mod(&in)
		}
		return mustCompile(t, in).Hash()
	}
	base := compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n", nil)
	if len(base) != 16 || strings.Trim(base, "0123456789abcdef") != "" {
		t.Fatalf("Hash() = %q, want 16 hex digits", base)
	}
	same := map[string]string{
		"same input":    compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n", nil),
		"other order":   compile("nonMasqueradeCIDRs: [192.168.0.0/16, 10.0.0.0/8]\n", nil),
		"duplicates":    compile("nonMasqueradeCIDRs: [192.168.0.0/16, 10.0.0.0/8, 10.0.0.0/8]\n", nil),
		"resync change": compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nresyncInterval: 5s\n", nil),
	}
	for name, h := range same {
		if h != base {
			t.Errorf("%s: hash %s, want %s", name, h, base)
		}
	}
	differ := map[string]string{
		"one more prefix": compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 1.2.3.0/24]\n", nil),
		"masqLinkLocal":   compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nmasqLinkLocal: true\n", nil),
		"ipv6 off":        compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n", func(in *Input) { in.EnableIPv6 = false }),
		"source differs":  compile("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n", func(in *Input) { in.Config.CustomCIDRs = false }),
	}
	for name, h := range differ {
		if h == base {
			t.Errorf("%s: hash unchanged", name)
		}
	}
}

func TestDecideAllocs(t *testing.T) {
	p := mustCompile(t, Input{Config: DefaultConfig(true), EnableIPv6: true,
		UseEgressPolicies: true, EgressPolicies: []EgressPolicy{{Name: "default", Destinations: prefixes("10.0.0.0/8", "fd00::/8")}}})
	addrs := []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("8.8.8.8"), netip.MustParseAddr("fd00::1"), netip.MustParseAddr("2001:db8::1")}
	var sink Decision
	if n := testing.AllocsPerRun(1000, func() {
		for _, a := range addrs {
			sink = p.Decide(a)
		}
	}); n != 0 {
		t.Errorf("Decide allocates %.1f times per run", n)
	}
	_ = sink
}

// TestDecideConcurrent shares one Policy between goroutines; run with
// -race.
func TestDecideConcurrent(t *testing.T) {
	in := Input{Config: DefaultConfig(true), ClusterCIDRs: prefixes("34.118.224.0/20")}
	p := mustCompile(t, in)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				a := netip.AddrFrom4([4]byte{byte(g * 31), byte(i), byte(i >> 8), 1})
				if got, want := p.Decide(a), naiveDecide(in, a); got != want {
					t.Errorf("Decide(%s) = %+v, want %+v", a, got, want)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestDecisionIsComparable(t *testing.T) {
	seen := map[Decision]int{}
	seen[pass("10.0.0.0/8", SourceDefault)]++
	seen[pass("10.0.0.0/8", SourceDefault)]++
	seen[passFrom("10.0.0.0/8", "a")]++
	if len(seen) != 2 {
		t.Errorf("map of decisions has %d keys, want 2", len(seen))
	}
}

func TestActionAndSourceText(t *testing.T) {
	for _, a := range []Action{Masquerade, Passthrough} {
		b, err := a.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back Action
		if err := back.UnmarshalText(b); err != nil || back != a {
			t.Errorf("round trip of %v: %v, %v", a, back, err)
		}
	}
	if Masquerade.String() != "masquerade" || Passthrough.String() != "passthrough" || Action(0).String() != "unknown" {
		t.Error("Action names")
	}
	if _, err := Action(0).MarshalText(); err == nil {
		t.Error("zero Action marshals")
	}
	var a Action
	if a.UnmarshalText([]byte("")) == nil || a.UnmarshalText([]byte("drop")) == nil {
		t.Error("bad action text accepted")
	}
	want := []string{"none", "config", "default", "link-local", "egress-policy", "cluster", "disable-default-snat", "ipv6-disabled", "kernel-fallback", "masquerade-policy"}
	for i, name := range want {
		s := Source(i)
		b, err := s.MarshalText()
		if err != nil || string(b) != name {
			t.Errorf("Source(%d).MarshalText() = %s, %v, want %s", i, b, err, name)
		}
		var back Source
		if err := back.UnmarshalText(b); err != nil || back != s {
			t.Errorf("round trip of %v: %v, %v", s, back, err)
		}
	}
	if Source(len(want)).String() != "unknown" {
		t.Error("out-of-range Source name")
	}
	if _, err := Source(len(want)).MarshalText(); err == nil {
		t.Error("out-of-range Source marshals")
	}
}

func strs(ps []netip.Prefix) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// naiveDecide is the reference the tests and FuzzDecide hold Decide to:
// issue 2 §3 written as a linear scan, with no table, no deduplication and
// no precomputation.
func naiveDecide(in Input, dst netip.Addr) Decision {
	if dst.Is6() && !in.EnableIPv6 {
		return Decision{Action: Passthrough, Prefix: netip.MustParsePrefix("::/0"), Source: SourceIPv6Disabled}
	}
	type candidate struct {
		prefix string
		src    Source
		origin string
	}
	var cands []candidate
	masqLL, masqLL6 := in.Config.MasqLinkLocal, in.Config.MasqLinkLocalIPv6
	switch {
	case in.NoAgent && in.DisableDefaultSNAT:
		cands = append(cands, candidate{"0.0.0.0/0", SourceDisableDefaultSNAT, ""}, candidate{"::/0", SourceDisableDefaultSNAT, ""})
	case in.NoAgent:
		for _, s := range DefaultNonMasqueradeCIDRs(in.AllReservedRanges) {
			cands = append(cands, candidate{s, SourceDefault, ""})
		}
		masqLL, masqLL6 = false, false
	case in.UseEgressPolicies:
		names := []string{}
		for _, p := range in.EgressPolicies {
			names = append(names, p.Name)
		}
		slices.Sort(names)
		names = slices.Compact(names)
		for _, name := range names {
			for _, p := range in.EgressPolicies {
				if p.Name == name {
					for _, d := range p.Destinations {
						cands = append(cands, candidate{d.String(), SourceEgressPolicy, name})
					}
				}
			}
		}
		masqLL, masqLL6 = false, false
	default:
		src := SourceDefault
		if in.Config.CustomCIDRs {
			src = SourceConfig
		}
		for _, s := range in.Config.NonMasqueradeCIDRs {
			p, _ := parseCIDR(s)
			cands = append(cands, candidate{p.String(), src, ""})
		}
	}
	for _, c := range in.ClusterCIDRs {
		cands = append(cands, candidate{c.String(), SourceCluster, ""})
	}
	if !(in.NoAgent && in.DisableDefaultSNAT) {
		if !masqLL {
			cands = append(cands, candidate{"169.254.0.0/16", SourceLinkLocal, ""})
		}
		if !masqLL6 {
			cands = append(cands, candidate{"fe80::/10", SourceLinkLocal, ""})
		}
	}
	best := Decision{Action: Masquerade, Source: SourceNone}
	for _, c := range cands {
		p := netip.MustParsePrefix(c.prefix)
		if p.Contains(dst) && (best.Action == Masquerade || p.Bits() > best.Prefix.Bits()) {
			best = Decision{Action: Passthrough, Prefix: p, Source: c.src, Origin: c.origin}
		}
	}
	return best
}

// TestUniqueSorted checks the packed and merged sort against the plain
// one: every prefix's key sorted by compareKeys, first of each distinct
// prefix kept. The lists mix families, repeat prefixes, and include IPv6
// prefixes whose keys fall between IPv4 ones (::/0, ::1/128 and
// 64:ff9b::/96 sort below ::ffff:0:0/96, 2001:db8::/32 above).
func TestUniqueSorted(t *testing.T) {
	reference := func(prefixes []netip.Prefix) []int32 {
		keys := make([]prefixKey, len(prefixes))
		for i, p := range prefixes {
			keys[i] = keyOf(p, i)
		}
		slices.SortFunc(keys, compareKeys)
		var out []int32
		for i, k := range keys {
			if i > 0 && k.hi == keys[i-1].hi && k.lo == keys[i-1].lo && k.bitsIndex>>32 == keys[i-1].bitsIndex>>32 {
				continue
			}
			out = append(out, int32(k.bitsIndex))
		}
		return out
	}
	r := rand.New(rand.NewPCG(5, 5))
	v6 := []string{"::/0", "::1/128", "64:ff9b::/96", "2001:db8::/32", "fe80::/10", "100::/64"}
	for _, n := range []int{0, 1, 10, 300, 5000} {
		var prefixes []netip.Prefix
		for range n {
			switch r.IntN(10) {
			case 0:
				prefixes = append(prefixes, netip.MustParsePrefix(v6[r.IntN(len(v6))]))
			case 1:
				if len(prefixes) > 0 {
					prefixes = append(prefixes, prefixes[r.IntN(len(prefixes))])
					continue
				}
				fallthrough
			default:
				a := netip.AddrFrom4([4]byte{byte(r.IntN(4)), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())})
				prefixes = append(prefixes, netip.PrefixFrom(a, r.IntN(33)).Masked())
			}
		}
		if got, want := uniqueSorted(prefixes), reference(prefixes); !slices.Equal(got, want) {
			t.Errorf("n=%d: uniqueSorted = %v, want %v", n, got, want)
		}
	}
}
