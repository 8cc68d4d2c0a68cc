package rules

import (
	"net/netip"
	"strings"
	"testing"
)

// A paused queue keeps the marks and the fallback's connmark but queues
// nothing: the agent's shutdown state.
func TestQueuePausedLayout(t *testing.T) {
	cfg := DefaultConfig()
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")}
	cfg.NonMasquerade4 = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	running, err := Plan(cfg, IPv4, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg.QueuePaused = true
	paused, err := Plan(cfg, IPv4, "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(running), "NFQUEUE") {
		t.Fatalf("running layout has no NFQUEUE rule:\n%s", running)
	}
	if strings.Contains(string(paused), "NFQUEUE") {
		t.Errorf("paused layout still queues:\n%s", paused)
	}
	for _, want := range []string{"--set-xmark 0x3000/0x3000", "-m connmark --mark 0x1000/0x3000", "--save-mark", ":" + ChainForward} {
		if !strings.Contains(string(paused), want) {
			t.Errorf("paused layout lacks %q:\n%s", want, paused)
		}
	}
}
