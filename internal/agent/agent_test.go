package agent

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/apimachinery/pkg/labels"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/nfmasq/nfmasq/internal/netnstest"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
	"github.com/nfmasq/nfmasq/queue/packet"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var podCIDR = netip.MustParsePrefix("10.244.0.0/24")

// fakeConntrack is an in-memory conntrack table: DeleteStale removes the
// entries of the given protocols that match, as the kernel's does.
type fakeConntrack struct {
	flows []conntrack.Flow
	// onDelete runs at the start of each DeleteStale.
	onDelete func()
	calls    int
}

func (c *fakeConntrack) DeleteStale(_ context.Context, match func(conntrack.Flow) bool, protos []uint8) (int, error) {
	c.calls++
	if c.onDelete != nil {
		c.onDelete()
	}
	n := 0
	c.flows = slices.DeleteFunc(c.flows, func(f conntrack.Flow) bool {
		if slices.Contains(protos, f.Proto) && match(f) {
			n++
			return true
		}
		return false
	})
	return n, nil
}

// harness is an agent on fake kernel seams, with its config file.
type harness struct {
	t      *testing.T
	a      *Agent
	rules  *rules.Fake
	ct     *fakeConntrack
	config string
	log    *netnstest.Buffer
	pods   *fakePods
	clock  *clocktesting.FakeClock
}

// fakePods is a pod index: names by address, and a channel closed at
// every change.
type fakePods struct {
	mu      sync.Mutex
	names   map[netip.Addr]string
	changed chan struct{}
}

func newFakePods() *fakePods {
	return &fakePods{names: map[netip.Addr]string{}, changed: make(chan struct{})}
}

func (p *fakePods) Lookup(a netip.Addr) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.names[a]
}

func (p *fakePods) Changed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

func (p *fakePods) set(addr, name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.names[netip.MustParseAddr(addr)] = name
	close(p.changed)
	p.changed = make(chan struct{})
}

func newHarness(t *testing.T, config string, edit func(*Config)) *harness {
	return newHarnessWithPods(t, config, edit, nil)
}

func newHarnessWithPods(t *testing.T, config string, edit func(*Config), pods *fakePods) *harness {
	t.Helper()
	h := &harness{t: t, rules: rules.NewFake(), ct: &fakeConntrack{}, config: filepath.Join(t.TempDir(), "ip-masq-agent"), log: &netnstest.Buffer{},
		pods: pods, clock: clocktesting.NewFakeClock(time.Unix(1700000000, 0))}
	if config != "" {
		h.write(config)
	}
	cfg := Config{
		Source: &PolicySource{ConfigPath: h.config, Agent: true, AllReservedRanges: true},
		Dataplane: Dataplane{PodCIDRs: []netip.Prefix{podCIDR}, Marks: mark.Default, QueueNum: 150, Queues: 1,
			RandomFully: true, ToPorts: "32768-65535", IPSetThreshold: 4},
		FlowLog: flowlog.Options{Writer: h.log, Node: "node-1"},
	}
	if edit != nil {
		edit(&cfg)
	}
	deps := Deps{Rules: &rules.Installer{Runner: h.rules, Backend: rules.BackendNFT}, Conntrack: h.ct}
	if h.pods != nil {
		deps.Pods, deps.Clock = h.pods, h.clock
	}
	a, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.audit.Close)
	h.a = a
	return h
}

func (h *harness) write(config string) {
	h.t.Helper()
	if err := os.WriteFile(h.config, []byte(config), 0o644); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) reload(why string) { h.a.reload(context.Background(), why) }

// state is what an operator sees of the control loop.
type state struct {
	generation, applied         uint64
	ready                       bool
	reloadFailures, installErrs float64
	restored                    float64
}

func (h *harness) state() state {
	m := h.a.metrics
	var gen uint64
	if v := h.a.cur.Load(); v != nil {
		gen = v.generation
	}
	return state{
		generation: gen, applied: h.a.applied.Load(), ready: h.a.ready.Load(),
		reloadFailures: testutil.ToFloat64(m.reloadFailures), installErrs: testutil.ToFloat64(m.installErrors),
		restored: testutil.ToFloat64(m.rulesRestored),
	}
}

// records closes the flow log and returns its records.
func (h *harness) records() []map[string]any {
	h.t.Helper()
	h.a.audit.log.Close()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(h.log.String()), "\n") {
		if line == "" {
			continue
		}
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			h.t.Fatalf("flow log line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

const (
	config10 = "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n"
	config11 = "nonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8]\nresyncInterval: 60s\n"
	badYAML  = "nonMasqueradeCIDRs: [10.0.0.0/33]\n"
	// Over IPSetThreshold: the fallback matches an ipset.
	config6 = "nonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8, 12.0.0.0/8, 13.0.0.0/8, 14.0.0.0/8, 15.0.0.0/8]\n"
)

// The first load installs the rule set (compared whole with a golden) and
// makes the agent ready at generation 1.
func TestFirstReloadInstallsRules(t *testing.T) {
	h := newHarness(t, config10, nil)
	h.reload("start")
	if got, want := h.state(), (state{generation: 1, applied: 1, ready: true}); got != want {
		t.Errorf("state %+v, want %+v", got, want)
	}
	golden := filepath.Join("testdata", "first-install.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(h.rules.Dump()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got := h.rules.Dump(); got != string(want) {
		t.Errorf("rules after the first reload differ from %s (go test -update rewrites it):\n%s", golden, got)
	}
}

// Reload sequences: which edits make a new generation, which are
// rejected and keep the last good policy, and what readiness says.
func TestReload(t *testing.T) {
	tests := []struct {
		name    string
		configs []string // written before each reload; "" removes the file
		want    state
		// inFallback is a line the installed fallback must hold.
		inFallback string
	}{
		{"first load", []string{config10}, state{generation: 1, applied: 1, ready: true}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
		{"missing file is the defaults", []string{""}, state{generation: 1, applied: 1, ready: true}, "add nfmasq-nomasq-v4 100.64.0.0/10\n"},
		{"invalid first config: not ready, nothing installed", []string{badYAML}, state{reloadFailures: 1}, ""},
		{"invalid edit keeps the last good policy", []string{config10, badYAML, badYAML}, state{generation: 1, applied: 1, ready: true, reloadFailures: 2}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
		{"unchanged file is no new generation", []string{config10, config10, config10}, state{generation: 1, applied: 1, ready: true}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
		{"edit makes a new generation and rewrites the fallback", []string{config10, config11}, state{generation: 2, applied: 2, ready: true}, "-A NFMASQ-FALLBACK -d 11.0.0.0/8 "},
		{"edit back", []string{config10, config11, config10}, state{generation: 3, applied: 3, ready: true}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
		{"recovery after an invalid first config", []string{badYAML, config10}, state{generation: 1, applied: 1, ready: true, reloadFailures: 1}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
		{"to an ipset and back", []string{config10, config6, config10}, state{generation: 3, applied: 3, ready: true}, "-A NFMASQ-FALLBACK -d 10.0.0.0/8 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, "", nil)
			for _, c := range tt.configs {
				if c == "" {
					os.Remove(h.config)
				} else {
					h.write(c)
				}
				h.reload("test")
			}
			if got := h.state(); got != tt.want {
				t.Errorf("state %+v, want %+v", got, tt.want)
			}
			dump := h.rules.Dump()
			if tt.inFallback == "" {
				if strings.Contains(dump, "NFMASQ") {
					t.Errorf("rules installed without a valid config:\n%s", dump)
				}
				return
			}
			if !strings.Contains(dump, tt.inFallback) {
				t.Errorf("fallback lacks %q:\n%s", tt.inFallback, dump)
			}
			if tt.name == "to an ipset and back" && strings.Contains(dump, "create nfmasq") {
				t.Errorf("the ipset outlived the list that needed it:\n%s", dump)
			}
		})
	}
}

// Another process's edit to the rule set is found at the next resync and
// undone; the node ends as it was, and each incident is counted once.
func TestDriftRepaired(t *testing.T) {
	tests := []struct {
		name  string
		edit  string // an iptables-restore payload run by "another process"
		table string
	}{
		{"queue rule deleted", `-D NFMASQ-FORWARD -s 10.244.0.0/24 -m connmark --mark 0x0/0x3000 -m comment --comment "nfmasq: undecided pod flow: first packet to the agent" -j NFQUEUE --queue-num 150 --queue-bypass`, "mangle"},
		{"fallback flushed", "-F NFMASQ-FALLBACK", "nat"},
		{"jump deleted", `-D POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "nfmasq: masquerade decisions for non-local destinations" -j NFMASQ-POSTROUTING`, "nat"},
		{"foreign rule inserted in our chain", `-I NFMASQ-POSTROUTING 1 -j RETURN`, "nat"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, config10, nil)
			h.reload("start")
			before := h.rules.Dump()
			payload := "*" + tt.table + "\n" + tt.edit + "\nCOMMIT\n"
			if _, err := h.rules.Run(context.Background(), []byte(payload), "iptables-nft-restore", "-w", "--noflush"); err != nil {
				t.Fatal(err)
			}
			if h.rules.Dump() == before {
				t.Fatal("the edit changed nothing")
			}
			h.reload("resync")
			if got := h.rules.Dump(); got != before {
				t.Errorf("rules not restored:\n%s\nwant:\n%s", got, before)
			}
			h.reload("resync")
			if got, want := h.state(), (state{generation: 1, applied: 1, ready: true, restored: 1}); got != want {
				t.Errorf("state %+v, want %+v", got, want)
			}
		})
	}
}

// A rule install that fails after a policy change leaves the agent
// deciding with the new policy and the fallback on the old one; every
// resync retries until it succeeds, and only then is the generation
// applied.
func TestRetryAfterFailedInstall(t *testing.T) {
	tests := []struct {
		name   string
		to     string
		failOn string // commands starting with this fail
	}{
		{"iptables-restore fails", config11, "iptables-nft-restore"},
		{"ipset fill fails", config6, "ipset restore"},
		{"reading the rules fails", config11, "iptables-nft-save"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, config10, nil)
			h.reload("start")
			failing := true
			h.rules.FailWith(func(cmd string) error {
				if failing && strings.HasPrefix(cmd, tt.failOn) {
					return errors.New("injected failure")
				}
				return nil
			})
			h.write(tt.to)
			h.reload("config file changed")
			h.reload("resync")
			st := h.state()
			if st.generation != 2 || st.applied != 1 || !st.ready || st.installErrs != 2 {
				t.Errorf("while failing: state %+v, want generation 2, applied 1, ready, 2 install errors", st)
			}
			if d := h.a.Policy().Decide(netip.MustParseAddr("11.1.1.1")); d.Action != nat.Passthrough {
				t.Errorf("the agent does not decide with the new policy: %+v", d)
			}
			if v := h.a.installed.Load(); v == nil || v.generation != 1 {
				t.Errorf("installed version %+v, want generation 1", v)
			}
			if strings.Contains(h.rules.Dump(), "11.0.0.0/8") {
				t.Error("the fallback holds the new list although its install failed")
			}

			failing = false
			h.reload("resync")
			if st := h.state(); st.generation != 2 || st.applied != 2 {
				t.Errorf("after the retry: state %+v, want generation and applied 2", st)
			}
			if v := h.a.installed.Load(); v == nil || v.generation != 2 {
				t.Errorf("installed version %+v, want generation 2", v)
			}
			if !strings.Contains(h.rules.Dump(), "11.0.0.0/8") {
				t.Errorf("the retry did not install the new list:\n%s", h.rules.Dump())
			}
		})
	}
}

// A policy change deletes the conntrack entries of pod flows whose
// decision changed (UDP and ICMP always, TCP only with ReconcileTCP), so
// their next packet is decided again; the applied generation moves only
// once they are gone.
func TestReconcileConntrack(t *testing.T) {
	flow := func(proto uint8, src, dst string) conntrack.Flow {
		return conntrack.Flow{Proto: proto, Orig: conntrack.Tuple{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}}
	}
	var (
		udpChanged   = flow(17, "10.244.0.2:4000", "11.1.1.1:53") // masquerade -> passthrough
		udpSame      = flow(17, "10.244.0.2:4001", "8.8.8.8:53")  // masquerade both times
		udpInternal  = flow(17, "10.244.0.2:4002", "10.1.1.1:53") // passthrough both times
		tcpChanged   = flow(6, "10.244.0.2:4003", "11.1.1.1:443")
		icmpChanged  = flow(1, "10.244.0.2:0", "11.1.1.1:0")
		notFromPod   = flow(17, "192.168.1.5:4004", "11.1.1.1:53")
		everyFlow    = []conntrack.Flow{udpChanged, udpSame, udpInternal, tcpChanged, icmpChanged, notFromPod}
		deletedNoTCP = []conntrack.Flow{udpSame, udpInternal, tcpChanged, notFromPod}
		deletedTCP   = []conntrack.Flow{udpSame, udpInternal, notFromPod}
	)
	tests := []struct {
		name         string
		reconcileTCP bool
		left         []conntrack.Flow
	}{
		{"UDP and ICMP re-decided, TCP kept", false, deletedNoTCP},
		{"with ReconcileTCP, TCP too", true, deletedTCP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, config10, func(c *Config) { c.ReconcileTCP = tt.reconcileTCP })
			h.reload("start")
			h.ct.flows = slices.Clone(everyFlow)
			var appliedAtDelete uint64
			h.ct.onDelete = func() { appliedAtDelete = h.a.applied.Load() }
			h.write(config11)
			h.reload("config file changed")
			if !slices.Equal(h.ct.flows, tt.left) {
				t.Errorf("left in conntrack:\n%v\nwant:\n%v", h.ct.flows, tt.left)
			}
			if appliedAtDelete != 1 || h.a.applied.Load() != 2 {
				t.Errorf("applied generation %d while deleting, %d after; want 1 then 2", appliedAtDelete, h.a.applied.Load())
			}
			h.reload("resync")
			if h.ct.calls != 1 {
				t.Errorf("DeleteStale called %d times, want once (only on a change)", h.ct.calls)
			}
		})
	}
}

// decisionEvent is what the queue hands the observer for a packet decided
// by pol.
func decisionEvent(pol *nat.Policy, dst string) *queue.Event {
	ev := &queue.Event{Time: time.Unix(1700000000, 0), Outcome: queue.Decided, Policy: pol}
	ev.Packet = packet.Parsed{Status: packet.OK, Proto: packet.UDP,
		Src: netip.MustParseAddr("10.244.0.2"), SrcPort: 4000, Dst: netip.MustParseAddr(dst), DstPort: 53}
	ev.Decision = pol.Decide(ev.Packet.Dst)
	return ev
}

// A decision recorded after a reload names the policy that made it, not
// the one in force when the record is written.
func TestDecisionRecordNamesDecidingPolicy(t *testing.T) {
	h := newHarness(t, config10, nil)
	h.reload("start")
	first := h.a.Policy()
	h.write(config11)
	h.reload("config file changed")
	second := h.a.Policy()
	if first.Hash() == second.Hash() {
		t.Fatal("the edit did not change the policy")
	}
	h.a.audit.Decided(decisionEvent(first, "11.1.1.1"))  // decided before the swap, recorded after
	h.a.audit.Decided(decisionEvent(second, "11.1.1.1")) // decided after
	recs := h.records()
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2: %v", len(recs), recs)
	}
	for i, want := range []struct {
		hash   string
		gen    float64
		action string
	}{{first.Hash(), 1, "masquerade"}, {second.Hash(), 2, "passthrough"}} {
		r := recs[i]
		if r["policy_hash"] != want.hash || r["policy_generation"] != want.gen || r["action"] != want.action {
			t.Errorf("record %d: policy_hash %v, policy_generation %v, action %v; want %s, %v, %s",
				i, r["policy_hash"], r["policy_generation"], r["action"], want.hash, want.gen, want.action)
		}
	}
}

// A fallback record names the policy whose rules the fallback ran: while
// the new policy's install fails, that is the old one.
func TestFallbackRecordNamesInstalledPolicy(t *testing.T) {
	h := newHarness(t, config10, nil)
	h.reload("start")
	installed := h.a.Policy()
	h.rules.FailWith(func(cmd string) error {
		if strings.HasPrefix(cmd, "iptables-nft-restore") {
			return errors.New("injected failure")
		}
		return nil
	})
	h.write(config11)
	h.reload("config file changed")

	events := make(chan conntrack.Event, 3)
	ev := func(m uint32, dst string) conntrack.Event {
		return conntrack.Event{Type: conntrack.EventDestroy, Flow: conntrack.Flow{Proto: 17, Mark: m,
			Orig:  conntrack.Tuple{Src: netip.MustParseAddrPort("10.244.0.2:4000"), Dst: netip.MustParseAddrPort(dst)},
			Reply: conntrack.Tuple{Src: netip.MustParseAddrPort(dst), Dst: netip.MustParseAddrPort("10.244.0.2:4000")}}}
	}
	events <- ev(mark.Default.Fallback, "11.1.1.1:53")
	events <- ev(mark.Default.Masquerade, "8.8.8.8:53")
	events <- ev(0, "8.8.4.4:53") // undecided: no record
	close(events)
	h.a.audit.consume(events)
	recs := h.records()
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2: %v", len(recs), recs)
	}
	if r := recs[0]; r["kind"] != "fallback" || r["policy_hash"] != installed.Hash() || r["policy_generation"] != 1.0 || r["prefix"] != nil {
		t.Errorf("fallback record %v: want kind fallback, the installed policy %s at generation 1, no prefix (11.0.0.0/8 is not in its list)", r, installed.Hash())
	}
	if r := recs[1]; r["kind"] != "end" {
		t.Errorf("second record %v: want kind end", r)
	}
	if got := testutil.ToFloat64(h.a.audit.skipped); got != 1 {
		t.Errorf("%v undecided flows counted, want 1", got)
	}
}

// A decision record of a pod kubelet has not published yet waits for the
// pod's name (keeping the decision's time), up to PodWait; the rest are
// written at once.
func TestDecisionRecordWaitsForPodName(t *testing.T) {
	const wait = 2 * time.Second
	tests := []struct {
		name    string
		known   bool // the pod is named before the decision
		namedAt time.Duration
		want    string
		outcome string
	}{
		{"named before the decision: written at once", true, 0, "ns/web", ""},
		{"named while waiting", false, wait / 2, "ns/web", "named"},
		{"never named: written unnamed after the wait", false, -1, "", "timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pods := newFakePods()
			if tt.known {
				pods.set("10.244.0.2", "ns/web")
			}
			h := newHarnessWithPods(t, config10, func(c *Config) { c.PodWait = wait }, pods)
			h.reload("start")
			ev := decisionEvent(h.a.Policy(), "8.8.8.8")
			h.a.audit.Decided(ev)
			outcome := func(o string) float64 { return testutil.ToFloat64(h.a.audit.podWait.WithLabelValues(o)) }
			if tt.outcome != "" {
				netnstest.Poll(t, 5*time.Second, time.Millisecond, "the record waiting", h.clock.HasWaiters)
				switch {
				case tt.namedAt >= 0:
					h.clock.Step(tt.namedAt)
					pods.set("10.244.0.2", "ns/web")
				default:
					h.clock.Step(wait / 2)
					if outcome("timeout") != 0 {
						t.Fatal("written before the wait was over")
					}
					h.clock.Step(wait / 2)
				}
				netnstest.Poll(t, 5*time.Second, time.Millisecond, "the record written", func() bool { return outcome(tt.outcome) == 1 })
			}
			recs := h.records()
			if len(recs) != 1 {
				t.Fatalf("%d records, want 1", len(recs))
			}
			r := recs[0]
			if pod, _ := r["pod"].(string); pod != tt.want {
				t.Errorf("pod %q, want %q", pod, tt.want)
			}
			if r["time"] != ev.Time.UTC().Format(time.RFC3339Nano) {
				t.Errorf("time %v, want the decision's %v", r["time"], ev.Time.UTC().Format(time.RFC3339Nano))
			}
		})
	}
}

// Records still waiting when the agent stops are written, named if the
// index knows the pod by then.
func TestWaitingRecordsWrittenAtClose(t *testing.T) {
	pods := newFakePods()
	h := newHarnessWithPods(t, config10, func(c *Config) { c.PodWait = time.Minute }, pods)
	h.reload("start")
	h.a.audit.Decided(decisionEvent(h.a.Policy(), "8.8.8.8"))
	netnstest.Poll(t, 5*time.Second, time.Millisecond, "the record waiting", h.clock.HasWaiters)
	h.a.audit.Close()
	recs := h.records()
	if len(recs) != 1 || recs[0]["pod"] != nil {
		t.Errorf("records %v, want the one decision record, unnamed", recs)
	}
}

// fakeExporter records what the audit hands a NAT exporter.
type fakeExporter struct {
	mu               sync.Mutex
	created, deleted []conntrack.Flow
	lost             uint64
}

func (e *fakeExporter) Created(f *conntrack.Flow) {
	e.mu.Lock()
	e.created = append(e.created, *f)
	e.mu.Unlock()
}
func (e *fakeExporter) Deleted(f *conntrack.Flow) {
	e.mu.Lock()
	e.deleted = append(e.deleted, *f)
	e.mu.Unlock()
}
func (e *fakeExporter) Lost(n uint64) { e.mu.Lock(); e.lost += n; e.mu.Unlock() }

// A masqueraded flow nfmasq decided gets a nat record, with its
// translation and conntrack id, when conntrack confirms it, and is
// exported at its start and its end; flows that kept their source, or
// that nfmasq did not decide, get neither.
func TestNatRecordsAndExport(t *testing.T) {
	exp := &fakeExporter{}
	h := newHarness(t, config10, func(c *Config) { c.NatRecords = true; c.Exporter = exp })
	h.reload("start")
	flow := func(id uint32, m uint32, dst, xlate string) conntrack.Flow {
		d := netip.MustParseAddrPort(dst)
		return conntrack.Flow{ID: id, Proto: 6, Mark: m,
			Orig:  conntrack.Tuple{Src: netip.MustParseAddrPort("10.244.0.2:4000"), Dst: d},
			Reply: conntrack.Tuple{Src: d, Dst: netip.MustParseAddrPort(xlate)}}
	}
	flows := []conntrack.Flow{
		flow(1, mark.Default.Masquerade, "8.8.8.8:443", "192.168.77.1:61417"),
		flow(2, mark.Default.Fallback, "8.8.4.4:443", "192.168.77.1:1025"),
		flow(3, mark.Default.Passthrough, "10.1.1.1:443", "10.244.0.2:4000"), // kept its source
		flow(4, 0, "1.1.1.1:443", "192.168.77.1:2000"),                       // not decided by nfmasq
	}
	news, ends := make(chan conntrack.Event, len(flows)), make(chan conntrack.Event, len(flows))
	for _, f := range flows {
		news <- conntrack.Event{Type: conntrack.EventNew, Flow: f}
		ends <- conntrack.Event{Type: conntrack.EventDestroy, Flow: f}
	}
	close(news)
	close(ends)
	h.a.audit.consumeNew(news)
	h.a.audit.consume(ends)
	var nats []map[string]any
	for _, r := range h.records() {
		if r["kind"] == "nat" {
			nats = append(nats, r)
		}
	}
	if len(nats) != 2 {
		t.Fatalf("%d nat records, want 2 (flows 1 and 2): %v", len(nats), nats)
	}
	for i, want := range []struct {
		id            float64
		xlate, source string
		port          float64
	}{{1, "192.168.77.1", "", 61417}, {2, "192.168.77.1", "kernel-fallback", 1025}} {
		r := nats[i]
		source, _ := r["source"].(string)
		if r["conntrack_id"] != want.id || r["xlate_src"] != want.xlate || r["xlate_sport"] != want.port ||
			r["action"] != "masquerade" || source != want.source || r["src"] != "10.244.0.2" || r["sport"] != 4000.0 {
			t.Errorf("nat record %d: %v", i, r)
		}
	}
	if nats[1]["policy_hash"] != h.a.Policy().Hash() {
		t.Errorf("fallback nat record names policy %v, want the installed %s", nats[1]["policy_hash"], h.a.Policy().Hash())
	}
	exp.mu.Lock()
	defer exp.mu.Unlock()
	ids := func(fs []conntrack.Flow) (out []uint32) {
		for _, f := range fs {
			out = append(out, f.ID)
		}
		return out
	}
	if got := ids(exp.created); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("exported creations of flows %v, want [1 2]", got)
	}
	if got := ids(exp.deleted); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("exported ends of flows %v, want [1 2]", got)
	}
}

// With nat records off, no new-flow record is written.
func TestNatRecordsOff(t *testing.T) {
	h := newHarness(t, config10, nil)
	h.reload("start")
	news := make(chan conntrack.Event, 1)
	news <- conntrack.Event{Type: conntrack.EventNew, Flow: conntrack.Flow{ID: 1, Proto: 17, Mark: mark.Default.Masquerade,
		Orig:  conntrack.Tuple{Src: netip.MustParseAddrPort("10.244.0.2:4000"), Dst: netip.MustParseAddrPort("8.8.8.8:53")},
		Reply: conntrack.Tuple{Src: netip.MustParseAddrPort("8.8.8.8:53"), Dst: netip.MustParseAddrPort("192.168.77.1:4000")}}}
	close(news)
	h.a.audit.consumeNew(news)
	if recs := h.records(); len(recs) != 0 {
		t.Errorf("records with nat records off: %v", recs)
	}
}

// ip-masq-agent's chain beside nfmasq is found at start and at every
// resync, logged once, exported, and reported gone once removed.
func TestIPMasqAgentChainDetected(t *testing.T) {
	var logs netnstest.Buffer
	h := newHarness(t, config10, func(c *Config) {
		c.IPMasqAgentChain = rules.DefaultIPMasqAgentChain
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	foreign := func() float64 {
		mfs, err := h.a.metrics.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "nfmasq_ip_masq_agent_chain" {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("nfmasq_ip_masq_agent_chain not exported")
		return 0
	}
	h.reload("start")
	if foreign() != 0 {
		t.Fatal("found on a bare node")
	}
	payload := "*nat\n:IP-MASQ-AGENT - [0:0]\n-A POSTROUTING -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT\n-A IP-MASQ-AGENT -d 10.0.0.0/8 -j RETURN\n-A IP-MASQ-AGENT -j MASQUERADE\nCOMMIT\n"
	if _, err := h.rules.Run(context.Background(), []byte(payload), "iptables-nft-restore", "-w", "--noflush"); err != nil {
		t.Fatal(err)
	}
	h.reload("resync")
	h.reload("resync")
	if foreign() != 1 {
		t.Error("ip-masq-agent's chain not reported")
	}
	if n := strings.Count(logs.String(), "ip-masq-agent's chain is installed beside nfmasq"); n != 1 {
		t.Errorf("logged %d times over two resyncs, want once", n)
	}
	if _, err := h.rules.Run(context.Background(), []byte("*nat\n-D POSTROUTING -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT\n-F IP-MASQ-AGENT\n-X IP-MASQ-AGENT\nCOMMIT\n"), "iptables-nft-restore", "-w", "--noflush"); err != nil {
		t.Fatal(err)
	}
	h.reload("resync")
	if foreign() != 0 || !strings.Contains(logs.String(), "ip-masq-agent's chain is gone") {
		t.Errorf("removal not reported: gauge %v", foreign())
	}
}

// fakeWorkloads is a WorkloadSource whose snapshot the test sets.
type fakeWorkloads struct {
	mu      sync.Mutex
	wl      *nat.Workloads
	changed chan struct{}
}

func (f *fakeWorkloads) Workloads() *nat.Workloads {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.wl
}

func (f *fakeWorkloads) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changed
}

func (f *fakeWorkloads) set(wl *nat.Workloads) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.wl = wl
	close(f.changed)
	f.changed = make(chan struct{})
}

// A change of the per-pod decisions rewrites the fallback's policy sets
// and deletes the conntrack entries of exactly the pods whose policies
// changed, where their decision changed; an unchanged snapshot touches
// nothing.
func TestApplyWorkloads(t *testing.T) {
	ps, errs := nat.ParseMasqueradePolicies([]byte(`apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: keep-partner}
spec: {action: NoSNAT, podSelector: {matchLabels: {app: billing}}, destinations: [{cidr: 11.1.0.0/16, except: [11.1.9.0/24]}]}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	all, err := nat.NewMasqueradePolicies(ps, nil)
	if err != nil {
		t.Fatal(err)
	}
	billing, err := all.For(nat.Workload{Labels: labels.Set{"app": "billing"}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := netip.MustParseAddr("10.244.0.2"), netip.MustParseAddr("10.244.0.3")
	src := &fakeWorkloads{changed: make(chan struct{})}
	src.set(nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{a: nil, b: nil}, []netip.Prefix{podCIDR}))
	h := newHarness(t, config10, nil)
	h.a.wl = src
	h.reload("start")
	h.a.appliedWL = src.Workloads()
	if strings.Contains(h.rules.Dump(), rules.PolicySetPrefix) {
		t.Fatal("policy sets installed while no pod has a policy")
	}

	flow := func(s netip.Addr, dst string) conntrack.Flow {
		return conntrack.Flow{Proto: 17, Orig: conntrack.Tuple{Src: netip.AddrPortFrom(s, 4000), Dst: netip.MustParseAddrPort(dst)}}
	}
	var (
		aChanged = flow(a, "11.1.1.1:53") // masquerade → kept by keep-partner
		aExcept  = flow(a, "11.1.9.9:53") // in the except: still the node's masquerade
		aOther   = flow(a, "8.8.8.8:53")  // no policy entry
		bSame    = flow(b, "11.1.1.1:53") // b's policies did not change
	)
	h.ct.flows = []conntrack.Flow{aChanged, aExcept, aOther, bSame}

	// a is relabelled billing.
	src.set(nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{a: billing, b: nil}, []netip.Prefix{podCIDR}))
	h.a.applyWorkloads(context.Background())
	if want := []conntrack.Flow{aExcept, aOther, bSame}; !slices.Equal(h.ct.flows, want) {
		t.Errorf("left in conntrack:\n%v\nwant:\n%v", h.ct.flows, want)
	}
	dump := h.rules.Dump()
	for _, want := range []string{"-s4 10.244.0.2\n", "-k4 11.1.0.0/16\n", "-k4 11.1.9.0/24 nomatch\n"} {
		if !strings.Contains(dump, want) {
			t.Errorf("fallback lacks %q:\n%s", want, dump)
		}
	}
	if err := h.a.rules.Check(context.Background(), h.a.rulesCfg); err != nil {
		t.Errorf("Check after the change: %v", err)
	}

	// The same decisions again: no rule write, no conntrack walk.
	calls, writes := h.ct.calls, len(h.rules.Calls())
	src.set(nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{a: billing, b: nil}, []netip.Prefix{podCIDR}))
	h.a.applyWorkloads(context.Background())
	if len(h.rules.Calls()) != writes {
		t.Errorf("an unchanged snapshot ran %v", h.rules.Calls()[writes:])
	}
	if h.ct.calls != calls || len(h.ct.flows) != 3 {
		t.Errorf("an unchanged snapshot walked conntrack (%d times) or deleted flows: %v", h.ct.calls-calls, h.ct.flows)
	}
}
