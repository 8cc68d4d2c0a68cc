package main

import (
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// ipMasqAgentRules is ip-masq-agent's nat payload for nonMasqueradeCIDRs
// [10.0.0.0/8] (masqLinkLocal false): its chain, one RETURN per
// non-masquerade CIDR, MASQUERADE last, and the POSTROUTING jump, with its
// comments, as ip-masq-agent v2.12 writes them.
const ipMasqAgentRules = `*nat
:IP-MASQ-AGENT - [0:0]
-A IP-MASQ-AGENT -d 169.254.0.0/16 -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A IP-MASQ-AGENT -d 10.0.0.0/8 -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT
COMMIT
`

// The README's migration, on a live node under a steady stream of new
// flows: ip-masq-agent's rules alone; nfmasq added with the same config
// (both masquerade alike, and nfmasq reports the chain); ip-masq-agent's
// DaemonSet gone, its chain left behind as it leaves it; the chain
// removed. The remote sees no flow with the wrong source at any point,
// and the chain is gone at the end.
func TestMigrateFromIPMasqAgent(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "iptables-save")
	top := netnstest.NewTopology(t)
	restore := func(payload string) {
		t.Helper()
		cmd := top.Node.Command(t.Context(), "iptables-restore", "--noflush")
		cmd.Stdin = strings.NewReader(payload)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("iptables-restore: %v\n%s", err, out)
		}
	}
	restore(ipMasqAgentRules)

	// A steady stream of new flows, alternately to a kept and a
	// masqueraded destination, each from a new source port.
	const port = 7800
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internal4, internet4}, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var sent, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		deadline := time.Now().Add(2 * time.Minute)
		for i := 0; i < 20000 && time.Now().Before(deadline); i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			dst := netip.AddrPortFrom([]netip.Addr{internal4, internet4}[i%2], port)
			if _, ok, err := sandbox.SendUDP(top.Pod, dst, []byte("migrating"), time.Second); err != nil || !ok {
				failed.Add(1)
			}
			sent.Add(1)
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	wantSource := func(dst netip.Addr) netip.Addr {
		if dst == internal4 {
			return sandbox.PodAddr4
		}
		return sandbox.NodeAddr4
	}
	phase := func(name string) {
		t.Helper()
		from := len(sink.Seen())
		netnstest.Poll(t, 30*time.Second, 10*time.Millisecond, name+": 100 new flows", func() bool { return len(sink.Seen()) >= from+100 })
		wrong := 0
		for _, s := range sink.Seen()[from:] {
			if s.Src.Addr() != wantSource(s.Dst.Addr()) {
				wrong++
			}
		}
		if wrong > 0 {
			t.Errorf("%s: %d flows with the wrong source", name, wrong)
		}
		t.Logf("%s: %d flows so far, %d sent, %d unanswered", name, len(sink.Seen()), sent.Load(), failed.Load())
	}
	phase("ip-masq-agent alone")

	// Install nfmasq with the ConfigMap as it is.
	cfg := writeConfig(t, t.TempDir(), "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1s\n")
	a := startAgent(t, top, "--config", cfg, "--flow-log", "off")
	a.waitMetric("the chain reported", func(v float64) bool { return v == 1 }, "nfmasq_ip_masq_agent_chain")
	phase("both, same config")

	// The ip-masq-agent DaemonSet is deleted: its chain stays (it does
	// not remove it on exit), so nothing changes for the flows.
	phase("ip-masq-agent's chain left behind")

	// Remove the chain, as the README says.
	restore("*nat\n-D POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT\n-F IP-MASQ-AGENT\n-X IP-MASQ-AGENT\nCOMMIT\n")
	a.waitMetric("the chain gone", func(v float64) bool { return v == 0 }, "nfmasq_ip_masq_agent_chain")
	phase("nfmasq alone")

	if save := iptablesSave(t, top.Node); strings.Contains(save, "IP-MASQ-AGENT") {
		t.Errorf("ip-masq-agent's chain is still there:\n%s", save)
	}
	if a.metric("nfmasq_decisions_total") == 0 {
		t.Error("nfmasq decided no flow")
	}
}
