package rules

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// The kernel tests run the real tools inside a namespace of their own,
// once per backend: the payloads must load, iptables-save must print our
// rules back exactly as we wrote them (Verify depends on it), a second
// install must change nothing, and uninstall must leave the namespace as
// it found it.

var kernelTools = []string{
	"iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-restore", "ip6tables-nft-save",
	"iptables-legacy-restore", "iptables-legacy-save", "ip6tables-legacy-restore", "ip6tables-legacy-save",
	"ipset", "conntrack",
}

var backends = []Backend{BackendNFT, BackendLegacy}

// kernelNode is a namespace and an Installer working in it.
type kernelNode struct {
	ns *netns.NS
	in *Installer
}

func newKernelNode(t *testing.T, ns *netns.NS, b Backend) *kernelNode {
	t.Helper()
	k := &kernelNode{ns: ns, in: &Installer{Runner: NetNSRunner{Name: ns.Name}, Backend: b}}
	// What kubelet and kube-proxy would have put there first.
	for _, fam := range []Family{IPv4, IPv6} {
		if err := k.in.restore(context.Background(), fam, []byte(foreignRules)); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

var (
	counters  = regexp.MustCompile(`\[\d+:\d+\]`)
	initval   = regexp.MustCompile(` initval 0x[0-9a-f]+`)
	emptyBase = regexp.MustCompile(`^:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT \[0:0\]$`)
)

// state returns both families' full rule sets and every ipset with its
// members, without timestamps and counters, and without tables that hold
// nothing (nft creates a table on first use and keeps it empty).
func (k *kernelNode) state(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	for _, fam := range []Family{IPv4, IPv6} {
		save, err := k.in.save(ctx, fam)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "## %s\n", fam)
		var table []string
		for line := range strings.Lines(counters.ReplaceAllString(save, "[0:0]")) {
			line = strings.TrimSuffix(line, "\n")
			switch {
			case strings.HasPrefix(line, "#"):
			case line == "COMMIT":
				if slices.ContainsFunc(table[1:], func(l string) bool { return !emptyBase.MatchString(l) }) {
					b.WriteString(strings.Join(table, "\n") + "\nCOMMIT\n")
				}
				table = nil
			default:
				table = append(table, line)
			}
		}
	}
	sets, err := k.in.listSets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range sets {
		out, err := k.in.Runner.Run(ctx, nil, "ipset", "save", name)
		if err != nil {
			t.Fatal(err)
		}
		// initval is random per set, and so is the order of members.
		lines := strings.Split(strings.TrimSpace(initval.ReplaceAllString(string(out), "")), "\n")
		slices.Sort(lines[1:])
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	return b.String()
}

func kernelConfig(t testing.TB) Config {
	cfg := testConfig(t)
	dualStack(t, &cfg)
	return cfg
}

func TestKernelInstallVerifyUninstall(t *testing.T) {
	netnstest.Require(t, kernelTools...)
	ctx := context.Background()
	for _, b := range backends {
		for _, tt := range []struct {
			name string
			edit func(*Config)
		}{
			{"rules", func(*Config) {}},
			{"ipset 5000", func(c *Config) { c.NonMasquerade4 = manyPrefixes(t, 5000) }},
			{"ipset dual-stack", func(c *Config) { c.IPSetThreshold = 1 }},
			{"default route, 2 queues", func(c *Config) { c.NonMasquerade4 = prefixes(t, "0.0.0.0/0"); c.Queues = 2 }},
			{"kernel-only", func(c *Config) { c.QueueEnabled = false }},
			{"policy-sets", func(c *Config) { c.PolicySets = kernelPolicySets() }},
		} {
			t.Run(string(b)+"/"+tt.name, func(t *testing.T) {
				k := newKernelNode(t, netnstest.New(t, "rules"), b)
				pristine := k.state(t)
				cfg := kernelConfig(t)
				tt.edit(&cfg)

				if err := k.in.Install(ctx, cfg); err != nil {
					t.Fatal(err)
				}
				// iptables-save prints our rules exactly as written.
				if err := k.in.Check(ctx, cfg); err != nil {
					t.Fatalf("Check right after Install: %v", err)
				}
				installed := k.state(t)
				for _, fam := range cfg.families() {
					var want []string
					for _, tb := range layout(&cfg, fam) {
						for _, c := range tb.chains {
							for _, r := range c.rules {
								want = append(want, "-A "+c.name+" "+r)
							}
						}
					}
					for _, line := range want {
						if !strings.Contains(installed, line+"\n") {
							t.Errorf("%s: iptables-save does not print %q back verbatim", fam, line)
						}
					}
				}

				if err := k.in.Install(ctx, cfg); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(installed, k.state(t)); diff != "" {
					t.Errorf("second Install changed the rules (-first +second):\n%s", diff)
				}

				// Someone flushes the fallback: Check notices, Install repairs.
				netnstest.Run(t, k.ns, "iptables-"+string(b), "-w", "-t", "nat", "-F", ChainFallback)
				if err := k.in.Check(ctx, cfg); !errors.Is(err, ErrRulesChanged) {
					t.Fatalf("Check after flushing %s = %v, want ErrRulesChanged", ChainFallback, err)
				}
				if err := k.in.Install(ctx, cfg); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(installed, k.state(t)); diff != "" {
					t.Errorf("repair differs from the first install (-first +repaired):\n%s", diff)
				}

				if err := k.in.Uninstall(ctx); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(pristine, k.state(t)); diff != "" {
					t.Errorf("Uninstall left state behind (-pristine +after):\n%s", diff)
				}
			})
		}
	}
}

func TestKernelCheckDetectsSetChange(t *testing.T) {
	netnstest.Require(t, kernelTools...)
	ctx := context.Background()
	k := newKernelNode(t, netnstest.New(t, "rules"), BackendNFT)
	cfg := kernelConfig(t)
	cfg.IPSetThreshold = 1
	if err := k.in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	netnstest.Run(t, k.ns, "ipset", "del", SetName(IPv6), "fd00::/8")
	if err := k.in.Check(ctx, cfg); !errors.Is(err, ErrRulesChanged) {
		t.Fatalf("Check after removing a set entry = %v, want ErrRulesChanged", err)
	}
	if err := k.in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := k.in.Check(ctx, cfg); err != nil {
		t.Fatalf("Check after repair: %v", err)
	}
}

// TestKernelDecisions sends traffic through a node with the rules and no
// agent. A mangle rule after our restore stands in for the agent's verdict
// mark on some destinations; everything else reaches the queue, finds no
// listener, passes (--queue-bypass) and is decided by the fallback. The
// remote host's view of the source is the assertion.
func TestKernelDecisions(t *testing.T) {
	netnstest.Require(t, kernelTools...)
	for _, b := range backends {
		for _, tt := range []struct {
			name string
			edit func(*Config)
		}{
			{"rules", func(*Config) {}},
			{"ipset", func(c *Config) { c.IPSetThreshold = 0 }},
			{"kernel-only", func(c *Config) { c.QueueEnabled = false }},
			{"policy-sets", func(c *Config) { c.PolicySets = kernelPolicySets() }},
		} {
			t.Run(string(b)+"/"+tt.name, func(t *testing.T) {
				testDecisions(t, b, tt.edit)
			})
		}
	}
}

func testDecisions(t *testing.T, b Backend, edit func(*Config)) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	top := netnstest.NewTopology(t)
	k := &kernelNode{ns: top.Node, in: &Installer{Runner: NetNSRunner{Name: top.Node.Name}, Backend: b}}

	cfg := DefaultConfig()
	cfg.EnableIPv6 = true
	cfg.PodCIDRs = []netip.Prefix{sandbox.PodCIDR4, sandbox.PodCIDR6}
	cfg.NonMasquerade4 = prefixes(t, ipMasqAgentDefaults...)
	cfg.NonMasquerade6 = prefixes(t, "fd00::/8")
	edit(&cfg)
	if err := k.in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// The real tools print back what Check expects (ipset's nomatch and
	// hash:ip entries included).
	if err := k.in.Check(ctx, cfg); err != nil {
		t.Fatalf("Check after Install: %v", err)
	}

	const port = 7777
	node := map[bool]netip.Addr{false: sandbox.NodeAddr4, true: sandbox.NodeAddr6}
	pod := map[bool]netip.Addr{false: sandbox.PodAddr4, true: sandbox.PodAddr6}
	type want struct {
		dst  netip.Addr
		mark uint32 // the agent's stand-in verdict; 0 leaves the flow to the fallback
		masq bool
	}
	wants := []want{
		{sandbox.LinkLocal4, 0, false},
		{sandbox.CGNAT4, 0, true},
		{sandbox.Internal6, 0, false},
	}
	switch {
	case len(cfg.PolicySets) > 0:
		// Every flow to the fallback: the pod's policy set decides
		// ahead of the node policy, except where it leaves it to it.
		wants = []want{
			{sandbox.LinkLocal4, 0, false}, // no policy entry: the node keeps it
			{sandbox.CGNAT4, 0, false},     // keep 100.64.0.0/10 over the node's masquerade
			{sandbox.Internal4, 0, true},   // masquerade 10.200.0.0/16 over the node's 10.0.0.0/8
			{sandbox.Internet4, 0, true},   // in the except 11.0.0.0/24 of keep 11.0.0.0/8: the node's masquerade
			{sandbox.Internal6, 0, true},   // masquerade fd00:200::/32 over the node's fd00::/8
			{sandbox.Internet6, 0, false},  // keep 2001:db8::/32
		}
	case cfg.QueueEnabled:
		// A verdict wins over what the fallback would decide.
		wants = append(wants,
			want{sandbox.Internal4, cfg.Mark.Masquerade, true},
			want{sandbox.Internet4, cfg.Mark.Passthrough, false},
			want{sandbox.Internet6, cfg.Mark.Passthrough, false})
	default:
		wants = append(wants,
			want{sandbox.Internal4, 0, false},
			want{sandbox.Internet4, 0, true},
			want{sandbox.Internet6, 0, true})
	}
	for _, w := range wants {
		if w.mark == 0 {
			continue
		}
		tool := "iptables-" + string(b)
		if w.dst.Is6() {
			tool = "ip6tables-" + string(b)
		}
		netnstest.Run(t, k.ns, tool, "-w", "-t", "mangle", "-A", "PREROUTING", "-d", w.dst.String(),
			"-j", "MARK", "--set-xmark", fmt.Sprintf("%#x/%#x", w.mark, cfg.Mark.Mask))
	}

	sink, err := sandbox.StartSink(top.Remote, sandbox.Destinations, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	for _, w := range wants {
		dst := netip.AddrPortFrom(w.dst, port)
		for _, proto := range []string{"udp", "tcp"} {
			var local netip.AddrPort
			if proto == "udp" {
				var ok bool
				local, ok, err = sandbox.SendUDP(top.Pod, dst, []byte("x"), 3*time.Second)
				if err == nil && !ok {
					err = errors.New("no echo")
				}
			} else {
				local, _, err = sandbox.SendTCP(top.Pod, dst, []byte("x"), 3*time.Second)
			}
			if err != nil {
				t.Errorf("%s to %s: %v", proto, dst, err)
				continue
			}
			if local.Addr() != pod[w.dst.Is6()] {
				t.Fatalf("%s to %s left the pod from %s", proto, dst, local)
			}
			seen, err := sink.WaitFor(ctx, func(s []Seen) bool {
				return slices.ContainsFunc(s, func(v Seen) bool {
					return v.Proto == proto && v.Dst == dst && v.Src.Port() != 0 && sameFlow(v, local, node[w.dst.Is6()])
				})
			})
			if err != nil {
				t.Errorf("%s to %s (mark %#x): the remote never saw it: %v", proto, dst, w.mark, err)
				continue
			}
			i := slices.IndexFunc(seen, func(v Seen) bool { return v.Proto == proto && v.Dst == dst && sameFlow(v, local, node[w.dst.Is6()]) })
			src := seen[i].Src
			wantSrc := pod[w.dst.Is6()]
			if w.masq {
				wantSrc = node[w.dst.Is6()]
			}
			if src.Addr() != wantSrc {
				t.Errorf("%s to %s (mark %#x): remote saw source %s, want %s", proto, dst, w.mark, src.Addr(), wantSrc)
			}
			if w.masq && src.Port() < 32768 {
				t.Errorf("%s to %s: masqueraded source port %d is outside --to-ports %s", proto, dst, src.Port(), cfg.ToPorts)
			}
		}
		// The connmark records who decided: the verdict's mark, saved in
		// mangle POSTROUTING, or the fallback's own mark.
		wantMark := w.mark
		if wantMark == 0 && cfg.QueueEnabled {
			wantMark = cfg.Mark.Fallback
		}
		family := "ipv4"
		if w.dst.Is6() {
			family = "ipv6"
		}
		out := netnstest.Run(t, top.Node, "conntrack", "-L", "-f", family, "-d", w.dst.String())
		marks := regexp.MustCompile(`mark=(\d+)`).FindAllStringSubmatch(out, -1)
		if len(marks) == 0 {
			t.Errorf("no conntrack entry for %s:\n%s", w.dst, out)
		}
		for _, m := range marks {
			if m[1] != fmt.Sprint(wantMark) {
				t.Errorf("conntrack mark for %s is %s, want %d (%#x)", w.dst, m[1], wantMark, wantMark)
			}
		}
	}
}

// Seen is the sink's record, aliased for brevity in predicates.
type Seen = sandbox.Seen

// sameFlow reports whether the remote's record belongs to the flow sent
// from local: either unchanged, or masqueraded to the node address (the
// port may change, so any record from the node matches once per test
// destination and protocol).
func sameFlow(v Seen, local netip.AddrPort, node netip.Addr) bool {
	return v.Src == local || v.Src.Addr() == node
}

// TestKernelRepairsJumps feeds iptables-save's own text back as -D lines
// (duplicates, a jump of an older version, a chain of an older layout) and
// checks the real tools accept it and end where a clean install ends.
func TestKernelRepairsJumps(t *testing.T) {
	netnstest.Require(t, kernelTools...)
	ctx := context.Background()
	const mess = "*mangle\n" +
		"-A FORWARD -m comment --comment \"nfmasq: queue undecided pod flows\" -j NFMASQ-FORWARD\n" +
		"-I POSTROUTING 1 -m comment --comment \"nfmasq: an older comment\" -j NFMASQ-POSTROUTING\n" +
		"COMMIT\n" + previousLayout +
		"*nat\n:NFMASQ-OLD - [0:0]\n:NFMASQ-OLDER - [0:0]\n-A NFMASQ-OLD -j NFMASQ-OLDER\n-A NFMASQ-OLDER -j MASQUERADE\n" +
		"-A POSTROUTING -m mark --mark 0x1/0x1 -j NFMASQ-OLD\n" +
		"-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment \"nfmasq: masquerade decisions for non-local destinations\" -j NFMASQ-POSTROUTING\n" +
		"COMMIT\n"
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			clean := newKernelNode(t, netnstest.New(t, "rules"), b)
			cfg := kernelConfig(t)
			if err := clean.in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			want := clean.state(t)

			k := newKernelNode(t, netnstest.New(t, "rules"), b)
			if err := k.in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			for _, fam := range cfg.families() {
				if err := k.in.restore(ctx, fam, []byte(mess)); err != nil {
					t.Fatal(err)
				}
			}
			if err := k.in.Check(ctx, cfg); !errors.Is(err, ErrRulesChanged) {
				t.Errorf("Check = %v, want ErrRulesChanged", err)
			}
			if err := k.in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, k.state(t)); diff != "" {
				t.Errorf("(-clean install +repaired):\n%s", diff)
			}
		})
	}
}

// BenchmarkKernel measures a steady-state Install (the resync after a
// change) and a Check (every resync) in a namespace, per backend, for the
// default list and for 5,000 prefixes in an ipset.
func BenchmarkKernel(b *testing.B) {
	netnstest.Require(b, kernelTools...)
	ctx := context.Background()
	for _, be := range backends {
		for _, tt := range []struct {
			name string
			n    int
		}{{"rules", 0}, {"ipset-5000", 5000}} {
			cfg := kernelConfig(b)
			if tt.n > 0 {
				cfg.NonMasquerade4 = manyPrefixes(b, tt.n)
			}
			ns := netnstest.New(b, "bench")
			in := &Installer{Runner: NetNSRunner{Name: ns.Name}, Backend: be}
			if err := in.Install(ctx, cfg); err != nil {
				b.Fatal(err)
			}
			b.Run(string(be)+"/"+tt.name+"/Install", func(b *testing.B) {
				for b.Loop() {
					if err := in.Install(ctx, cfg); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(string(be)+"/"+tt.name+"/Check", func(b *testing.B) {
				for b.Loop() {
					if err := in.Check(ctx, cfg); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
