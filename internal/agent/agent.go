package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/utils/clock"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
)

// Config is everything `nfmasq agent` was told: checked flags, parsed.
type Config struct {
	// Source is the policy, loaded at start and at every reload.
	Source *PolicySource
	// Dataplane shapes the rule set; its PodCIDRs are known (flags or
	// the Node object).
	Dataplane Dataplane
	// Backend is the iptables backend: "" to detect, nft or legacy. Used
	// only when Deps.Rules is nil.
	Backend rules.Backend
	// Workers and BusyPoll tune the queue (queue.Config).
	Workers  int
	BusyPoll time.Duration
	// IPMasqAgentChain is the nat chain of an ip-masq-agent still
	// installed (rules.DefaultIPMasqAgentChain); "" does not look.
	IPMasqAgentChain string
	// ReconcileTCP also deletes the conntrack entries of TCP flows whose
	// decision a policy change changed.
	ReconcileTCP bool
	// FlowLog configures the audit trail (Sink, Node, sampling, rotation).
	FlowLog flowlog.Options
	// NatRecords writes a nat record, with the translated source, when
	// conntrack confirms a masqueraded pod flow.
	NatRecords bool
	// Exporter, when not nil, receives the creation and end of every
	// masqueraded pod flow (the IPFIX exporter). The caller closes it
	// after Run returns.
	Exporter NATExporter
	// IdentityWait is how long the first packet from an address of the
	// node's pod ranges that no known pod has waits for the pod's
	// identity, while MasqueradePolicies exist (queue.Config).
	IdentityWait time.Duration
	// WorkloadsStartWait bounds how long the start waits for the first
	// per-pod decisions (Deps.Workloads): meanwhile the rules an earlier
	// run left keep deciding, with its MasqueradePolicy sets, where
	// starting without them would put the node policy in their place
	// until they arrive. 0 does not wait.
	WorkloadsStartWait time.Duration
	// PodWait is how long a decision record whose source no pod is known
	// for yet waits for the pod's name: kubelet publishes a new pod's
	// address after its containers start, so its first flows would
	// otherwise be unnamed. The record keeps the decision's time; the
	// verdict never waits. 0 writes such records at once.
	PodWait time.Duration
	// Metrics, when not nil, serves /metrics, /healthz and /readyz. The
	// caller binds it before anything touches the kernel, so a bad
	// address stops the start early.
	Metrics net.Listener
	// Scrape, when not nil, serves /metrics only: the opt-in address a
	// cluster's Prometheus scrapes (the node's), while health stays on
	// Metrics' loopback address.
	Scrape net.Listener
	// Logger receives the agent's log.
	Logger *slog.Logger
}

// RuleSet installs the rule set and checks that it is still in place;
// rules.Installer is the real one.
type RuleSet interface {
	Install(ctx context.Context, cfg rules.Config) error
	Check(ctx context.Context, cfg rules.Config) error
}

// Conntrack deletes the conntrack entries match selects among those of
// the given IP protocols, and returns how many it deleted.
type Conntrack interface {
	DeleteStale(ctx context.Context, match func(conntrack.Flow) bool, protos []uint8) (int, error)
}

// Deps are the kernel seams of the control loop. A nil field gets the
// real thing.
type Deps struct {
	// Rules: nil runs iptables and ipset, on the backend Config.Backend
	// names or detection finds.
	Rules RuleSet
	// Conntrack: nil uses the kernel's table of the agent's namespace.
	Conntrack Conntrack
	// Clock times the resyncs: nil is the wall clock.
	Clock clock.Clock
	// Pods names the pods of this node for flow records; nil names none.
	Pods PodNames
	// Workloads gives the per-pod MasqueradePolicy decisions; nil for
	// none (the node policy decides every flow).
	Workloads WorkloadSource
}

// WorkloadSource publishes the per-pod MasqueradePolicy decisions
// (kube.MasqueradeWatcher).
type WorkloadSource interface {
	// Workloads returns the decisions in force, nil before the first.
	Workloads() *nat.Workloads
	// Changed returns a channel closed at the next publish.
	Changed() <-chan struct{}
}

// PodNames names the pods of this node by address (kube.PodIndex).
type PodNames interface {
	// Lookup returns "namespace/name" of the pod with address a, or "".
	Lookup(a netip.Addr) string
	// Changed returns a channel closed at the next change of the names.
	Changed() <-chan struct{}
}

// StartupError is an error of the agent's configuration found before it
// changed anything: the agent refuses to start.
type StartupError struct{ Err error }

func (e *StartupError) Error() string { return e.Err.Error() }
func (e *StartupError) Unwrap() error { return e.Err }

// version is a policy and the generation it was put in force as: stored
// together, so a record never pairs one policy's hash with another's
// generation.
type version struct {
	policy     *nat.Policy
	generation uint64
	// prev is the version this one replaced, for the decisions made with
	// it that are recorded after the swap.
	prev *version
}

// generationOf returns the generation v (or the version it replaced)
// gave pol, and false for a policy older than both.
func (v *version) generationOf(pol *nat.Policy) (uint64, bool) {
	for ; v != nil; v = v.prev {
		if v.policy == pol {
			return v.generation, true
		}
	}
	return 0, false
}

// Agent is one running node agent. The policy version is the only state
// the dataplane reads; everything else belongs to the control loop.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	rules   RuleSet
	ct      Conntrack
	clock   clock.Clock
	pods    PodNames
	wl      WorkloadSource
	metrics *metrics
	audit   *audit

	cur atomic.Pointer[version]
	// installed is the version whose rules the kernel fallback runs.
	installed atomic.Pointer[version]
	// applied is the generation whose fallback rules are installed and
	// whose changed flows were re-decided.
	applied atomic.Uint64

	ready   atomic.Bool
	healthy atomic.Bool

	rulesCfg rules.Config // the rule set last installed (queue enabled)
	lastErr  string       // last distinct config error logged
	lastWarn string       // last distinct set of warnings logged
	driftLog bool         // rules drift already reported and not yet restored
	foreign  atomic.Bool  // ip-masq-agent's chain was found at the last check
	// rulesPending: the policy in force is newer than the installed
	// fallback rules (their install failed); every resync retries.
	rulesPending bool

	ctDrops     uint64 // conntrack's drop counter at the last resync
	ctDropsRead bool   // ctDrops holds a reading
	ctFull      bool   // a full conntrack table reported and not yet cleared

	// appliedWL is the Workloads the fallback rules and conntrack were
	// last brought in line with.
	appliedWL *nat.Workloads
}

// workloads returns the per-pod decisions in force, nil for none.
func (a *Agent) workloads() *nat.Workloads {
	if a.wl == nil {
		return nil
	}
	return a.wl.Workloads()
}

// workloadsChanged returns the source's change channel, nil (never ready)
// without one.
func (a *Agent) workloadsChanged() <-chan struct{} {
	if a.wl == nil {
		return nil
	}
	return a.wl.Changed()
}

// podName is the name of the pod with address a, "" when unknown.
func (a *Agent) podName(addr netip.Addr) string {
	if a.pods == nil {
		return ""
	}
	return a.pods.Lookup(addr)
}

// New checks cfg and opens the flow log. It changes nothing in the
// kernel; Run does.
func New(cfg Config, deps Deps) (*Agent, error) {
	if cfg.Source == nil {
		return nil, &StartupError{errors.New("agent: no policy source")}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, rules: deps.Rules, ct: deps.Conntrack, clock: deps.Clock, pods: deps.Pods, wl: deps.Workloads}
	if a.clock == nil {
		a.clock = clock.RealClock{}
	}
	if a.ct == nil {
		a.ct = kernelConntrack{}
	}
	au, err := newAudit(a)
	if err != nil {
		return nil, &StartupError{err}
	}
	a.audit = au
	a.metrics = newMetrics(a)
	a.healthy.Store(true)
	return a, nil
}

// kernelConntrack is the conntrack table of the agent's namespace.
type kernelConntrack struct{}

func (kernelConntrack) DeleteStale(ctx context.Context, match func(conntrack.Flow) bool, protos []uint8) (int, error) {
	return conntrack.DeleteStale(ctx, 0, match, protos)
}

// Policy returns the policy in force, nil before the first load.
func (a *Agent) Policy() *nat.Policy {
	if v := a.cur.Load(); v != nil {
		return v.policy
	}
	return nil
}

// Run installs the rules, binds the queue and keeps both in line with the
// config until ctx ends; then it hands new flows to the kernel fallback
// and returns nil. It returns a StartupError when the start fails before
// the kernel was changed, and another error when the queue stops.
func (a *Agent) Run(ctx context.Context) error {
	defer a.audit.Close()
	if a.rules == nil {
		det, err := rules.ResolveBackend(ctx, rules.ExecRunner{}, string(a.cfg.Backend))
		if err != nil {
			return &StartupError{err}
		}
		a.log.Info("iptables backend", "backend", det.Backend, "reason", det.Reason)
		a.rules = &rules.Installer{Runner: rules.ExecRunner{}, Backend: det.Backend}
	}
	if err := a.audit.start(); err != nil {
		return &StartupError{err}
	}

	queueNums := a.cfg.Dataplane.QueueNums()
	q, err := queue.New(queue.Config{
		QueueNums: queueNums,
		Workers:   a.cfg.Workers,
		BusyPoll:  a.cfg.BusyPoll,
		Marks:     a.cfg.Dataplane.Marks,
		Policy:    a.Policy,
		Observer:  a.audit,
		Logger:    a.log,
		// Without a source no pod is ever unknown: nothing waits.
		Workloads:    a.workloads,
		IdentityWait: a.cfg.IdentityWait,
	})
	if err != nil {
		return &StartupError{err}
	}
	a.metrics.registerQueue(q)

	var wg sync.WaitGroup
	defer wg.Wait()
	if a.cfg.Metrics != nil {
		srv := a.serveHTTP(a.cfg.Metrics, true)
		defer srv.Shutdown(context.Background())
	}
	if a.cfg.Scrape != nil {
		srv := a.serveHTTP(a.cfg.Scrape, false)
		defer srv.Shutdown(context.Background())
	}

	// The queue is bound before the rules send packets to it, so the
	// first flows find someone listening rather than the bypass. The
	// rule set is first put in its stopped form, where the fallback
	// decides every new flow, so that the restart sequence is the same
	// whatever an earlier run (kill -9, OOM) left in the kernel; the
	// queue's bind answers packets that arrive meanwhile
	// (queue.TestKernelBindUnderLoad).
	a.waitWorkloads(ctx)
	a.pauseQueue(ctx)
	queueCtx, stopQueue := context.WithCancel(context.Background())
	defer stopQueue()
	queueErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		queueErr <- q.Run(queueCtx)
	}()
	select {
	case <-q.Ready():
	case err := <-queueErr:
		return fmt.Errorf("bind NFQUEUE %v: %w", queueNums, err)
	case <-ctx.Done():
		return nil
	}
	a.log.Info("queue bound", "queues", queueNums, "workers", a.cfg.Workers)

	watch := newConfigWatch(a.cfg.Source.ConfigPath, a.log)
	defer watch.Close()
	wlChanged := a.workloadsChanged()
	a.reload(ctx, "start")
	a.checkConntrackTable() // the baseline of the drop counter

	for {
		timer := a.clock.NewTimer(a.resyncInterval())
		select {
		case <-wlChanged:
			timer.Stop()
			// Taken before the read, so a publish after it is not missed.
			wlChanged = a.workloadsChanged()
			q.WorkloadsChanged()
			a.applyWorkloads(ctx)
		case <-ctx.Done():
			timer.Stop()
			return a.shutdown(stopQueue, queueErr)
		case err := <-queueErr:
			timer.Stop()
			a.healthy.Store(false)
			a.ready.Store(false)
			// The fallback chain keeps NAT right; the restart brings
			// the audit trail back.
			return fmt.Errorf("queue stopped: %w", err)
		case <-watch.Changed():
			timer.Stop()
			a.reload(ctx, "config file changed")
		case <-timer.C():
			a.reload(ctx, "resync")
			a.checkConntrackTable()
		}
	}
}

// waitWorkloads waits for the workload source's first publish, at most
// Config.WorkloadsStartWait.
func (a *Agent) waitWorkloads(ctx context.Context) {
	if a.wl == nil || a.cfg.WorkloadsStartWait <= 0 {
		return
	}
	timer := a.clock.NewTimer(a.cfg.WorkloadsStartWait)
	defer timer.Stop()
	for {
		changed := a.wl.Changed() // before the look, so a publish is not missed
		if a.workloads() != nil {
			return
		}
		select {
		case <-changed:
		case <-timer.C():
			a.log.Warn("MasqueradePolicies not listed yet; starting with the node policy alone until they are", "waited", a.cfg.WorkloadsStartWait)
			return
		case <-ctx.Done():
			return
		}
	}
}

// resyncInterval is the current policy's resyncInterval, or the default
// while no policy was ever loaded.
func (a *Agent) resyncInterval() time.Duration {
	if p := a.Policy(); p != nil {
		if d := p.Effective().ResyncInterval; d > 0 {
			return d
		}
	}
	return nat.DefaultConfig(true).ResyncInterval
}

// reload reads the config, swaps the policy when it changed, and makes
// the kernel rules match. A bad config keeps the last good policy (and
// rules); each distinct error is logged once and every failure counted.
func (a *Agent) reload(ctx context.Context, why string) {
	a.checkForeign(ctx)
	pol, warnings, err := a.cfg.Source.Load()
	if err != nil {
		a.metrics.reloadFailures.Inc()
		if msg := err.Error(); msg != a.lastErr {
			a.lastErr = msg
			a.log.Error("config rejected; keeping the last good policy", "path", a.cfg.Source.ConfigPath, "err", err, "trigger", why)
		}
		if a.cur.Load() == nil {
			a.setNotReady("no valid config yet: " + err.Error())
		}
		return
	}
	a.lastErr = ""
	if w := fmt.Sprint(warnings, pol.Notes()); w != a.lastWarn {
		a.lastWarn = w
		for _, s := range warnings {
			a.log.Warn(s, "path", a.cfg.Source.ConfigPath)
		}
		for _, s := range pol.Notes() {
			a.log.Info(s)
		}
	}

	old := a.cur.Load()
	if old != nil && old.policy.Hash() == pol.Hash() {
		if a.rulesPending {
			if a.installRules(ctx, "retry") {
				a.applied.Store(old.generation)
			}
			return
		}
		a.checkRules(ctx)
		return
	}
	cfg, err := a.rulesConfig(pol, a.workloads())
	if err != nil {
		// Flags were checked at start; only the policy can make this
		// fail (say, IPv6 CIDRs in a family the rules lack).
		a.metrics.reloadFailures.Inc()
		a.log.Error("policy cannot be installed; keeping the last good one", "err", err)
		return
	}
	if old == nil {
		// First policy: nothing is queued before the rules exist, and
		// readiness means rules installed.
		if err := a.rules.Install(ctx, cfg); err != nil {
			a.metrics.installErrors.Inc()
			a.log.Error("installing rules failed; will retry at the next resync", "err", err)
			a.setNotReady("rules not installed: " + err.Error())
			return
		}
	}
	// On a change the new policy decides the next queued packet at once;
	// the kernel fallback follows when its rules are rewritten (for a
	// 100,000-CIDR ipset that takes longer than compiling the policy).
	// Until then only flows the agent does not see use the old list.
	a.rulesCfg = cfg
	v := &version{policy: pol, generation: 1}
	if old != nil {
		v.generation = old.generation + 1
		v.prev = &version{policy: old.policy, generation: old.generation}
	}
	a.cur.Store(v)
	a.driftLog = false
	a.log.Info("policy in force", "generation", v.generation, "hash", pol.Hash(), "prefixes", pol.Len(),
		"resyncInterval", pol.Effective().ResyncInterval.String(), "trigger", why)
	installed := true
	if old == nil {
		a.installed.Store(v)
		a.appliedWL = a.workloads()
	} else {
		a.rulesPending = true
		installed = a.installRules(ctx, why)
		wl := a.workloads()
		a.reconcileConntrack(ctx, "policy change", func(src, dst netip.Addr) bool {
			return wl.Decide(old.policy, src, dst).Action != wl.Decide(pol, src, dst).Action
		})
	}
	// Applied only now: the rules are in and the flows the change
	// re-decides are gone from conntrack.
	if installed {
		a.applied.Store(v.generation)
	}
	a.ready.Store(true)
}

// installRules writes the rule set of the policy in force and reports
// whether it is in; a failure is retried at every resync until it
// succeeds.
func (a *Agent) installRules(ctx context.Context, why string) bool {
	if err := a.rules.Install(ctx, a.rulesCfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Error("installing the fallback rules of the new policy failed; the agent decides with it, the fallback keeps the old list until a retry succeeds", "err", err, "trigger", why)
		return false
	}
	a.rulesPending = false
	a.installed.Store(a.cur.Load())
	return true
}

// ForeignDetector finds another masquerade agent's rules
// (rules.Installer is one).
type ForeignDetector interface {
	ForeignMasquerade(ctx context.Context, chain string) []string
}

// checkForeign looks for ip-masq-agent's chain and POSTROUTING jump: they
// masquerade whatever nfmasq decides. Found, it is logged once and
// exported (nfmasq_ip_masq_agent_chain); nfmasq never removes another
// program's rules.
func (a *Agent) checkForeign(ctx context.Context) {
	fd, ok := a.rules.(ForeignDetector)
	if !ok || a.cfg.IPMasqAgentChain == "" {
		return
	}
	found := fd.ForeignMasquerade(ctx, a.cfg.IPMasqAgentChain)
	was := a.foreign.Swap(len(found) > 0)
	switch {
	case len(found) > 0 && !was:
		a.log.Warn("ip-masq-agent's chain is installed beside nfmasq: it masquerades flows nfmasq decided to keep their pod address; "+
			"remove ip-masq-agent (README: Migrating from ip-masq-agent)", "chain", a.cfg.IPMasqAgentChain, "found", found)
	case len(found) == 0 && was:
		a.log.Info("ip-masq-agent's chain is gone", "chain", a.cfg.IPMasqAgentChain)
	}
}

// checkRules restores the rule set when another process changed it.
func (a *Agent) checkRules(ctx context.Context) {
	err := a.rules.Check(ctx, a.rulesCfg)
	if err == nil {
		a.driftLog = false
		return
	}
	if !errors.Is(err, rules.ErrRulesChanged) {
		a.log.Warn("could not read the live rules", "err", err)
		return
	}
	if !a.driftLog {
		a.driftLog = true
		a.log.Warn("rules were changed by another process; restoring them", "diff", err)
	}
	if err := a.rules.Install(ctx, a.rulesCfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Error("restoring rules failed; will retry at the next resync", "err", err)
		return
	}
	// Restored: the next difference is a new incident, even if it comes
	// before a clean check would have reset the flag.
	a.driftLog = false
	a.metrics.rulesRestored.Inc()
}

// reconcileConntrack deletes the conntrack entries of pod flows whose
// decision the new policy changes, so their next packet is decided again
// (kube-proxy does the same for stale UDP entries). TCP entries are left
// alone unless ReconcileTCP: deleting a masqueraded connection's entry
// breaks it.
func (a *Agent) reconcileConntrack(ctx context.Context, why string, changed func(src, dst netip.Addr) bool) {
	protos := []uint8{17, 1, 58, 136} // UDP, ICMP, ICMPv6, UDP-Lite
	if a.cfg.ReconcileTCP {
		protos = append(protos, 6, 132) // TCP, SCTP
	}
	pods := a.cfg.Dataplane.PodCIDRs
	n, err := a.ct.DeleteStale(ctx, func(f conntrack.Flow) bool {
		src := f.Orig.Src.Addr().Unmap()
		return conntrack.InPrefixes(pods, src) && changed(src, f.Orig.Dst.Addr().Unmap())
	}, protos)
	if err != nil {
		a.log.Warn("could not re-decide flows after a change", "err", err, "trigger", why)
		return
	}
	if n > 0 {
		a.log.Info("deleted conntrack entries of flows whose decision changed", "entries", n, "tcp", a.cfg.ReconcileTCP, "trigger", why)
	}
}

// rulesConfig is the rule set of pol with the MasqueradePolicy sets of wl.
func (a *Agent) rulesConfig(pol *nat.Policy, wl *nat.Workloads) (rules.Config, error) {
	cfg, err := a.cfg.Dataplane.RulesConfig(pol)
	if err != nil {
		return cfg, err
	}
	cfg.PolicySets = PolicySets(wl, cfg.EnableIPv6)
	return cfg, cfg.Validate()
}

// applyWorkloads brings the kernel fallback's policy sets and conntrack in
// line with new per-pod decisions: the rules are rewritten when the sets
// or their pods changed, and the entries of flows from pods whose policies
// changed, and whose decision did, are deleted. Pods whose policies did
// not change are not looked at again.
func (a *Agent) applyWorkloads(ctx context.Context) {
	wl := a.workloads()
	old := a.appliedWL
	a.appliedWL = wl
	v := a.cur.Load()
	if v == nil {
		return // the first reload installs everything
	}
	cfg, err := a.rulesConfig(v.policy, wl)
	if err != nil {
		a.log.Error("MasqueradePolicy sets cannot be installed", "err", err)
		return
	}
	if !slices.EqualFunc(cfg.PolicySets, a.rulesCfg.PolicySets, samePolicySet) {
		a.rulesCfg = cfg
		a.rulesPending = true
		if a.installRules(ctx, "MasqueradePolicy change") {
			a.log.Info("MasqueradePolicy fallback sets installed", "sets", len(cfg.PolicySets))
		}
	}
	// The pods whose policies changed: only their flows are looked at,
	// and conntrack is not walked at all when there are none.
	changed := map[netip.Addr][2]*nat.PolicySet{}
	wl.Each(func(addr netip.Addr, s *nat.PolicySet) {
		if os, known := old.Pod(addr); !known || os != s {
			changed[addr] = [2]*nat.PolicySet{os, s}
		}
	})
	old.Each(func(addr netip.Addr, s *nat.PolicySet) {
		if _, known := wl.Pod(addr); !known {
			changed[addr] = [2]*nat.PolicySet{s, nil}
		}
	})
	if len(changed) == 0 {
		return
	}
	pol := v.policy
	a.reconcileConntrack(ctx, "MasqueradePolicy change", func(src, dst netip.Addr) bool {
		c, ok := changed[src]
		return ok && c[0].DecideOr(pol, dst).Action != c[1].DecideOr(pol, dst).Action
	})
}

// pauseQueue installs the rule set of the config on disk without the
// queue rule, as shutdown leaves it. Without a valid config the rules stay
// as they are: reload reports the error.
func (a *Agent) pauseQueue(ctx context.Context) {
	pol, _, err := a.cfg.Source.Load()
	if err != nil {
		return
	}
	cfg, err := a.rulesConfig(pol, a.workloads())
	if err != nil {
		return
	}
	cfg.QueuePaused = true
	if err := a.rules.Install(ctx, cfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Warn("could not take the queue rule out before binding the queue", "err", err)
	}
}

// checkConntrackTable logs, once per incident, that the kernel drops new
// flows because the conntrack table is full. The metrics say so too, but
// scraping them over the node's network needs a conntrack entry of its
// own, so while the table is full only the log gets out.
func (a *Agent) checkConntrackTable() {
	f, err := os.Open(procConntrackStat)
	if err != nil {
		return
	}
	sums, err := readConntrackStat(f)
	f.Close()
	if err != nil {
		return
	}
	drops, prev, known := sums["drop"], a.ctDrops, a.ctDropsRead
	a.ctDrops, a.ctDropsRead = drops, true
	switch {
	case known && drops > prev && !a.ctFull:
		a.ctFull = true
		count, _ := os.ReadFile(procConntrackCount)
		limit, _ := os.ReadFile(procConntrackMax)
		a.log.Warn("conntrack table full: the kernel is dropping new flows before they reach nfmasq or the fallback",
			"dropped", drops-prev, "entries", strings.TrimSpace(string(count)), "nf_conntrack_max", strings.TrimSpace(string(limit)))
	case known && drops == prev && a.ctFull:
		a.ctFull = false
		a.log.Info("conntrack table no longer dropping new flows")
	}
}

func (a *Agent) setNotReady(reason string) {
	a.ready.Store(false)
	a.log.Warn("not ready", "reason", reason)
}

// shutdown stops queueing first (the rules without the queue leave every
// new flow to the fallback chain), then lets the queue answer what is in
// flight, and leaves the fallback rules so NAT stays right until the next
// agent starts.
func (a *Agent) shutdown(stopQueue context.CancelFunc, queueErr <-chan error) error {
	a.ready.Store(false)
	a.log.Info("stopping: handing new flows to the kernel fallback")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if a.cur.Load() != nil {
		cfg := a.rulesCfg
		cfg.QueuePaused = true
		if err := a.rules.Install(ctx, cfg); err != nil {
			a.log.Error("could not remove the queue rule; packets in flight may be dropped", "err", err)
		}
	}
	stopQueue()
	if err := <-queueErr; err != nil && !errors.Is(err, context.Canceled) {
		a.log.Error("queue stopped with an error", "err", err)
	}
	a.log.Info("stopped; the fallback rules stay in place")
	return nil
}

// serveHTTP serves metrics and health on ln.
func (a *Agent) serveHTTP(ln net.Listener, health bool) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", a.metrics.handler())
	if !health {
		return a.serve(ln, mux)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.healthy.Load() {
			http.Error(w, "queue stopped", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.ready.Load() {
			http.Error(w, "not ready: rules not installed or queue not bound", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return a.serve(ln, mux)
}

func (a *Agent) serve(ln net.Listener, mux *http.ServeMux) *http.Server {
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics server stopped", "err", err)
		}
	}()
	return srv
}
