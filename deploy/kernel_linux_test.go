package deploy

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
)

// The DaemonSet grants the agent NET_ADMIN and NET_RAW and nothing else.
// These tests install the agent's real rule set (internal/rules) inside a
// namespace of their own, as uid 0 with exactly the manifest's
// capabilities as the bounding set and no_new_privs, which is how a
// container runtime starts the process. They show that the capabilities are
// enough for both iptables backends, both families and ipset, and that each
// one is needed: without NET_RAW iptables-legacy fails, and so does a rule
// matching an ipset on either backend; without NET_ADMIN everything does.

// capRunner runs each command in a namespace as uid 0 limited to caps.
// `ip netns exec` runs with the test's full privileges, then setpriv drops
// them, as a runtime does before exec'ing the container's process.
type capRunner struct {
	ns       string
	caps     []string // e.g. "NET_ADMIN"
	lockFile string   // private xtables lock, so the host's is never taken
}

func (r capRunner) Run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	bounding := "-all"
	for _, c := range r.caps {
		bounding += ",+" + strings.ToLower(c)
	}
	argv := append([]string{"netns", "exec", r.ns, "setpriv", "--bounding-set=" + bounding,
		"--inh-caps=-all", "--no-new-privs", "--", name}, args...)
	cmd := exec.CommandContext(ctx, "ip", argv...)
	cmd.Env = append(os.Environ(), "XTABLES_LOCKFILE="+r.lockFile)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &rules.CommandError{Args: append([]string{name}, args...), Stderr: strings.TrimSpace(stderr.String()), Err: err}
	}
	return stdout.Bytes(), nil
}

// capabilityBits maps the capability names used here to their numbers
// (linux/capability.h), to check what the process really holds.
var capabilityBits = map[string]uint{"NET_ADMIN": 12, "NET_RAW": 13}

func TestAgentCapabilitiesInstallTheRules(t *testing.T) {
	netnstest.Require(t, "setpriv", "ipset",
		"iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-restore", "ip6tables-nft-save",
		"iptables-legacy-restore", "iptables-legacy-save", "ip6tables-legacy-restore", "ip6tables-legacy-save")
	ds := get[*appsv1.DaemonSet](t, objects(t), "DaemonSet", namespace, "nfmasq")
	granted := agentCapabilities(t, ds)
	without := func(c string) []string {
		return slices.DeleteFunc(slices.Clone(granted), func(g string) bool { return g == c })
	}

	// The default policy, once with one rule per CIDR and once through an
	// ipset (threshold 0), for both families.
	var nonMasq4 []netip.Prefix
	for _, s := range gkeDefaultRanges {
		nonMasq4 = append(nonMasq4, netip.MustParsePrefix(s))
	}
	cfg := rules.DefaultConfig()
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}
	cfg.NonMasquerade4 = nonMasq4
	cfg.NonMasquerade6 = []netip.Prefix{netip.MustParsePrefix("fd00::/8")}
	cfg.EnableIPv6 = true
	cfg.QueueNum = 150
	withSet := cfg
	withSet.IPSetThreshold = 0

	tests := []struct {
		name    string
		caps    []string
		backend rules.Backend
		cfg     rules.Config
		wantErr string // "" means the install, check and uninstall succeed
	}{
		{"manifest caps, nft", granted, rules.BackendNFT, cfg, ""},
		{"manifest caps, legacy", granted, rules.BackendLegacy, cfg, ""},
		{"manifest caps, nft with ipset", granted, rules.BackendNFT, withSet, ""},
		{"manifest caps, legacy with ipset", granted, rules.BackendLegacy, withSet, ""},
		{"no NET_RAW, nft", without("NET_RAW"), rules.BackendNFT, cfg, ""},
		// The set match's iptables extension (libxt_set) looks the set up
		// through a raw socket, whichever the backend.
		{"no NET_RAW, nft with ipset", without("NET_RAW"), rules.BackendNFT, withSet, "Can't open socket to ipset"},
		{"no NET_RAW, legacy", without("NET_RAW"), rules.BackendLegacy, cfg, "Permission denied"},
		{"no NET_ADMIN, nft", without("NET_ADMIN"), rules.BackendNFT, cfg, "Operation not permitted"},
		{"no NET_ADMIN, ipset", without("NET_ADMIN"), rules.BackendNFT, withSet, "ipset"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := netnstest.New(t, "deploy")
			r := capRunner{ns: ns.Name, caps: tt.caps, lockFile: filepath.Join(t.TempDir(), "xtables.lock")}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			checkEffectiveCaps(t, ctx, r)

			in := &rules.Installer{Runner: r, Backend: tt.backend}
			err := in.Install(ctx, tt.cfg)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("install with %v: error %v, want one containing %q", tt.caps, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("install with %v: %v", tt.caps, err)
			}
			if err := in.Check(ctx, tt.cfg); err != nil {
				t.Errorf("check with %v: %v", tt.caps, err)
			}
			if err := in.Uninstall(ctx); err != nil {
				t.Errorf("uninstall with %v: %v", tt.caps, err)
			}
		})
	}
}

// checkEffectiveCaps makes sure the runner really limits the process, so
// a passing case proves something.
func checkEffectiveCaps(t *testing.T, ctx context.Context, r capRunner) {
	t.Helper()
	out, err := r.Run(ctx, nil, "cat", "/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	var want uint64
	for _, c := range r.caps {
		bit, ok := capabilityBits[c]
		if !ok {
			t.Fatalf("capability %s: add its number to capabilityBits", c)
		}
		want |= 1 << bit
	}
	for _, line := range strings.Split(string(out), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			got, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Fatalf("effective capabilities %#x, want %#x (%v)", got, want, r.caps)
			}
			return
		}
	}
	t.Fatalf("no CapEff in /proc/self/status:\n%s", out)
}

// probeEnv makes TestCapabilityProbe act as the restricted process of
// TestAgentCapabilitiesOpenQueueAndConntrack.
const probeEnv = "NFMASQ_DEPLOY_CAPABILITY_PROBE"

// TestAgentCapabilitiesOpenQueueAndConntrack runs the agent's netlink
// start-up (bind an NFQUEUE with its 32 MiB receive buffer, listen to
// conntrack events) in a process holding only the manifest's capabilities:
// the test binary itself, restarted under setpriv in a fresh namespace.
func TestAgentCapabilitiesOpenQueueAndConntrack(t *testing.T) {
	netnstest.Require(t, "setpriv")
	ds := get[*appsv1.DaemonSet](t, objects(t), "DaemonSet", namespace, "nfmasq")
	granted := agentCapabilities(t, ds)
	tests := []struct {
		name string
		caps []string
		ok   bool
	}{
		{"manifest caps", granted, true},
		{"no NET_ADMIN", slices.DeleteFunc(slices.Clone(granted), func(c string) bool { return c == "NET_ADMIN" }), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := netnstest.New(t, "deploy")
			r := capRunner{ns: ns.Name, caps: tt.caps, lockFile: filepath.Join(t.TempDir(), "xtables.lock")}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			t.Setenv(probeEnv, "1")
			out, err := r.Run(ctx, nil, os.Args[0], "-test.run=^TestCapabilityProbe$", "-test.v", "-test.count=1")
			passed := err == nil && strings.Contains(string(out), "--- PASS: TestCapabilityProbe")
			if passed != tt.ok {
				t.Fatalf("with %v: probe passed=%v, want %v: %v\n%s", tt.caps, passed, tt.ok, err, out)
			}
		})
	}
}

// TestCapabilityProbe is the restricted process; it skips unless started
// by TestAgentCapabilitiesOpenQueueAndConntrack.
func TestCapabilityProbe(t *testing.T) {
	if os.Getenv(probeEnv) != "1" {
		t.Skip("helper process of TestAgentCapabilitiesOpenQueueAndConntrack")
	}
	var logs bytes.Buffer
	q, err := queue.New(queue.Config{
		QueueNums: []uint16{150},
		Marks:     mark.Default,
		Policy:    func() *nat.Policy { return nil },
		Logger:    slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()
	select {
	case <-q.Ready():
	case err := <-done:
		cancel()
		t.Fatalf("binding the queue: %v", err)
	case <-time.After(20 * time.Second):
		cancel()
		t.Fatal("queue not ready after 20s")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("stopping the queue: %v", err)
	}
	// The agent only warns when SO_RCVBUFFORCE is refused and the buffer
	// stays at rmem_max; here that is a failure.
	if strings.Contains(logs.String(), "smaller than asked") {
		t.Fatalf("receive buffer not raised:\n%s", logs.String())
	}

	l, err := conntrack.Listen(conntrack.Config{})
	if err != nil {
		t.Fatalf("listening to conntrack events: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}
