package agent

import (
	"fmt"
	"net/netip"
	"sync"
	"time"

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
	a   *Agent
	log *flowlog.Logger
	ct  *conntrack.Listener
	// news carries conntrack's new-flow events, for nat records and the
	// NAT exporter; nil when neither is on.
	news *conntrack.Listener
	// exp, when not nil, exports NAT session events (IPFIX).
	exp     NATExporter
	wg      sync.WaitGroup
	skipped prometheus.Counter

	// unnamed carries decision records of sources no pod is known for yet
	// to namePods, which writes each once its pod is named or PodWait has
	// passed; nil when records do not wait.
	unnamed    chan flowlog.Record
	namerDone  chan struct{}
	stopNaming chan struct{}
	podWait    *prometheus.CounterVec
	closeOnce  sync.Once
}

// unnamedBuffer bounds the decision records waiting for a pod's name. Only
// the first flows of a pod kubelet has not published yet wait, so it fills
// only while the pod index has not synced; a record that finds it full is
// written unnamed at once.
const unnamedBuffer = 4096

func newAudit(a *Agent) (*audit, error) {
	lg, err := flowlog.New(a.cfg.FlowLog)
	if err != nil {
		return nil, fmt.Errorf("--flow-log: %w", err)
	}
	au := &audit{
		a: a, log: lg, exp: a.cfg.Exporter,
		skipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_conntrack_flows_ignored_total",
			Help: "Destroyed pod flows with no decision mark (started before the rules, or to the node itself).",
		}),
		podWait: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nfmasq_flowlog_pod_wait_total",
			Help: "Decision records that waited for their pod's name, by outcome: named, timeout (written unnamed after the wait), full (written unnamed at once, too many waiting).",
		}, []string{"outcome"}),
	}
	if a.pods != nil && a.cfg.PodWait > 0 {
		au.unnamed = make(chan flowlog.Record, unnamedBuffer)
		au.namerDone = make(chan struct{})
		au.stopNaming = make(chan struct{})
		go au.namePods()
	}
	return au, nil
}

// NATExporter exports the translations of masqueraded pod flows (the
// IPFIX exporter). Both calls are made on the conntrack readers'
// goroutines and must not block.
type NATExporter interface {
	// Created reports a masqueraded flow conntrack confirmed.
	Created(f *conntrack.Flow)
	// Deleted reports the end of a masqueraded flow, with its counters.
	Deleted(f *conntrack.Flow)
	// Lost reports n events lost before they reached the exporter.
	Lost(n uint64)
}

// natRecords reports whether nat records are written.
func (au *audit) natRecords() bool {
	return au.a.cfg.NatRecords && !au.log.Off()
}

// start turns conntrack accounting on and listens for destroyed flows,
// unless the flow log is off and nothing is exported; and for new flows
// when nat records or the exporter are on.
func (au *audit) start() error {
	if au.log.Off() && au.exp == nil {
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
	if !au.natRecords() && au.exp == nil {
		return nil
	}
	lost := func() {
		if au.natRecords() {
			lg.ReportLost(flowlog.ReasonKernelOverrun, flowlog.KindNat, 1)
		}
		if au.exp != nil {
			au.exp.Lost(1)
		}
	}
	news, err := conntrack.Listen(conntrack.Config{
		PodCIDRs:  au.a.cfg.Dataplane.PodCIDRs,
		NewOnly:   true,
		OnOverrun: lost,
		OnDrop: func(ev conntrack.Event) {
			if !ev.Flow.Masqueraded() {
				return // would have been no record
			}
			if au.natRecords() {
				lg.ReportLost(flowlog.ReasonOverflow, flowlog.KindNat, 1)
			}
			if au.exp != nil {
				au.exp.Lost(1)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("conntrack new-flow events for nat records: %w", err)
	}
	au.news = news
	au.wg.Add(1)
	go func() {
		defer au.wg.Done()
		au.consumeNew(news.Events())
	}()
	return nil
}

// consumeNew writes a nat record, and exports a create event, for each
// masqueraded flow the agent or the kernel fallback decided, until events
// is closed.
func (au *audit) consumeNew(events <-chan conntrack.Event) {
	marks := au.a.cfg.Dataplane.Marks
	write := au.natRecords()
	for ev := range events {
		f := &ev.Flow
		if ev.Type != conntrack.EventNew || !f.Masqueraded() {
			continue
		}
		class := marks.Classify(f.Mark)
		switch class {
		case mark.AgentMasquerade, mark.AgentPassthrough, mark.KernelFallback:
		default:
			continue // not a flow nfmasq decided
		}
		if au.exp != nil {
			au.exp.Created(f)
		}
		if !write {
			continue
		}
		rec := flowlog.Record{
			Kind:        flowlog.KindNat,
			Time:        au.a.clock.Now(),
			Proto:       f.Proto,
			Src:         f.Orig.Src,
			Dst:         f.Orig.Dst,
			Pod:         au.a.podName(f.Orig.Src.Addr()),
			Action:      nat.Masquerade.String(),
			Xlate:       f.Translated(),
			ConntrackID: f.ID,
		}
		if class == mark.KernelFallback {
			au.fallbackPolicy(&rec, f, false)
		}
		au.logNamed(rec)
	}
}

// fallbackPolicy fills in what the kernel fallback chain decided f by: it
// is written from the installed policy, so that policy names the prefix.
func (au *audit) fallbackPolicy(rec *flowlog.Record, f *conntrack.Flow, prefix bool) {
	rec.Source = "kernel-fallback"
	if v := au.a.installed.Load(); v != nil {
		if prefix {
			rec.Prefix = v.policy.Decide(f.Orig.Dst.Addr()).Prefix
		}
		rec.PolicyHash = v.policy.Hash()
		rec.PolicyGeneration = v.generation
	}
}

// logNamed writes rec, after waiting for its pod's name when no pod is
// known for its source yet and records wait (Config.PodWait).
func (au *audit) logNamed(rec flowlog.Record) {
	if rec.Pod == "" && au.unnamed != nil {
		select {
		case au.unnamed <- rec:
			return
		default:
			au.podWait.WithLabelValues("full").Inc()
		}
	}
	au.log.Log(rec)
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
		Pod:     au.a.podName(p.Src),
		Action:  ev.Decision.Action.String(),
		Prefix:  ev.Decision.Prefix,
		Source:  ev.Decision.Source.String(),
		Origin:  ev.Decision.Origin,
		Queue:   ev.Queue,
		Latency: ev.Latency,

		Held:            ev.Held,
		IdentityUnknown: ev.IdentityUnknown,
	}
	if ev.Held > 0 {
		au.a.metrics.identityWait.Observe(ev.Held.Seconds())
	}
	if pol := ev.Policy; pol != nil {
		rec.PolicyHash = pol.Hash()
		rec.PolicyGeneration, _ = au.a.cur.Load().generationOf(pol)
	}
	au.logNamed(rec)
}

// waiting is a decision record waiting for its pod's name.
type waiting struct {
	rec      flowlog.Record
	deadline time.Time
}

// namePods writes each record of au.unnamed once the pod index names its
// source, or unnamed once PodWait has passed since it arrived. It re-reads
// the index only when the index changes.
func (au *audit) namePods() {
	defer close(au.namerDone)
	clk, wait := au.a.clock, au.a.cfg.PodWait
	var pending []waiting // in arrival order, so in deadline order
	timer := clk.NewTimer(wait)
	timer.Stop()
	flush := func(named bool) {
		now := clk.Now()
		kept := pending[:0]
		for _, w := range pending {
			// Counted once handed to the log, so a count never runs
			// ahead of the records.
			if w.rec.Pod = au.a.podName(w.rec.Src.Addr()); w.rec.Pod != "" {
				au.log.Log(w.rec)
				au.podWait.WithLabelValues("named").Inc()
			} else if !named || !now.Before(w.deadline) {
				au.log.Log(w.rec)
				au.podWait.WithLabelValues("timeout").Inc()
			} else {
				kept = append(kept, w)
			}
		}
		clear(pending[len(kept):])
		pending = kept
		if len(pending) > 0 {
			timer.Reset(pending[0].deadline.Sub(now))
		}
	}
	for {
		// Taken before the lookups, so a change after them is not missed.
		changed := au.a.pods.Changed()
		select {
		case rec := <-au.unnamed:
			pending = append(pending, waiting{rec: rec, deadline: clk.Now().Add(wait)})
			flush(true)
		case <-changed:
			flush(true)
		case <-timer.C():
			flush(true)
		case <-au.stopNaming:
			for {
				select {
				case rec := <-au.unnamed:
					pending = append(pending, waiting{rec: rec})
				default:
					flush(false)
					return
				}
			}
		}
	}
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
			Pod:          au.a.podName(f.Orig.Src.Addr()),
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
			au.fallbackPolicy(&rec, f, true)
		default:
			au.skipped.Inc()
			continue
		}
		if au.exp != nil && f.Masqueraded() {
			au.exp.Deleted(f)
		}
		au.log.Log(rec)
	}
}

// Close stops the conntrack listener, writes the records still waiting
// for a pod's name (named if the index now knows it), and flushes the log.
func (au *audit) Close() {
	au.closeOnce.Do(func() {
		if au.ct != nil {
			au.ct.Close()
		}
		if au.news != nil {
			au.news.Close()
		}
		au.wg.Wait()
		if au.unnamed != nil {
			close(au.stopNaming)
			<-au.namerDone
		}
		au.log.Close()
	})
}

var (
	descFlowWritten = prometheus.NewDesc("nfmasq_flowlog_records_total", "Flow records written, by kind.", []string{"kind"}, nil)
	descFlowDropped = prometheus.NewDesc("nfmasq_flowlog_dropped_total", "Flow records not written, by reason and kind (every reason but sampled is reported in a gap record).", []string{"reason", "kind"}, nil)
	descFlowErrors  = prometheus.NewDesc("nfmasq_flowlog_write_errors_total", "Failed writes to the flow log sink.", nil, nil)
	descCTOverruns  = prometheus.NewDesc("nfmasq_conntrack_event_overruns_total", "Conntrack event socket overruns (events lost in the kernel), by socket: destroy (end and fallback records) or new (nat records and NAT export).", []string{"events"}, nil)
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
	c.au.podWait.Describe(ch)
}

func (c auditCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.au.log.Stats()
	for k := flowlog.Kind(0); k < flowlog.NumKinds; k++ {
		ch <- prometheus.MustNewConstMetric(descFlowWritten, prometheus.CounterValue, float64(s.Written[k]), k.String())
		// Every series from the start, zeros included: an alert on
		// increase() sees the first loss only if the series existed
		// before it.
		for r := flowlog.Reason(0); r < flowlog.NumReasons; r++ {
			ch <- prometheus.MustNewConstMetric(descFlowDropped, prometheus.CounterValue, float64(s.Dropped[r][k]), r.String(), k.String())
		}
	}
	ch <- prometheus.MustNewConstMetric(descFlowErrors, prometheus.CounterValue, float64(s.WriteErrors))
	if c.au.ct != nil {
		ch <- prometheus.MustNewConstMetric(descCTOverruns, prometheus.CounterValue, float64(c.au.ct.Stats().Overruns), "destroy")
	}
	if c.au.news != nil {
		ch <- prometheus.MustNewConstMetric(descCTOverruns, prometheus.CounterValue, float64(c.au.news.Stats().Overruns), "new")
	}
	c.au.skipped.Collect(ch)
	c.au.podWait.Collect(ch)
}
