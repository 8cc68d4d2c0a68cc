package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
)

// auditFlags configure the flow log.
type auditFlags struct {
	sink     string
	node     string
	sample   uint32
	ceiling  int
	maxMB    int
	maxFiles int
	buffer   int
}

func (f *auditFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.sink, "flow-log", "stdout", "where flow records go: stdout, file:PATH (rotated by size) or off")
	fs.StringVar(&f.node, "flow-log-node", "", "node name written in every record (default: $NODE_NAME, else the host name)")
	fs.Uint32Var(&f.sample, "flow-log-sample", 1, "keep one decision record in N (end, fallback and gap records are never sampled)")
	fs.IntVar(&f.ceiling, "flow-log-rate", 0, "at most this many records per second reach the log (0: no ceiling); the excess is counted and reported in gap records")
	fs.IntVar(&f.maxMB, "flow-log-max-size", flowlog.DefaultMaxFileMB, "size in MB at which a file flow log rotates")
	fs.IntVar(&f.maxFiles, "flow-log-max-files", flowlog.DefaultMaxFiles, "rotated flow log files kept")
	fs.IntVar(&f.buffer, "flow-log-buffer", flowlog.DefaultBuffer, "records that may wait for a slow sink before records are dropped (and a gap record written)")
}

// audit turns the dataplane's events into flow records: a decision record
// per queued flow (queue.Observer), and an end or fallback record per flow
// conntrack destroys. Nothing here blocks the dataplane: the logger drops
// and counts when its buffer is full.
type audit struct {
	a       *agent
	log     *flowlog.Logger
	ct      *conntrack.Listener
	marks   mark.Layout
	pods    podLookup
	wg      sync.WaitGroup
	skipped prometheus.Counter
}

// podLookup maps a pod address to "namespace/name"; the default knows none.
type podLookup func(netip.Addr) string

func newAudit(ctx context.Context, a *agent, f *auditFlags, pods podLookup) (*audit, error) {
	if pods == nil {
		pods = func(netip.Addr) string { return "" }
	}
	sink, err := flowlog.ParseSink(f.sink)
	if err != nil {
		return nil, fmt.Errorf("--flow-log: %w", err)
	}
	node := f.node
	if node == "" {
		node = os.Getenv("NODE_NAME")
	}
	if node == "" {
		node, _ = os.Hostname()
	}
	lg, err := flowlog.New(flowlog.Options{
		Sink: sink, Node: node, Sample: f.sample, Ceiling: f.ceiling,
		MaxFileMB: f.maxMB, MaxFiles: f.maxFiles, Buffer: f.buffer,
	})
	if err != nil {
		return nil, fmt.Errorf("--flow-log: %w", err)
	}
	// The mark layout comes from --mark-mask alone, not from a rules
	// config: that needs a policy, and a stand-in one without IPv6 fails
	// on dual-stack nodes, leaving a zero layout that calls every flow
	// undecided (no end or fallback record at all).
	m, err := mark.Parse(a.flags.dataplane.markMask)
	if err != nil {
		lg.Close()
		return nil, fmt.Errorf("--mark-mask: %w", err)
	}
	au := &audit{
		a: a, log: lg,
		marks: mark.Layout{Mask: m.Mask, Masquerade: m.Masquerade, Passthrough: m.Passthrough, Fallback: m.Fallback},
		pods:  pods,
		skipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_conntrack_flows_ignored_total",
			Help: "Destroyed pod flows with no decision mark (started before the rules, or to the node itself).",
		}),
	}
	if sink.Kind == flowlog.SinkOff {
		return au, nil
	}
	if changed, err := conntrack.EnableAccounting(0); err != nil {
		a.log.Warn("could not enable conntrack accounting and timestamps; end records will lack counters", "err", err)
	} else if len(changed) > 0 {
		a.log.Info("enabled conntrack accounting and timestamps for flow-end records", "sysctls", changed)
	}
	ct, err := conntrack.Listen(conntrack.Config{
		PodCIDRs:  a.podCIDRs,
		OnOverrun: func() { lg.ReportLost(flowlog.ReasonKernelOverrun, flowlog.KindEnd, 1) },
		OnDrop:    func(conntrack.Event) { lg.ReportLost(flowlog.ReasonOverflow, flowlog.KindEnd, 1) },
	})
	if err != nil {
		lg.Close()
		return nil, fmt.Errorf("conntrack events for flow-end records: %w", err)
	}
	au.ct = ct
	au.wg.Add(1)
	go au.consumeConntrack()
	return au, nil
}

// Decided implements queue.Observer: one decision record per decided flow.
func (au *audit) Decided(ev *queue.Event) {
	au.a.metrics.latency.Observe(ev.Latency.Seconds())
	if ev.Outcome != queue.Decided {
		return // accepted unmarked: the fallback decides, conntrack reports it
	}
	p := &ev.Packet
	rec := flowlog.Record{
		Kind:    flowlog.KindDecision,
		Time:    ev.Time,
		Proto:   uint8(p.Proto),
		Src:     netip.AddrPortFrom(p.Src, p.SrcPort),
		Dst:     netip.AddrPortFrom(p.Dst, p.DstPort),
		Pod:     au.pods(p.Src),
		Action:  ev.Decision.Action.String(),
		Prefix:  ev.Decision.Prefix,
		Source:  ev.Decision.Source.String(),
		Origin:  ev.Decision.Origin,
		Queue:   ev.Queue,
		Latency: ev.Latency,
	}
	if pol := au.a.policy.Load(); pol != nil {
		rec.PolicyHash = pol.Hash()
		rec.PolicyGeneration = au.a.generation.Load()
	}
	au.log.Log(rec)
}

// consumeConntrack writes an end record for each flow the agent decided
// and a fallback record for each the kernel fallback decided.
func (au *audit) consumeConntrack() {
	defer au.wg.Done()
	for ev := range au.ct.Events() {
		if ev.Type != conntrack.EventDestroy {
			continue
		}
		f := &ev.Flow
		rec := flowlog.Record{
			Time:         f.Stop,
			Proto:        f.Proto,
			Src:          f.Orig.Src,
			Dst:          f.Orig.Dst,
			Pod:          au.pods(f.Orig.Src.Addr()),
			Accounted:    f.Accounted,
			PacketsOrig:  f.OrigCounters.Packets,
			BytesOrig:    f.OrigCounters.Bytes,
			PacketsReply: f.ReplyCounters.Packets,
			BytesReply:   f.ReplyCounters.Bytes,
			Start:        f.Start,
			ConntrackID:  f.ID,
		}
		if !f.Start.IsZero() && !f.Stop.IsZero() {
			rec.Duration = f.Stop.Sub(f.Start)
		}
		rec.Action = nat.Passthrough.String()
		if f.Masqueraded() {
			rec.Action = nat.Masquerade.String()
			rec.Xlate = f.Translated()
		}
		switch au.marks.Classify(f.Mark) {
		case mark.AgentMasquerade, mark.AgentPassthrough:
			rec.Kind = flowlog.KindEnd
		case mark.KernelFallback:
			rec.Kind = flowlog.KindFallback
			rec.Source = "kernel-fallback"
			if pol := au.a.policy.Load(); pol != nil {
				// What the fallback chain matched: it is written from
				// the same policy, so the policy names the prefix.
				d := pol.Decide(f.Orig.Dst.Addr())
				rec.Prefix = d.Prefix
				rec.PolicyHash = pol.Hash()
				rec.PolicyGeneration = au.a.generation.Load()
			}
		default:
			au.skipped.Inc()
			continue
		}
		au.log.Log(rec)
	}
}

// collector exports the flow log's and the conntrack listener's counters.
func (au *audit) collector() prometheus.Collector { return &auditCollector{au: au} }

var (
	descFlowWritten = prometheus.NewDesc("nfmasq_flowlog_records_total", "Flow records written, by kind.", []string{"kind"}, nil)
	descFlowDropped = prometheus.NewDesc("nfmasq_flowlog_dropped_total", "Flow records not written, by reason and kind (every reason but sampled is reported in a gap record).", []string{"reason", "kind"}, nil)
	descFlowErrors  = prometheus.NewDesc("nfmasq_flowlog_write_errors_total", "Failed writes to the flow log sink.", nil, nil)
	descCTOverruns  = prometheus.NewDesc("nfmasq_conntrack_event_overruns_total", "Conntrack event socket overruns (events lost in the kernel).", nil, nil)
)

type auditCollector struct{ au *audit }

func (c *auditCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descFlowWritten
	ch <- descFlowDropped
	ch <- descFlowErrors
	ch <- descCTOverruns
	c.au.skipped.Describe(ch)
}

func (c *auditCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.au.log.Stats()
	for k := flowlog.Kind(0); k < flowlog.NumKinds; k++ {
		ch <- prometheus.MustNewConstMetric(descFlowWritten, prometheus.CounterValue, float64(s.Written[k]), k.String())
		for r := flowlog.Reason(0); r < flowlog.NumReasons; r++ {
			if v := s.Dropped[r][k]; v > 0 {
				ch <- prometheus.MustNewConstMetric(descFlowDropped, prometheus.CounterValue, float64(v), r.String(), k.String())
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(descFlowErrors, prometheus.CounterValue, float64(s.WriteErrors))
	if c.au.ct != nil {
		ch <- prometheus.MustNewConstMetric(descCTOverruns, prometheus.CounterValue, float64(c.au.ct.Stats().Overruns))
	}
	c.au.skipped.Collect(ch)
}

// Close stops the conntrack listener and flushes the log.
func (au *audit) Close() {
	if au.ct != nil {
		au.ct.Close()
		au.wg.Wait()
	}
	au.log.Close()
}

// reconcileConntrack deletes the conntrack entries of pod flows whose
// decision the new policy changes, so their next packet is decided again
// (kube-proxy does the same for stale UDP entries). TCP entries are left
// alone unless --reconcile-tcp: deleting a masqueraded connection's entry
// breaks it.
func (a *agent) reconcileConntrack(ctx context.Context, old, cur *nat.Policy) {
	protos := []uint8{17, 1, 58, 136} // UDP, ICMP, ICMPv6, UDP-Lite
	if a.flags.reconcileTCP {
		protos = append(protos, 6, 132) // TCP, SCTP
	}
	n, err := conntrack.DeleteStale(ctx, 0, func(f conntrack.Flow) bool {
		src := f.Orig.Src.Addr()
		if !conntrack.InPrefixes(a.podCIDRs, src) {
			return false
		}
		dst := f.Orig.Dst.Addr()
		return old.Decide(dst).Action != cur.Decide(dst).Action
	}, protos)
	if err != nil {
		a.log.Warn("could not re-decide flows after the policy change", "err", err)
		return
	}
	if n > 0 {
		a.log.Info("deleted conntrack entries of flows whose decision changed", "entries", n, "tcp", a.flags.reconcileTCP)
	}
}
