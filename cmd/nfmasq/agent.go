package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/klog/v2"

	"github.com/nfmasq/nfmasq/internal/agent"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/ipfix"
	"github.com/nfmasq/nfmasq/internal/kube"
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
	scrapeAddr   string
	masqChain    string
	workers      int
	busyPoll     time.Duration
	logFormat    string
	logLevel     string
	reconcileTCP bool
	identityWait time.Duration
	masqPolicies bool
	kubeconfig   string
	flowLog      flowLogFlags
	ipfix        ipfixFlags
}

// ipfixFlags configure the IPFIX NAT event exporter.
type ipfixFlags struct {
	collector, transport string
	domain               uint32
	refresh              time.Duration
	buffer               int
}

func (f *ipfixFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.collector, "ipfix-collector", "", "export NAT session create and delete events (RFC 8158) to this IPFIX collector HOST:PORT (empty: no export)")
	fs.StringVar(&f.transport, "ipfix-transport", "udp", "IPFIX transport: udp or tcp")
	fs.Uint32Var(&f.domain, "ipfix-observation-domain", 0, "IPFIX observation domain ID (0: derived from the node name, so that every node's exporter has its own)")
	fs.DurationVar(&f.refresh, "ipfix-template-refresh", ipfix.DefaultTemplateRefresh, "how often templates are resent over UDP (a collector that starts late decodes events once it has them)")
	fs.IntVar(&f.buffer, "ipfix-buffer", ipfix.DefaultBuffer, "NAT events that may wait for the collector before events are dropped (and counted)")
}

// exporter checks the flags and starts the exporter; nil when off.
func (f *ipfixFlags) exporter(node string, log *slog.Logger) (*ipfix.Exporter, error) {
	if f.collector == "" {
		return nil, nil
	}
	if f.refresh < time.Second || f.refresh > time.Hour {
		return nil, fmt.Errorf("--ipfix-template-refresh %v: must be between 1s and 1h", f.refresh)
	}
	if f.buffer < 1 {
		return nil, fmt.Errorf("--ipfix-buffer %d: must be at least 1", f.buffer)
	}
	exp, err := ipfix.New(ipfix.Config{
		Collector: f.collector, Transport: f.transport, ObservationDomain: f.domain, Node: node,
		TemplateRefresh: f.refresh, Buffer: f.buffer, Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("--ipfix-collector/--ipfix-transport: %w", err)
	}
	return exp, nil
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
	fs.StringVar(&f.scrapeAddr, "metrics-scrape-addr", "",
		"also serve /metrics (only) on this address, for a cluster's Prometheus: the node's address, e.g. $(HOST_IP):9741 from the downward API (docs/reliability.md)")
	fs.StringVar(&f.masqChain, "ip-masq-agent-chain", rules.DefaultIPMasqAgentChain,
		"ip-masq-agent's nat chain (its --masq-chain), looked for at start and every resync: installed beside nfmasq it masquerades too, which is logged and exported as nfmasq_ip_masq_agent_chain (\"\" does not look)")
	fs.IntVar(&f.workers, "workers", 0, "decision workers per queue (0: decide on each queue's receive goroutine)")
	fs.DurationVar(&f.busyPoll, "busy-poll", queue.DefaultBusyPoll,
		"longest a queue's reader polls for the next packet before it sleeps (adaptive; 0 never polls): "+
			"polling spares the reader a wake-up per run of packets (tens of µs on a VM); longer windows (50us) also cut first-packet latency, "+
			"for up to a third of a core more CPU at 20k-50k new flows/s (docs/benchmarks.md)")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&f.reconcileTCP, "reconcile-tcp", false,
		"on a policy change also delete the conntrack entries of TCP flows whose decision changed (breaks those connections); UDP and ICMP are always re-decided")
	fs.DurationVar(&f.identityWait, "identity-wait", DefaultIdentityWait,
		"while MasqueradePolicies exist, how long the first packet from a pod address the agent does not know yet waits for the pod's identity before the node policy decides it (0: never waits)")
	fs.BoolVar(&f.masqPolicies, "masquerade-policies", true,
		"apply MasqueradePolicies (masqueradepolicies.nfmasq.io) to the pods of this node; needs the API (NODE_NAME and a service account or --kubeconfig)")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "",
		"kubeconfig for running outside a cluster (pod CIDR discovery, pod names in flow records); in a cluster the service account is used")
	f.flowLog.register(fs)
	f.ipfix.register(fs)
	return cmd
}

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

// DefaultIdentityWait is --identity-wait's default. A pod's address
// reaches the agent's informer when kubelet reports it, after the pod's
// sandbox is up: on a real kubelet the first packets of pods that send at
// container start waited 17-25 ms (TestNode, docs/masquerade-policy.md).
// A second is about 50 times that, room for a loaded node, and bounds what
// a pod the agent never learns of pays.
const DefaultIdentityWait = time.Second

// workloadsStartWait bounds the agent's wait at start for the first list
// of MasqueradePolicies (agent.Config.WorkloadsStartWait).
const workloadsStartWait = 10 * time.Second

// startupError marks errors that come from flags: the agent refuses to
// start (exit 2).
func startupError(err error) error { return &exitError{code: exitConfig, err: err} }

// runAgent turns the flags into an agent.Config, discovering the pod CIDRs
// from the Node when no --pod-cidr is given, and runs the agent. Every
// flag is checked before anything touches the kernel: a typo must not
// leave a node half-configured by an agent that then refuses to start.
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
	client, dyn, err := kube.OptionalClients(f.kubeconfig)
	if err != nil {
		return startupError(err)
	}
	if f.identityWait < 0 || f.identityWait > time.Minute {
		return startupError(fmt.Errorf("--identity-wait %v: must be between 0 and 1m", f.identityWait))
	}
	if len(f.dataplane.podCIDRs) == 0 {
		if client == nil {
			return startupError(errors.New("no --pod-cidr given, and neither running in a cluster nor given --kubeconfig to read the node's spec.podCIDRs"))
		}
		prefixes, err := kube.NodePodCIDRs(ctx, client, os.Getenv("NODE_NAME"))
		if err != nil {
			return startupError(fmt.Errorf("no --pod-cidr given: %w", err))
		}
		for _, p := range prefixes {
			f.dataplane.podCIDRs = append(f.dataplane.podCIDRs, p.String())
		}
		log.Info("pod CIDRs from the node object", "podCIDRs", f.dataplane.podCIDRs)
	}
	if f.dataplane.queues == 0 {
		return startupError(errors.New("--queues 0: need at least one queue"))
	}
	if int(f.dataplane.queueNum)+int(f.dataplane.queues)-1 > 65535 {
		return startupError(fmt.Errorf("--queue-num %d with --queues %d runs past queue 65535", f.dataplane.queueNum, f.dataplane.queues))
	}
	// Check the dataplane flags with a stand-in policy: a bad --mark-mask
	// or --pod-cidr must stop the start, not a reload.
	probe, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(true), EnableIPv6: f.policy.enableIPv6})
	if err != nil {
		return startupError(err)
	}
	dp, err := f.dataplane.dataplane()
	if err != nil {
		return startupError(err)
	}
	if _, err := dp.RulesConfig(probe); err != nil {
		return startupError(err)
	}
	backend, err := rules.ParseBackend(f.dataplane.backend)
	if err != nil {
		return startupError(fmt.Errorf("--iptables-backend: %w", err))
	}
	flowLog, err := f.flowLog.options()
	if err != nil {
		return startupError(err)
	}
	for _, s := range f.policy.clusterCIDRs {
		if _, err := nat.ParseCIDR(s); err != nil {
			return startupError(fmt.Errorf("--cluster-cidr: %w", err))
		}
	}
	exp, err := f.ipfix.exporter(flowLog.Node, log)
	if err != nil {
		return startupError(err)
	}
	if exp != nil {
		klog.SetSlogLogger(log) // go-ipfix logs through klog
		defer exp.Close()
	}
	var metricsLn net.Listener
	if f.metricsAddr != "" {
		if metricsLn, err = net.Listen("tcp", f.metricsAddr); err != nil {
			return startupError(fmt.Errorf("--metrics-addr: %w", err))
		}
		defer metricsLn.Close() // after a start-up failure; the agent's server closes it otherwise
	}
	var scrapeLn net.Listener
	if f.scrapeAddr != "" {
		if scrapeLn, err = net.Listen("tcp", f.scrapeAddr); err != nil {
			return startupError(fmt.Errorf("--metrics-scrape-addr: %w", err))
		}
		defer scrapeLn.Close()
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()
	var deps agent.Deps
	idx := kube.StartPodIndex(ctx, client, os.Getenv("NODE_NAME"), log)
	if idx != nil {
		deps.Pods = idx
	}
	var startWait time.Duration
	if f.masqPolicies {
		clusterCIDRs, err := parsePrefixes(f.policy.clusterCIDRs)
		if err != nil {
			return startupError(fmt.Errorf("--cluster-cidr: %w", err))
		}
		w, served := kube.StartMasqueradeWatcher(ctx, client, dyn, idx, kube.MasqueradeOptions{
			PodCIDRs: dp.PodCIDRs, ClusterCIDRs: clusterCIDRs, Node: os.Getenv("NODE_NAME"), Logger: log,
		})
		if w != nil {
			deps.Workloads = w
		}
		if served {
			startWait = workloadsStartWait
		}
	}
	a, err := agent.New(agent.Config{
		Source:             f.policy.source(),
		Dataplane:          dp,
		Backend:            backend,
		Workers:            f.workers,
		BusyPoll:           f.busyPoll,
		ReconcileTCP:       f.reconcileTCP,
		IPMasqAgentChain:   f.masqChain,
		FlowLog:            flowLog,
		PodWait:            f.flowLog.podWait,
		IdentityWait:       f.identityWait,
		WorkloadsStartWait: startWait,
		NatRecords:         f.flowLog.nat,
		Exporter:           natExporter(exp),
		Metrics:            metricsLn,
		Scrape:             scrapeLn,
		Logger:             log,
	}, deps)
	if err == nil {
		err = a.Run(ctx)
	}
	if se := (*agent.StartupError)(nil); errors.As(err, &se) {
		return startupError(se.Err)
	}
	return err
}

// natExporter keeps a nil *ipfix.Exporter from becoming a non-nil interface.
func natExporter(e *ipfix.Exporter) agent.NATExporter {
	if e == nil {
		return nil
	}
	return e
}

// flowLogFlags configure the flow log.
type flowLogFlags struct {
	sink     string
	node     string
	sample   uint32
	ceiling  int
	maxMB    int
	maxFiles int
	buffer   int
	podWait  time.Duration
	nat      bool
	compress bool
}

func (f *flowLogFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.sink, "flow-log", "stdout", "where flow records go: stdout, file:PATH (rotated by size) or off")
	fs.StringVar(&f.node, "flow-log-node", "", "node name written in every record (default: $NODE_NAME, else the host name)")
	fs.Uint32Var(&f.sample, "flow-log-sample", 1, "keep one decision record in N (end, fallback and gap records are never sampled)")
	fs.IntVar(&f.ceiling, "flow-log-rate", 0, "at most this many records per second reach the log (0: no ceiling); the excess is counted and reported in gap records")
	fs.IntVar(&f.maxMB, "flow-log-max-size", flowlog.DefaultMaxFileMB, "size in MB at which a file flow log rotates")
	fs.IntVar(&f.maxFiles, "flow-log-max-files", flowlog.DefaultMaxFiles, "rotated flow log files kept")
	fs.IntVar(&f.buffer, "flow-log-buffer", flowlog.DefaultBuffer, "records that may wait for a slow sink before records are dropped (and a gap record written)")
	fs.DurationVar(&f.podWait, "flow-log-pod-wait", 2*time.Second,
		"longest a decision record waits for its pod's name when kubelet has not published the new pod's address yet (0: write it unnamed at once); the verdict never waits")
	fs.BoolVar(&f.nat, "flow-log-nat", false,
		"write a nat record with the translated source address and port when a masqueraded flow starts, so that nfmasq who attributes flows still open; "+
			"costs about 30% of the peak new-flow rate (docs/benchmarks.md)")
	fs.BoolVar(&f.compress, "flow-log-compress", false, "gzip rotated flow log files (nfmasq who reads them)")
}

// options checks the flags and returns the flow log's options.
func (f *flowLogFlags) options() (flowlog.Options, error) {
	sink, err := flowlog.ParseSink(f.sink)
	if err != nil {
		return flowlog.Options{}, fmt.Errorf("--flow-log: %w", err)
	}
	for _, n := range []struct {
		flag string
		v    int
	}{{"--flow-log-rate", f.ceiling}, {"--flow-log-max-size", f.maxMB}, {"--flow-log-max-files", f.maxFiles}, {"--flow-log-buffer", f.buffer}} {
		if n.v < 0 {
			return flowlog.Options{}, fmt.Errorf("%s %d: must not be negative", n.flag, n.v)
		}
	}
	if f.podWait < 0 || f.podWait > time.Minute {
		return flowlog.Options{}, fmt.Errorf("--flow-log-pod-wait %v: must be between 0 and 1m", f.podWait)
	}
	node := f.node
	if node == "" {
		node = os.Getenv("NODE_NAME")
	}
	if node == "" {
		node, _ = os.Hostname()
	}
	return flowlog.Options{
		Sink: sink, Node: node, Sample: f.sample, Ceiling: f.ceiling,
		MaxFileMB: f.maxMB, MaxFiles: f.maxFiles, Buffer: f.buffer, Compress: f.compress,
	}, nil
}

// parsePrefixes parses CIDR flag values.
func parsePrefixes(ss []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ss))
	for _, s := range ss {
		p, err := nat.ParseCIDR(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
