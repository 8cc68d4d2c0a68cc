package agent

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
)

// audit turns the dataplane's events into flow records: a decision record
// per queued flow (queue.Observer), and an end or fallback record per flow
// conntrack destroys. Nothing here blocks the dataplane: the logger drops
// and counts when its buffer is full.
type audit struct {
	a       *Agent
	log     *flowlog.Logger
	ct      *conntrack.Listener
	wg      sync.WaitGroup
	skipped prometheus.Counter
}

func newAudit(a *Agent) (*audit, error) {
	lg, err := flowlog.New(a.cfg.FlowLog)
	if err != nil {
		return nil, fmt.Errorf("--flow-log: %w", err)
	}
	return &audit{
		a: a, log: lg,
		skipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_conntrack_flows_ignored_total",
			Help: "Destroyed pod flows with no decision mark (started before the rules, or to the node itself).",
		}),
	}, nil
}

// start turns conntrack accounting on and listens for destroyed flows,
// unless the flow log is off.
func (au *audit) start() error {
	if au.a.cfg.FlowLog.Sink.Kind == flowlog.SinkOff {
		return nil
	}
	log := au.a.log
	if changed, err := conntrack.EnableAccounting(0); err != nil {
		log.Warn("could not enable conntrack accounting and timestamps; end records will lack counters", "err", err)
	} else if len(changed) > 0 {
		log.Info("enabled conntrack accounting and timestamps for flow-end records", "sysctls", changed)
	}
	lg := au.log
	ct, err := conntrack.Listen(conntrack.Config{
		PodCIDRs:  au.a.cfg.Dataplane.PodCIDRs,
		OnOverrun: func() { lg.ReportLost(flowlog.ReasonKernelOverrun, flowlog.KindEnd, 1) },
		OnDrop:    func(conntrack.Event) { lg.ReportLost(flowlog.ReasonOverflow, flowlog.KindEnd, 1) },
	})
	if err != nil {
		return fmt.Errorf("conntrack events for flow-end records: %w", err)
	}
	au.ct = ct
	au.wg.Add(1)
	go func() {
		defer au.wg.Done()
		au.consume(ct.Events())
	}()
	return nil
}

// Decided implements queue.Observer: one decision record per decided flow,
// naming the policy that decided it.
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
		Pod:     au.a.pods(p.Src),
		Action:  ev.Decision.Action.String(),
		Prefix:  ev.Decision.Prefix,
		Source:  ev.Decision.Source.String(),
		Origin:  ev.Decision.Origin,
		Queue:   ev.Queue,
		Latency: ev.Latency,
	}
	if pol := ev.Policy; pol != nil {
		rec.PolicyHash = pol.Hash()
		rec.PolicyGeneration, _ = au.a.cur.Load().generationOf(pol)
	}
	au.log.Log(rec)
}

// consume writes an end record for each flow the agent decided and a
// fallback record for each the kernel fallback decided, until events is
// closed.
func (au *audit) consume(events <-chan conntrack.Event) {
	marks := au.a.cfg.Dataplane.Marks
	for ev := range events {
		if ev.Type != conntrack.EventDestroy {
			continue
		}
		f := &ev.Flow
		rec := flowlog.Record{
			Time:         f.Stop,
			Proto:        f.Proto,
			Src:          f.Orig.Src,
			Dst:          f.Orig.Dst,
			Pod:          au.a.pods(f.Orig.Src.Addr()),
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
		switch marks.Classify(f.Mark) {
		case mark.AgentMasquerade, mark.AgentPassthrough:
			rec.Kind = flowlog.KindEnd
		case mark.KernelFallback:
			rec.Kind = flowlog.KindFallback
			rec.Source = "kernel-fallback"
			if v := au.a.installed.Load(); v != nil {
				// What the fallback chain matched: it is written from
				// the installed policy, so that policy names the prefix.
				rec.Prefix = v.policy.Decide(f.Orig.Dst.Addr()).Prefix
				rec.PolicyHash = v.policy.Hash()
				rec.PolicyGeneration = v.generation
			}
		default:
			au.skipped.Inc()
			continue
		}
		au.log.Log(rec)
	}
}

// Close stops the conntrack listener and flushes the log.
func (au *audit) Close() {
	if au.ct != nil {
		au.ct.Close()
		au.wg.Wait()
	}
	au.log.Close()
}

var (
	descFlowWritten = prometheus.NewDesc("nfmasq_flowlog_records_total", "Flow records written, by kind.", []string{"kind"}, nil)
	descFlowDropped = prometheus.NewDesc("nfmasq_flowlog_dropped_total", "Flow records not written, by reason and kind (every reason but sampled is reported in a gap record).", []string{"reason", "kind"}, nil)
	descFlowErrors  = prometheus.NewDesc("nfmasq_flowlog_write_errors_total", "Failed writes to the flow log sink.", nil, nil)
	descCTOverruns  = prometheus.NewDesc("nfmasq_conntrack_event_overruns_total", "Conntrack event socket overruns (events lost in the kernel).", nil, nil)
)

// auditCollector exports the flow log's and the conntrack listener's
// counters.
type auditCollector struct{ au *audit }

func (c auditCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descFlowWritten
	ch <- descFlowDropped
	ch <- descFlowErrors
	ch <- descCTOverruns
	c.au.skipped.Describe(ch)
}

func (c auditCollector) Collect(ch chan<- prometheus.Metric) {
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
