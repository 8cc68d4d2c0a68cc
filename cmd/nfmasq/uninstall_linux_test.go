package main

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/rules"
)

// A node that switched backends has rules in both, and both reference the
// same ipsets: uninstall with auto must clean both and still destroy the
// sets, whichever backend it visits first.
func TestUninstallCommandBothBackends(t *testing.T) {
	netnstest.Require(t, "iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore",
		"ip6tables-legacy-restore", "iptables-nft-save", "iptables-legacy-save", "ipset")
	ctx := context.Background()
	ns := netnstest.New(t, "uninstall")
	runner := rules.NetNSRunner{Name: ns.Name}
	saved := commandRunner
	commandRunner = runner
	t.Cleanup(func() { commandRunner = saved })

	cfg := rules.DefaultConfig()
	cfg.EnableIPv6 = true
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}
	cfg.NonMasquerade4 = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	cfg.NonMasquerade6 = []netip.Prefix{netip.MustParsePrefix("fd00::/8")}
	cfg.IPSetThreshold = 0
	for _, b := range []rules.Backend{rules.BackendLegacy, rules.BackendNFT} {
		in := &rules.Installer{Runner: runner, Backend: b}
		if err := in.Install(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"uninstall", "--enable-ipv6"}, &stdout, &stderr); code != 0 {
		t.Fatalf("uninstall: exit %d: %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), "removed every nfmasq jump, chain and ipset") {
		t.Errorf("stdout = %q", stdout.String())
	}
	for _, tool := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if out := netnstest.Run(t, ns, tool); strings.Contains(out, rules.ChainPrefix) {
			t.Errorf("%s still shows nfmasq rules:\n%s", tool, out)
		}
	}
	if out := netnstest.Run(t, ns, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
		t.Errorf("ipsets left: %s", out)
	}
	// Nothing left to do is not an error.
	if code := run([]string{"uninstall"}, &stdout, &stderr); code != 0 {
		t.Fatalf("second uninstall: exit %d: %s", code, stderr.String())
	}
}
