package rules

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// foreignRules stand for kubelet and kube-proxy: chains and jumps that are
// not ours and must survive every install and uninstall.
const foreignRules = `*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
COMMIT
`

// apply runs a restore payload on the fake as another process would.
func (f *Fake) apply(t testing.TB, fam Family, payload string) {
	t.Helper()
	if _, err := f.Run(context.Background(), []byte(payload), BackendNFT.tool(fam, "restore"), "-w", "--noflush"); err != nil {
		t.Fatal(err)
	}
}

// dump returns everything the fake holds, for whole-node comparisons.
func (f *Fake) dump(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []Family{IPv4, IPv6} {
		out, err := f.Run(context.Background(), nil, BackendNFT.tool(fam, "save"))
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("## " + fam.String() + "\n")
		b.Write(out)
	}
	sets, _ := f.Run(context.Background(), nil, "ipset", "list", "-n")
	for _, name := range strings.Fields(string(sets)) {
		out, _ := f.Run(context.Background(), nil, "ipset", "save", name)
		b.Write(out)
	}
	return b.String()
}

func newFakeInstaller(t testing.TB) (*Fake, *Installer) {
	f := NewFake()
	for _, fam := range []Family{IPv4, IPv6} {
		f.apply(t, fam, foreignRules)
		// Materialise the tables an install reads, so that "pristine"
		// and "after uninstall" print the same set of tables.
		for _, table := range []string{"filter", "mangle", "nat"} {
			f.apply(t, fam, "*"+table+"\nCOMMIT\n")
		}
	}
	return f, &Installer{Runner: f, Backend: BackendNFT}
}

var configCases = []struct {
	name string
	edit func(testing.TB, *Config)
}{
	{"defaults", func(testing.TB, *Config) {}},
	{"dual-stack", func(t testing.TB, c *Config) { dualStack(t, c) }},
	{"default-route", func(t testing.TB, c *Config) { c.NonMasquerade4 = prefixes(t, "0.0.0.0/0") }},
	{"ipset", func(t testing.TB, c *Config) { dualStack(t, c); c.IPSetThreshold = 1 }},
	{"queues-2", func(_ testing.TB, c *Config) { c.Queues = 2 }},
	{"kernel-only", func(_ testing.TB, c *Config) { c.QueueEnabled = false }},
}

func TestInstallIsIdempotent(t *testing.T) {
	ctx := context.Background()
	for _, tt := range configCases {
		t.Run(tt.name, func(t *testing.T) {
			f, in := newFakeInstaller(t)
			cfg := testConfig(t)
			tt.edit(t, &cfg)
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			first := f.dump(t)
			if err := in.Check(ctx, cfg); err != nil {
				t.Fatalf("Check after Install: %v", err)
			}
			for _, fam := range cfg.families() {
				save, _ := in.save(ctx, fam, "mangle", "nat")
				payload, err := Plan(cfg, fam, save)
				if err != nil {
					t.Fatal(err)
				}
				for line := range strings.Lines(string(payload)) {
					if !strings.HasPrefix(line, ":"+ChainPrefix) && !strings.HasPrefix(line, "-A "+ChainPrefix) &&
						!strings.HasPrefix(line, "*") && line != "COMMIT\n" {
						t.Errorf("%s: second plan touches more than our chains: %q", fam, line)
					}
				}
			}
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(first, f.dump(t)); diff != "" {
				t.Errorf("second Install changed the node (-first +second):\n%s", diff)
			}
			if !strings.Contains(first, "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING") {
				t.Error("Install lost kube-proxy's jump")
			}
		})
	}
}

func TestInstallRepairsJumps(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	tests := []struct {
		name   string
		before string // applied after a first Install
		stale  bool   // only leftovers, which Check does not report
	}{
		{"duplicate jumps", "*mangle\n-A FORWARD -m comment --comment \"nfmasq: queue undecided pod flows\" -j NFMASQ-FORWARD\n" +
			"-A FORWARD -m comment --comment \"nfmasq: queue undecided pod flows\" -j NFMASQ-FORWARD\nCOMMIT\n" +
			"*nat\n-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment \"nfmasq: masquerade decisions for non-local destinations\" -j NFMASQ-POSTROUTING\nCOMMIT\n", false},
		{"jump of an older version", "*nat\n-D POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment \"nfmasq: masquerade decisions for non-local destinations\" -j NFMASQ-POSTROUTING\n" +
			"-A POSTROUTING -j NFMASQ-POSTROUTING\nCOMMIT\n", false},
		{"chain of an older layout", "*nat\n:NFMASQ-OLD - [0:0]\n:NFMASQ-OLDER - [0:0]\n-A NFMASQ-OLD -j NFMASQ-OLDER\n-A NFMASQ-OLDER -j MASQUERADE\n-A OUTPUT -j NFMASQ-OLD\n" +
			":KUBE-OTHER - [0:0]\n-A KUBE-OTHER -j NFMASQ-OLD\nCOMMIT\n", true},
		{"jump removed", "*mangle\n-D FORWARD -m comment --comment \"nfmasq: queue undecided pod flows\" -j NFMASQ-FORWARD\nCOMMIT\n", false},
		{"the previous layout's restore chain", previousLayout, true},
		{"chain flushed", "*nat\n-F NFMASQ-FALLBACK\nCOMMIT\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, in := newFakeInstaller(t)
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			want := f.dump(t)
			f.apply(t, IPv4, tt.before)
			if err := in.Check(ctx, cfg); !tt.stale && !errors.Is(err, ErrRulesChanged) {
				t.Errorf("Check = %v, want ErrRulesChanged", err)
			}
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if err := in.Check(ctx, cfg); err != nil {
				t.Errorf("Check after repair: %v", err)
			}
			got := f.dump(t)
			// A foreign chain is never removed, only its jump into a
			// chain of ours that is going away.
			got = strings.Replace(got, ":KUBE-OTHER - [0:0]\n", "", 1)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("repaired node differs from a clean install (-want +got):\n%s", diff)
			}
		})
	}
}

func TestInstallKeepsForeignJumpIntoLiveChain(t *testing.T) {
	ctx := context.Background()
	f, in := newFakeInstaller(t)
	cfg := testConfig(t)
	if err := in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	f.apply(t, IPv4, "*nat\n:CUSTOM - [0:0]\n-A CUSTOM -j NFMASQ-FALLBACK\nCOMMIT\n")
	if err := in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(f.dump(t), "-A CUSTOM -j NFMASQ-FALLBACK\n") {
		t.Error("Install removed a foreign chain's jump into a chain it keeps")
	}
}

func TestInstallSwitchesLayouts(t *testing.T) {
	ctx := context.Background()
	// Every layout reached from every other ends where a clean install
	// of it ends: no stale chain, jump or set.
	for _, from := range configCases {
		for _, to := range configCases {
			t.Run(from.name+"→"+to.name, func(t *testing.T) {
				cfgFrom, cfgTo := testConfig(t), testConfig(t)
				from.edit(t, &cfgFrom)
				to.edit(t, &cfgTo)

				clean, in := newFakeInstaller(t)
				if err := in.Install(ctx, cfgTo); err != nil {
					t.Fatal(err)
				}
				f, in := newFakeInstaller(t)
				if err := in.Install(ctx, cfgFrom); err != nil {
					t.Fatal(err)
				}
				if err := in.Install(ctx, cfgTo); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(clean.dump(t), f.dump(t)); diff != "" {
					t.Errorf("(-clean +switched):\n%s", diff)
				}
			})
		}
	}
}

func TestUninstall(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		setup func(t *testing.T, f *Fake, in *Installer)
	}{
		{"nothing installed", func(*testing.T, *Fake, *Installer) {}},
		{"full dual-stack with ipsets", func(t *testing.T, f *Fake, in *Installer) {
			cfg := testConfig(t)
			dualStack(t, &cfg)
			cfg.IPSetThreshold = 1
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
		}},
		{"duplicate jumps", func(t *testing.T, f *Fake, in *Installer) {
			if err := in.Install(ctx, testConfig(t)); err != nil {
				t.Fatal(err)
			}
			f.apply(t, IPv4, "*nat\n-A POSTROUTING -j NFMASQ-POSTROUTING\n-I POSTROUTING 1 -j NFMASQ-POSTROUTING\nCOMMIT\n")
		}},
		{"chains without jumps", func(t *testing.T, f *Fake, in *Installer) {
			f.apply(t, IPv4, "*nat\n:NFMASQ-FALLBACK - [0:0]\n:NFMASQ-MASQUERADE - [0:0]\n-A NFMASQ-FALLBACK -j NFMASQ-MASQUERADE\nCOMMIT\n")
		}},
		{"leftover sets", func(t *testing.T, f *Fake, in *Installer) {
			if _, err := f.Run(ctx, []byte("create nfmasq-nomasq-v4-tmp hash:net family inet\ncreate nfmasq-nomasq-v6 hash:net family inet6\n"), "ipset", "restore"); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, in := newFakeInstaller(t)
			pristine := f.dump(t)
			tt.setup(t, f, in)
			if err := in.Uninstall(ctx); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(pristine, f.dump(t)); diff != "" {
				t.Errorf("Uninstall left state behind (-pristine +after):\n%s", diff)
			}
			if err := in.Uninstall(ctx); err != nil {
				t.Errorf("second Uninstall: %v", err)
			}
		})
	}
}

func TestInstallRemovesIPv6WhenDisabled(t *testing.T) {
	ctx := context.Background()
	f, in := newFakeInstaller(t)
	pristine := f.dump(t)
	cfg := testConfig(t)
	dualStack(t, &cfg)
	cfg.IPSetThreshold = 1
	if err := in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	v4only := testConfig(t)
	if err := in.Install(ctx, v4only); err != nil {
		t.Fatal(err)
	}
	dump := f.dump(t)
	if v6 := dump[strings.Index(dump, "## IPv6"):]; strings.Contains(v6, ChainPrefix) || strings.Contains(v6, SetName(IPv6)) {
		t.Errorf("IPv6 state left after disabling IPv6:\n%s", v6)
	}
	if err := in.Uninstall(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(pristine, f.dump(t)); diff != "" {
		t.Errorf("(-pristine +after):\n%s", diff)
	}
}

func TestCheckDetectsSetChanges(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	cfg.IPSetThreshold = 1
	for _, tt := range []struct {
		name   string
		mutate func(f *Fake)
	}{
		{"entry removed", func(f *Fake) { f.sets[SetName(IPv4)].entries = f.sets[SetName(IPv4)].entries[1:] }},
		{"entry added", func(f *Fake) {
			f.sets[SetName(IPv4)].entries = append(f.sets[SetName(IPv4)].entries, "1.2.3.4/32")
		}},
		{"set emptied", func(f *Fake) { f.sets[SetName(IPv4)].entries = nil }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, in := newFakeInstaller(t)
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			want := f.dump(t)
			tt.mutate(f)
			if err := in.Check(ctx, cfg); !errors.Is(err, ErrRulesChanged) {
				t.Fatalf("Check = %v, want ErrRulesChanged", err)
			}
			if err := in.Install(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, f.dump(t)); diff != "" {
				t.Errorf("(-want +repaired):\n%s", diff)
			}
		})
	}
}

func TestVerifyMessages(t *testing.T) {
	cfg := testConfig(t)
	clean, err := Plan(cfg, IPv4, "")
	if err != nil {
		t.Fatal(err)
	}
	f := NewFake()
	f.apply(t, IPv4, string(clean))
	save := func() string {
		out, _ := f.Run(context.Background(), nil, BackendNFT.tool(IPv4, "save"))
		return string(out)
	}
	if err := Verify(cfg, IPv4, save()); err != nil {
		t.Fatalf("Verify on a clean install: %v", err)
	}
	tests := []struct {
		change string
		want   string
	}{
		{"*nat\n-F NFMASQ-FALLBACK\nCOMMIT\n", "nat NFMASQ-FALLBACK has 0 rules, want 6"},
		{"*mangle\n-I FORWARD 1 -j NFMASQ-FORWARD\nCOMMIT\n", "mangle FORWARD has 2 jumps to NFMASQ-FORWARD"},
		{"*mangle\n-D FORWARD -m comment --comment \"nfmasq: queue undecided pod flows\" -j NFMASQ-FORWARD\nCOMMIT\n",
			"mangle FORWARD has no jump to NFMASQ-FORWARD"},
		{"*nat\n:NFMASQ-MASQUERADE - [0:0]\n-A NFMASQ-MASQUERADE -j MASQUERADE\nCOMMIT\n", `nat NFMASQ-MASQUERADE has 1 rules, want 4`},
		{"*mangle\n:NFMASQ-FORWARD - [0:0]\n-A NFMASQ-FORWARD -j RETURN\nCOMMIT\n", `mangle NFMASQ-FORWARD rule 1 is "-j RETURN", want "-s 10.244.1.0/24`},
	}
	for _, tt := range tests {
		f.apply(t, IPv4, tt.change)
		err := Verify(cfg, IPv4, save())
		if !errors.Is(err, ErrRulesChanged) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("after %q: Verify = %v, want ErrRulesChanged mentioning %q", tt.change, err, tt.want)
		}
		f.apply(t, IPv4, string(must(Plan(cfg, IPv4, save()))))
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestPlanSet(t *testing.T) {
	cfg := testConfig(t)
	cfg.NonMasquerade4 = prefixes(t, "10.0.0.0/8", "10.0.0.0/8", "192.168.0.1/32")
	cfg.IPSetThreshold = 2
	tests := []struct {
		name     string
		existing []string
		want     string
	}{
		{"fresh", nil, "create nfmasq-nomasq-v4-tmp hash:net family inet hashsize 1024 maxelem 65536\n" +
			"add nfmasq-nomasq-v4-tmp 10.0.0.0/8\nadd nfmasq-nomasq-v4-tmp 192.168.0.1/32\n" +
			"create nfmasq-nomasq-v4 hash:net family inet hashsize 1024 maxelem 65536\n" +
			"swap nfmasq-nomasq-v4-tmp nfmasq-nomasq-v4\ndestroy nfmasq-nomasq-v4-tmp\n"},
		{"refill", []string{"nfmasq-nomasq-v4", "other"}, "create nfmasq-nomasq-v4-tmp hash:net family inet hashsize 1024 maxelem 65536\n" +
			"add nfmasq-nomasq-v4-tmp 10.0.0.0/8\nadd nfmasq-nomasq-v4-tmp 192.168.0.1/32\n" +
			"swap nfmasq-nomasq-v4-tmp nfmasq-nomasq-v4\ndestroy nfmasq-nomasq-v4-tmp\n"},
		{"stale temporary set", []string{"nfmasq-nomasq-v4", "nfmasq-nomasq-v4-tmp"}, "destroy nfmasq-nomasq-v4-tmp\n" +
			"create nfmasq-nomasq-v4-tmp hash:net family inet hashsize 1024 maxelem 65536\n" +
			"add nfmasq-nomasq-v4-tmp 10.0.0.0/8\nadd nfmasq-nomasq-v4-tmp 192.168.0.1/32\n" +
			"swap nfmasq-nomasq-v4-tmp nfmasq-nomasq-v4\ndestroy nfmasq-nomasq-v4-tmp\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := PlanSet(cfg, IPv4, tt.existing)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, string(got)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	if got, _ := PlanSet(cfg, IPv6, nil); got != nil {
		t.Errorf("PlanSet for a family without a long list = %q, want nil", got)
	}
}

func TestHashSize(t *testing.T) {
	for _, tt := range []struct{ n, want int }{{0, 1024}, {1024, 1024}, {1025, 2048}, {5000, 8192}, {65536, 65536}} {
		if got := hashSize(tt.n); got != tt.want {
			t.Errorf("hashSize(%d) = %d, want %d", tt.n, got, tt.want)
		}
	}
}

func TestRuleTarget(t *testing.T) {
	tests := []struct{ spec, want string }{
		{`-j NFMASQ-FORWARD`, "NFMASQ-FORWARD"},
		{`-m comment --comment "to -j NFMASQ-X" -j ACCEPT`, "ACCEPT"},
		{`-m comment --comment "say \"-j NFMASQ-X\"" -g NFMASQ-Y`, "NFMASQ-Y"},
		{`-s 10.0.0.0/8`, ""},
		{`-m comment --comment "unterminated -j X`, ""},
	}
	for _, tt := range tests {
		if got := ruleTarget(tt.spec); got != tt.want {
			t.Errorf("ruleTarget(%q) = %q, want %q", tt.spec, got, tt.want)
		}
	}
}

func TestPlanUninstallNothing(t *testing.T) {
	if got := PlanUninstall(foreignRules); got != nil {
		t.Errorf("PlanUninstall on foreign rules only = %q, want nil", got)
	}
	if got := PlanUninstall(""); got != nil {
		t.Errorf("PlanUninstall(\"\") = %q, want nil", got)
	}
}

func TestRestoreErrorQuotesLine(t *testing.T) {
	f := NewFake()
	in := &Installer{Runner: f, Backend: BackendNFT}
	err := in.restore(context.Background(), IPv4, []byte("*nat\n-A NOWHERE -j RETURN\nCOMMIT\n"))
	if err == nil || !strings.Contains(err.Error(), "(line 2: -A NOWHERE -j RETURN)") {
		t.Errorf("restore error = %v, want it to quote line 2", err)
	}
	if !slices.Contains(f.Calls(), "iptables-nft-restore -w --noflush") {
		t.Errorf("calls = %q", f.Calls())
	}
}

// previousLayout is what the layout before this one added and this one
// dropped: a mangle PREROUTING chain restoring the connmark into every
// packet's mark. An upgrade must remove it.
const previousLayout = "*mangle\n:NFMASQ-PREROUTING - [0:0]\n" +
	"-A NFMASQ-PREROUTING -m comment --comment \"nfmasq: restore the decision from the connmark\" -j CONNMARK --restore-mark --nfmask 0x3000 --ctmask 0x3000\n" +
	"-I PREROUTING 1 -m comment --comment \"nfmasq: restore flow decisions\" -j NFMASQ-PREROUTING\nCOMMIT\n"

// MasqueradePolicy sets: their ipsets are filled before the rules that
// use them, Check reads them back, a set no longer used is destroyed
// after its rules are gone, and Uninstall removes them all.
func TestInstallPolicySets(t *testing.T) {
	ctx := context.Background()
	f, in := newFakeInstaller(t)
	cfg := testConfig(t)
	dualStack(t, &cfg)
	two := PolicySet{ID: "0000beef", Pods: []netip.Addr{netip.MustParseAddr("10.244.1.9")},
		Destinations: []PolicyDestination{{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Decides: true, Masquerade: true}}}
	cfg.PolicySets = append(kernelPolicySets(), two)
	cfg.PolicySets[0].Pods = []netip.Addr{netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("fd00:10:244:1::2")}
	if err := in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := in.Check(ctx, cfg); err != nil {
		t.Fatalf("Check after Install: %v", err)
	}
	dump := f.dump(t)
	for _, want := range []string{
		`-A NFMASQ-FALLBACK -m set --match-set nfmasq-mp-0123abcd-s4 src -m set --match-set nfmasq-mp-0123abcd-m4 dst -m comment --comment "nfmasq: MasqueradePolicy set 0123abcd: masquerade" -j NFMASQ-MASQUERADE`,
		`-A NFMASQ-FALLBACK -m set --match-set nfmasq-mp-0123abcd-s4 src -m set --match-set nfmasq-mp-0123abcd-k4 dst -m comment --comment "nfmasq: MasqueradePolicy set 0123abcd: keep the pod address" -j RETURN`,
		"add nfmasq-mp-0123abcd-k4 11.0.0.0/24 nomatch",
		"add nfmasq-mp-0123abcd-m4 11.0.0.0/8 nomatch",
		"add nfmasq-mp-0123abcd-k6 2001:db8::/32",
		"add nfmasq-mp-0123abcd-s6 fd00:10:244:1::2",
		// hash:net cannot hold a /0: two /1s.
		"add nfmasq-mp-0000beef-m4 0.0.0.0/1",
		"add nfmasq-mp-0000beef-m4 128.0.0.0/1",
	} {
		if !strings.Contains(dump, want+"\n") {
			t.Errorf("missing %q in:\n%s", want, dump)
		}
	}
	if strings.Contains(dump, "nfmasq-mp-0000beef-k4") || strings.Contains(dump, "nfmasq-mp-0000beef-s6") {
		t.Error("a set with no keep entries (or no IPv6 pod) got an ipset for it")
	}
	// Someone empties a set: Check sees it.
	if _, err := f.Run(ctx, []byte("destroy nfmasq-mp-0123abcd-k4\n"), "ipset", "restore"); err == nil {
		t.Fatal("destroyed a set a rule uses")
	}
	cfg.PolicySets = cfg.PolicySets[:1]
	if err := in.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if dump := f.dump(t); strings.Contains(dump, "0000beef") {
		t.Errorf("the unused set is left:\n%s", dump)
	}
	if err := in.Uninstall(ctx); err != nil {
		t.Fatal(err)
	}
	if dump := f.dump(t); strings.Contains(dump, PolicySetPrefix) {
		t.Errorf("Uninstall left policy sets:\n%s", dump)
	}
}
