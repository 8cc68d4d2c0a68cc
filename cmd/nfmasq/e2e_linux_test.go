package main

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

var (
	internal4  = sandbox.Internal4
	internet4  = sandbox.Internet4
	cgnat4     = sandbox.CGNAT4
	linkLocal4 = sandbox.LinkLocal4
	internet6  = sandbox.Internet6
	internal6  = sandbox.Internal6
)

func both(dst netip.Addr, want string) []flowCase {
	return []flowCase{{"udp", dst, want}, {"tcp", dst, want}}
}

func cases(groups ...[]flowCase) []flowCase {
	var all []flowCase
	for _, g := range groups {
		all = append(all, g...)
	}
	return all
}

// GKE's Standard-cluster table, row by row, checked at the far end.
func TestAgentGKEStandardTable(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	tests := []struct {
		name   string
		config string // "" = no config file
		flags  []string
		flows  []flowCase
	}{
		{
			name:   "agent with custom nonMasqueradeCIDRs",
			config: "nonMasqueradeCIDRs:\n  - 11.0.0.0/8\n  - fd00:200::/64\n",
			flows: cases(both(internet4, "pod"), both(internal4, "node"), both(cgnat4, "node"),
				both(linkLocal4, "pod"), both(internal6, "pod"), both(internet6, "node")),
		},
		{
			name:  "agent without a config file: defaults",
			flows: cases(both(internal4, "pod"), both(cgnat4, "pod"), both(linkLocal4, "pod"), both(internet4, "node"), both(internet6, "node"), both(internal6, "node")),
		},
		{
			name:   "agent with an empty config file: defaults",
			config: "# nothing\n",
			flows:  cases(both(internal4, "pod"), both(internet4, "node")),
		},
		{
			name:  "no DaemonSet, default SNAT",
			flags: []string{"--agent=false"},
			flows: cases(both(internal4, "pod"), both(cgnat4, "pod"), both(internet4, "node")),
		},
		{
			name:  "no DaemonSet, --disable-default-snat",
			flags: []string{"--agent=false", "--disable-default-snat"},
			flows: cases(both(internal4, "pod"), both(internet4, "pod"), both(internet6, "pod")),
		},
		{
			name:  "DaemonSet present: --disable-default-snat has no effect",
			flags: []string{"--disable-default-snat"},
			flows: cases(both(internal4, "pod"), both(internet4, "node")),
		},
		{
			name:   "masqLinkLocal: true",
			config: "masqLinkLocal: true\n",
			flows:  cases(both(linkLocal4, "node"), both(internal4, "pod")),
		},
		{
			name:   "0.0.0.0/0 keeps the pod address everywhere",
			config: `{"nonMasqueradeCIDRs": ["0.0.0.0/0", "::/0"]}`,
			flows:  cases(both(internet4, "pod"), both(internal4, "pod"), both(linkLocal4, "pod"), both(internet6, "pod")),
		},
		{
			name:  "two balanced queues with a worker pool",
			flags: []string{"--queues", "2", "--workers", "2"},
			flows: cases(both(internal4, "pod"), both(internet4, "node"), both(internal6, "node"), both(linkLocal4, "pod")),
		},
		{
			name:  "upstream RFC 1918 defaults",
			flags: []string{"--nomasq-all-reserved-ranges=false"},
			flows: cases(both(internal4, "pod"), both(cgnat4, "node")),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			top := netnstest.NewTopology(t)
			dir := t.TempDir()
			cfg := filepath.Join(dir, "ip-masq-agent")
			if tt.config != "" {
				cfg = writeConfig(t, dir, tt.config)
			}
			a := startAgent(t, top, append([]string{"--config", cfg}, tt.flags...)...)
			checkFlows(t, top, 7000, tt.flows)
			// Every flow was decided by the agent (one queued packet each).
			a.waitMetric("decisions", func(v float64) bool { return v >= float64(len(tt.flows)) }, "nfmasq_decisions_total")
		})
	}
}

// Only the first packet of each flow reaches userspace; ICMP is decided too.
func TestAgentFirstPacketOnly(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	a := startAgent(t, top, "--config", filepath.Join(t.TempDir(), "none"))
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, 7100)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	const flows, perFlow = 4, 5
	for i := 0; i < flows; i++ {
		dst := internet4
		if i%2 == 1 {
			dst = internal4
		}
		if err := sendUDPBurst(top.Pod, netip.AddrPortFrom(dst, 7100), perFlow); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) >= flows*perFlow }); err != nil {
		t.Fatal(err)
	}
	queued := a.metric("nfmasq_queue_packets_total")
	if queued != flows {
		t.Errorf("%v packets reached userspace for %d flows of %d packets, want exactly %d", queued, flows, perFlow, flows)
	}
	// ICMP echo through the node: decided once, and the remote answers.
	netnstest.Run(t, top.Pod, "ping", "-c", "3", "-i", "0.2", "-W", "2", internet4.String())
	a.waitMetric("icmp decided", func(v float64) bool { return v >= flows+1 }, "nfmasq_queue_packets_total")
	if got := a.metric("nfmasq_queue_packets_total"); got != flows+1 {
		t.Errorf("after one ICMP echo flow of 3 pings, %v packets queued, want %d", got, flows+1)
	}
	// ICMPv6 echo likewise.
	netnstest.Run(t, top.Pod, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", internet6.String())
	a.waitMetric("icmpv6 decided", func(v float64) bool { return v >= flows+2 }, "nfmasq_queue_packets_total")
	if got := a.metric("nfmasq_queue_packets_total"); got != flows+2 {
		t.Errorf("after one ICMPv6 echo flow of 3 pings, %v packets queued, want %d", got, flows+2)
	}
}

// sendUDPBurst sends n datagrams on one socket (one flow) and waits for each echo.
func sendUDPBurst(ns *netns.NS, dst netip.AddrPort, n int) error {
	return udpFlow(ns, dst, n, nil)
}

// The agent reloads a changed file, keeps the last good policy on a bad one,
// restores defaults when the file goes, and re-decides live UDP flows.
func TestAgentReload(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "conntrack")
	top := netnstest.NewTopology(t)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1s\n")
	a := startAgent(t, top, "--config", cfg)
	gen := a.metric("nfmasq_policy_generation")
	checkFlows(t, top, 7200, cases(both(internet4, "node"), both(internal4, "pod")))

	// A long-lived UDP flow to the internet host, masqueraded now.
	flow := startLiveUDP(t, top, netip.AddrPortFrom(internet4, 7299))
	flow.expectSource(t, sandbox.NodeAddr4)

	// Change: the internet range becomes non-masquerade.
	writeConfig(t, dir, "nonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8]\nresyncInterval: 1s\n")
	gen = a.waitMetric("reload", func(v float64) bool { return v > gen }, "nfmasq_policy_applied_generation")
	checkFlows(t, top, 7201, cases(both(internet4, "pod"), both(internal4, "pod")))
	// The live UDP flow was re-decided: its conntrack entry was deleted.
	flow.expectSource(t, sandbox.PodAddr4)

	// Invalid file: the old policy keeps working, the failure is counted.
	writeConfig(t, dir, "nonMasqueradeCIDRs: [abcdefg]\n")
	a.waitMetric("reload failure", func(v float64) bool { return v >= 1 }, "nfmasq_config_reload_failures_total")
	checkFlows(t, top, 7202, cases(both(internet4, "pod"), both(internal4, "pod")))
	if got := a.metric("nfmasq_policy_generation"); got != gen {
		t.Errorf("policy generation moved to %v on an invalid file", got)
	}

	// Deleted file: defaults.
	if err := os.Remove(cfg); err != nil {
		t.Fatal(err)
	}
	a.waitMetric("defaults", func(v float64) bool { return v > gen }, "nfmasq_policy_applied_generation")
	checkFlows(t, top, 7203, cases(both(internet4, "node"), both(cgnat4, "pod")))
}

// kill -9 under traffic: the kernel fallback keeps every new flow right;
// a restart reproduces the same ruleset; uninstall removes everything.
func TestAgentKillRestartUninstall(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "ipset")
	top := netnstest.NewTopology(t)
	pristine := iptablesSave(t, top.Node)
	cfgFile := filepath.Join(t.TempDir(), "none")
	a := startAgent(t, top, "--config", cfgFile)
	installed := iptablesSave(t, top.Node)
	if !strings.Contains(installed, "NFMASQ") {
		t.Fatalf("no NFMASQ rules installed:\n%s", installed)
	}
	// kill -9 in the middle of a stream of new flows: no flow may arrive
	// with the wrong source, before, during or after the kill.
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, 7390)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	stream := make(chan int)
	go func() {
		sent := 0
		deadline := time.Now().Add(3 * time.Second)
		for i := 0; i < 400 && time.Now().Before(deadline); i++ {
			dst := internet4
			if i%2 == 1 {
				dst = internal4
			}
			// A lost first packet (queued when the agent died) only
			// costs this flow its echo; the source is what matters.
			_, _, _ = sandbox.SendUDP(top.Pod, netip.AddrPortFrom(dst, 7390), []byte("stream"), 50*time.Millisecond)
			sent++
			if i == 40 {
				a.stop(syscall.SIGKILL)
			}
		}
		stream <- sent
	}()
	sent := <-stream
	seen := sink.Seen()
	wrong := 0
	for _, s := range seen {
		want := sandbox.PodAddr4
		if s.Dst.Addr() == internet4 {
			want = sandbox.NodeAddr4
		}
		if s.Src.Addr() != want {
			wrong++
			t.Errorf("flow to %s arrived from %s, want %s", s.Dst, s.Src, want)
		}
	}
	t.Logf("kill -9 mid-stream: %d flows sent, %d arrived, %d with the wrong source", sent, len(seen), wrong)
	if len(seen) < sent/2 {
		t.Errorf("only %d of %d flows arrived around the kill", len(seen), sent)
	}
	// Agent gone: the fallback decides with the same policy.
	checkFlows(t, top, 7300, cases(both(internet4, "node"), both(internal4, "pod"), both(cgnat4, "pod"),
		both(linkLocal4, "pod"), both(internet6, "node")))

	b := startAgent(t, top, "--config", cfgFile)
	if got := iptablesSave(t, top.Node); got != installed {
		t.Errorf("ruleset after restart differs from the first start:\n--- first\n%s\n--- restart\n%s", installed, got)
	}
	b.stop(syscall.SIGTERM)
	// SIGTERM removes the queue rule (new flows go straight to the
	// fallback, nothing is dropped in a closing queue) and keeps the
	// fallback chain exactly as installed.
	if got, want := chainRules(iptablesSave(t, top.Node), "NFMASQ-FALLBACK"), chainRules(installed, "NFMASQ-FALLBACK"); got != want || want == "" {
		t.Errorf("SIGTERM must leave the fallback chain in place:\n--- installed\n%s\n--- after SIGTERM\n%s", want, got)
	}
	if strings.Contains(iptablesSave(t, top.Node), "NFQUEUE") {
		t.Errorf("SIGTERM left the queue rule in place")
	}
	// Flows still right after a graceful stop.
	checkFlows(t, top, 7301, cases(both(internet4, "node"), both(internal4, "pod")))

	self, _ := os.Executable()
	cmd := top.Node.Command(context.Background(), self, "uninstall", "--enable-ipv6")
	cmd.Env = append(os.Environ(), "NFMASQ_RUN_MAIN=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if got := withoutEmptyTables(iptablesSave(t, top.Node)); got != withoutEmptyTables(pristine) {
		t.Errorf("uninstall left state behind:\n--- before install\n%s\n--- after uninstall\n%s", pristine, got)
	}
	if out := netnstest.Run(t, top.Node, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
		t.Errorf("uninstall left ipsets: %s", out)
	}
}

// A rule set removed by another process comes back at the next resync.
func TestAgentRestoresRules(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, "resyncInterval: 300ms\n")
	a := startAgent(t, top, "--config", cfg)
	want := iptablesSave(t, top.Node)
	netnstest.Run(t, top.Node, "iptables", "-t", "nat", "-F", "NFMASQ-FALLBACK")
	a.waitMetric("restore", func(v float64) bool { return v >= 1 }, "nfmasq_rules_restored_total")
	if got := iptablesSave(t, top.Node); got != want {
		t.Errorf("ruleset not restored:\n--- want\n%s\n--- got\n%s", want, got)
	}
}

// The node's own traffic (and so hostNetwork pods) is never queued.
func TestAgentLeavesNodeTrafficAlone(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	a := startAgent(t, top, "--config", filepath.Join(t.TempDir(), "none"))
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, 7400)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	for _, dst := range []netip.Addr{internet4, internal4} {
		if _, ok, err := sandbox.SendUDP(top.Node, netip.AddrPortFrom(dst, 7400), []byte("node"), 3*time.Second); err != nil || !ok {
			t.Fatalf("node udp to %s: echo=%v err=%v", dst, ok, err)
		}
	}
	for _, s := range sink.Seen() {
		if s.Src.Addr() != sandbox.NodeAddr4 {
			t.Errorf("node traffic to %s arrived from %s", s.Dst, s.Src)
		}
	}
	if got := a.metric("nfmasq_queue_packets_total"); got != 0 {
		t.Errorf("node traffic reached the queue: %v packets", got)
	}
}

// chainRules returns the rules of one chain from iptables-save text.
func chainRules(save, chain string) string {
	var b strings.Builder
	for _, line := range strings.Split(save, "\n") {
		if strings.HasPrefix(line, "-A "+chain+" ") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// withoutEmptyTables drops tables that hold nothing but empty built-in
// chains with policy ACCEPT: iptables-restore creates a table it is told
// about, and no iptables command deletes one, so "left nothing behind"
// means no rule and no chain of ours, not no table.
func withoutEmptyTables(save string) string {
	var out, table []string
	empty := true
	for _, line := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			table, empty = []string{line}, true
		case line == "COMMIT":
			table = append(table, line)
			if !empty {
				out = append(out, table...)
			}
			table = nil
		case table != nil:
			table = append(table, line)
			if strings.HasPrefix(line, "-") || (strings.HasPrefix(line, ":") && !strings.HasSuffix(line, " ACCEPT")) {
				empty = false
			}
		default:
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
