package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
)

// agentFlags are the flags of `nfmasq agent` beyond the policy and
// dataplane ones shared with `rules`.
type agentFlags struct {
	policy    policyFlags
	dataplane dataplaneFlags

	metricsAddr  string
	workers      int
	busyPoll     time.Duration
	logFormat    string
	logLevel     string
	reconcileTCP bool
	kubeconfig   string
	audit        auditFlags
}

func newAgentCmd() *cobra.Command {
	var f agentFlags
	cmd := &cobra.Command{
		Use:   "agent --pod-cidr CIDR [flags]",
		Short: "Run the node agent: queue the first packet of each pod flow, decide, let the kernel masquerade",
		Long: `Run the node agent (the DaemonSet process). It installs nfmasq's iptables
chains, binds the NFQUEUE, decides the first packet of each pod flow with
the policy (ip-masq-agent's config file, GKE's defaults) and answers with a
packet mark that the kernel saves in the connmark; MASQUERADE applies to
the masquerade mark. A static fallback chain written from the same policy
decides whatever the agent does not (agent down, queue full), so NAT is
right whether or not the agent runs. The config file is watched and
re-read every resyncInterval; a bad file keeps the last good policy.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAgent(cmd.Context(), &f, cmd.ErrOrStderr())
		},
	}
	fs := cmd.Flags()
	f.policy.register(fs)
	// Exposed on the agent to emulate a node without the masquerade
	// DaemonSet (GKE's built-in default SNAT): the e2e tests use it to
	// reproduce every row of GKE's Standard-cluster table.
	f.policy.registerClusterModel(fs)
	f.dataplane.register(fs)
	fs.StringVar(&f.metricsAddr, "metrics-addr", "127.0.0.1:9741",
		`address for /metrics, /healthz and /readyz ("" disables); keep it on loopback unless a scraper needs it`)
	fs.IntVar(&f.workers, "workers", 0, "decision workers per queue (0: decide on each queue's receive goroutine)")
	fs.DurationVar(&f.busyPoll, "busy-poll", queue.DefaultBusyPoll,
		"longest a queue's reader polls for the next packet before it sleeps (adaptive; 0 never polls): "+
			"polling spares the reader a wake-up per run of packets (tens of µs on a VM); longer windows (50us) also cut first-packet latency, "+
			"for up to a third of a core more CPU at 20k-50k new flows/s (docs/benchmarks.md)")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&f.reconcileTCP, "reconcile-tcp", false,
		"on a policy change also delete the conntrack entries of TCP flows whose decision changed (breaks those connections); UDP and ICMP are always re-decided")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "",
		"kubeconfig for running outside a cluster (pod CIDR discovery, pod names in flow records); in a cluster the service account is used")
	f.audit.register(fs)
	return cmd
}

func init() { rootCmd.AddCommand(newAgentCmd()) }

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// agent is one running `nfmasq agent`. The policy pointer is the only
// state the dataplane reads; everything else belongs to the control loop.
type agent struct {
	flags   *agentFlags
	log     *slog.Logger
	metrics *agentMetrics

	policy     atomic.Pointer[nat.Policy]
	generation atomic.Uint64
	// applied is the generation whose fallback rules are installed and
	// whose conntrack clean-up is done.
	applied   atomic.Uint64
	rulesCfg  rules.Config // the rule set last installed (queue enabled)
	installer *rules.Installer
	podCIDRs  []netip.Prefix
	queueNums []uint16

	ready   atomic.Bool
	healthy atomic.Bool

	lastErr  string // last distinct config error logged
	lastWarn string // last distinct set of warnings logged
	driftLog bool   // rules drift already reported and not yet restored
	// rulesPending: the policy in force is newer than the installed
	// fallback rules (their install failed); every resync retries.
	rulesPending bool

	ctDrops     uint64 // conntrack's drop counter at the last resync
	ctDropsRead bool   // ctDrops holds a reading
	ctFull      bool   // a full conntrack table reported and not yet cleared
}

// errStartup marks errors that come from flags: the agent refuses to start.
func startupError(err error) error { return &exitError{code: exitConfig, err: err} }

func runAgent(ctx context.Context, f *agentFlags, stderr io.Writer) error {
	log, err := newLogger(stderr, f.logFormat, f.logLevel)
	if err != nil {
		return startupError(err)
	}
	if f.workers < 0 {
		return startupError(fmt.Errorf("--workers %d: must be 0 or more", f.workers))
	}
	if f.busyPoll < 0 || f.busyPoll > time.Millisecond {
		return startupError(fmt.Errorf("--busy-poll %v: must be between 0 and 1ms", f.busyPoll))
	}
	client, err := kubeClient(f.kubeconfig)
	if err != nil {
		return startupError(err)
	}
	if len(f.dataplane.podCIDRs) == 0 {
		cidrs, err := discoverPodCIDRs(ctx, client)
		if err != nil {
			return startupError(err)
		}
		f.dataplane.podCIDRs = cidrs
		log.Info("pod CIDRs from the node object", "podCIDRs", cidrs)
	}
	if f.dataplane.queues == 0 {
		return startupError(errors.New("--queues 0: need at least one queue"))
	}
	if int(f.dataplane.queueNum)+int(f.dataplane.queues)-1 > 65535 {
		return startupError(fmt.Errorf("--queue-num %d with --queues %d runs past queue 65535", f.dataplane.queueNum, f.dataplane.queues))
	}
	// Check every dataplane flag now, with a stand-in policy: a bad
	// --mark-mask or --pod-cidr must stop the start, not a reload.
	probe, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(true), EnableIPv6: f.policy.enableIPv6})
	if err != nil {
		return startupError(err)
	}
	baseCfg, err := f.dataplane.rulesConfig(probe)
	if err != nil {
		return startupError(err)
	}
	// The remaining flags are checked, and the metrics address bound,
	// before anything runs iptables or writes a sysctl: a typo must not
	// leave a node half-configured by an agent that then refuses to start.
	if err := f.checkBeforeKernel(); err != nil {
		return startupError(err)
	}
	var metricsLn net.Listener
	if f.metricsAddr != "" {
		if metricsLn, err = net.Listen("tcp", f.metricsAddr); err != nil {
			return startupError(fmt.Errorf("--metrics-addr: %w", err))
		}
		defer metricsLn.Close() // after a start-up failure; the server closes it otherwise
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()

	a := &agent{flags: f, log: log, podCIDRs: baseCfg.PodCIDRs}
	for i := uint16(0); i < f.dataplane.queues; i++ {
		a.queueNums = append(a.queueNums, f.dataplane.queueNum+i)
	}
	a.healthy.Store(true)

	det, err := f.dataplane.resolveBackend(ctx, rules.ExecRunner{})
	if err != nil {
		return startupError(err)
	}
	log.Info("iptables backend", "backend", det.Backend, "reason", det.Reason)
	a.installer = &rules.Installer{Runner: rules.ExecRunner{}, Backend: det.Backend}

	audit, err := newAudit(ctx, a, &f.audit, startPodIndex(ctx, client, log))
	if err != nil {
		return startupError(err)
	}
	defer audit.Close()

	q, err := queue.New(queue.Config{
		QueueNums: a.queueNums,
		Workers:   f.workers,
		BusyPoll:  f.busyPoll,
		Marks: mark.Layout{
			Mask:        baseCfg.Mark.Mask,
			Masquerade:  baseCfg.Mark.Masquerade,
			Passthrough: baseCfg.Mark.Passthrough,
		},
		Policy:   a.policy.Load,
		Observer: audit,
		Logger:   log,
	})
	if err != nil {
		return startupError(err)
	}
	a.metrics = newAgentMetrics(a, q, audit)

	var wg sync.WaitGroup
	defer wg.Wait()
	if metricsLn != nil {
		srv := a.serveHTTP(metricsLn)
		defer srv.Shutdown(context.Background())
	}

	// The queue is bound before the rules send packets to it, so the
	// first flows find someone listening rather than the bypass. A run
	// that did not stop cleanly (kill -9, OOM) left its queue rule, and
	// packets arriving while go-nfqueue (which the agent used until
	// then) configured the new binding failed the bind ("mismatched
	// sequence in netlink reply"). The queue's own bind now answers
	// them (queue.TestKernelBindUnderLoad); the rule set is still first
	// put in its stopped form, where the fallback decides every new flow,
	// so that the restart sequence is the same whatever the kernel holds.
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
		return fmt.Errorf("bind NFQUEUE %v: %w", a.queueNums, err)
	case <-ctx.Done():
		return nil
	}
	log.Info("queue bound", "queues", a.queueNums, "workers", f.workers)

	watch := newConfigWatch(f.policy.configPath, log)
	defer watch.Close()
	a.reload(ctx, "start")
	a.checkConntrackTable() // the baseline of the drop counter

	for {
		interval := a.resyncInterval()
		timer := time.NewTimer(interval)
		select {
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
		case <-timer.C:
			a.reload(ctx, "resync")
			a.checkConntrackTable()
		}
	}
}

// resyncInterval is the current policy's resyncInterval, or the default
// while no policy was ever loaded.
func (a *agent) resyncInterval() time.Duration {
	if p := a.policy.Load(); p != nil {
		if d := p.Effective().ResyncInterval; d > 0 {
			return d
		}
	}
	return nat.DefaultConfig(true).ResyncInterval
}

// reload reads the config, swaps the policy when it changed, and makes
// the kernel rules match. A bad config keeps the last good policy (and
// rules); each distinct error is logged once and every failure counted.
func (a *agent) reload(ctx context.Context, why string) {
	pol, warnings, err := a.flags.policy.load()
	if err != nil {
		a.metrics.reloadFailures.Inc()
		if msg := err.Error(); msg != a.lastErr {
			a.lastErr = msg
			a.log.Error("config rejected; keeping the last good policy", "path", a.flags.policy.configPath, "err", err, "trigger", why)
		}
		if a.policy.Load() == nil {
			a.setNotReady("no valid config yet: " + err.Error())
		}
		return
	}
	a.lastErr = ""
	if w := fmt.Sprint(warnings, pol.Notes()); w != a.lastWarn {
		a.lastWarn = w
		for _, s := range warnings {
			a.log.Warn(s, "path", a.flags.policy.configPath)
		}
		for _, s := range pol.Notes() {
			a.log.Info(s)
		}
	}

	old := a.policy.Load()
	if old != nil && old.Hash() == pol.Hash() {
		if a.rulesPending {
			a.installRules(ctx, "retry")
			return
		}
		a.checkRules(ctx)
		return
	}
	cfg, err := a.flags.dataplane.rulesConfig(pol)
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
		if err := a.installer.Install(ctx, cfg); err != nil {
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
	a.policy.Store(pol)
	gen := a.generation.Add(1)
	a.driftLog = false
	a.log.Info("policy in force", "generation", gen, "hash", pol.Hash(), "prefixes", pol.Len(),
		"resyncInterval", pol.Effective().ResyncInterval.String(), "trigger", why)
	if old != nil {
		a.rulesPending = true
		a.installRules(ctx, why)
		a.reconcileConntrack(ctx, old, pol)
	}
	if !a.rulesPending {
		a.applied.Store(gen)
	}
	a.ready.Store(true)
}

// installRules writes the rule set of the policy in force; a failure is
// retried at every resync until it succeeds.
func (a *agent) installRules(ctx context.Context, why string) {
	if err := a.installer.Install(ctx, a.rulesCfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Error("installing the fallback rules of the new policy failed; the agent decides with it, the fallback keeps the old list until a retry succeeds", "err", err, "trigger", why)
		return
	}
	a.rulesPending = false
	a.applied.Store(a.generation.Load())
}

// checkRules restores the rule set when another process changed it.
func (a *agent) checkRules(ctx context.Context) {
	err := a.installer.Check(ctx, a.rulesCfg)
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
	if err := a.installer.Install(ctx, a.rulesCfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Error("restoring rules failed; will retry at the next resync", "err", err)
		return
	}
	// Restored: the next difference is a new incident, even if it comes
	// before a clean check would have reset the flag.
	a.driftLog = false
	a.metrics.rulesRestored.Inc()
}

// pauseQueue installs the rule set of the config on disk without the
// queue rule, as shutdown leaves it. Without a valid config the rules stay
// as they are: reload reports the error.
func (a *agent) pauseQueue(ctx context.Context) {
	pol, _, err := a.flags.policy.load()
	if err != nil {
		return
	}
	cfg, err := a.flags.dataplane.rulesConfig(pol)
	if err != nil {
		return
	}
	cfg.QueuePaused = true
	if err := a.installer.Install(ctx, cfg); err != nil {
		a.metrics.installErrors.Inc()
		a.log.Warn("could not take the queue rule out before binding the queue", "err", err)
	}
}

// checkConntrackTable logs, once per incident, that the kernel drops new
// flows because the conntrack table is full. The metrics say so too, but
// scraping them over the node's network needs a conntrack entry of its
// own, so while the table is full only the log gets out.
func (a *agent) checkConntrackTable() {
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

func (a *agent) setNotReady(reason string) {
	a.ready.Store(false)
	a.log.Warn("not ready", "reason", reason)
}

// shutdown stops queueing first (the rules without the queue leave every
// new flow to the fallback chain), then lets the queue answer what is in
// flight, and leaves the fallback rules so NAT stays right until the next
// agent starts.
func (a *agent) shutdown(stopQueue context.CancelFunc, queueErr <-chan error) error {
	a.ready.Store(false)
	a.log.Info("stopping: handing new flows to the kernel fallback")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if a.policy.Load() != nil {
		cfg := a.rulesCfg
		cfg.QueuePaused = true
		if err := a.installer.Install(ctx, cfg); err != nil {
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

// serveHTTP serves metrics and health on ln, bound by runAgent early so
// that a bad address fails the start before the kernel is touched.
func (a *agent) serveHTTP(ln net.Listener) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", a.metrics.handler())
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
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics server stopped", "err", err)
		}
	}()
	return srv
}

// checkBeforeKernel checks the flags runAgent has not checked yet and that
// would otherwise fail only after backend detection, sysctl writes or the
// conntrack listener: the backend name, the flow-log flags and the
// cluster ranges (flags, unlike the config file, cannot change while the
// agent retries).
func (f *agentFlags) checkBeforeKernel() error {
	if _, err := rules.ParseBackend(f.dataplane.backend); err != nil {
		return fmt.Errorf("--iptables-backend: %w", err)
	}
	if _, err := flowlog.ParseSink(f.audit.sink); err != nil {
		return fmt.Errorf("--flow-log: %w", err)
	}
	for _, n := range []struct {
		flag string
		v    int
	}{{"--flow-log-rate", f.audit.ceiling}, {"--flow-log-max-size", f.audit.maxMB}, {"--flow-log-max-files", f.audit.maxFiles}, {"--flow-log-buffer", f.audit.buffer}} {
		if n.v < 0 {
			return fmt.Errorf("%s %d: must not be negative", n.flag, n.v)
		}
	}
	for _, s := range f.policy.clusterCIDRs {
		if _, err := nat.ParseCIDR(s); err != nil {
			return fmt.Errorf("--cluster-cidr: %w", err)
		}
	}
	return nil
}
