package agent

import (
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// metrics holds what the control loop and the audit path update
// directly; everything the queue already counts is read at scrape time,
// so the hot path updates no metric of its own but the latency histogram.
type metrics struct {
	reg            *prometheus.Registry
	reloadFailures prometheus.Counter
	installErrors  prometheus.Counter
	rulesRestored  prometheus.Counter
	latency        prometheus.Histogram
	identityWait   prometheus.Histogram
}

func newMetrics(a *Agent) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		reg: reg,
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_config_reload_failures_total",
			Help: "Config loads that failed; the last good policy stayed in force.",
		}),
		installErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_rules_install_errors_total",
			Help: "Failed attempts to install the iptables/ipset rule set.",
		}),
		rulesRestored: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nfmasq_rules_restored_total",
			Help: "Times the rule set was found changed by another process and restored.",
		}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nfmasq_decision_latency_seconds",
			Help:    "Time from a packet's arrival in user space to its verdict.",
			Buckets: []float64{1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3},
		}),
		identityWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nfmasq_identity_wait_seconds",
			Help:    "How long first packets from a pod not known yet waited for its identity (MasqueradePolicies), until known or --identity-wait ran out.",
			Buckets: []float64{1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5},
		}),
	}
	reg.MustRegister(m.reloadFailures, m.installErrors, m.rulesRestored, m.latency, m.identityWait, workloadCollector{a},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		policyCollector{a}, conntrackTableCollector{}, auditCollector{a.audit})
	if c, ok := a.cfg.Exporter.(prometheus.Collector); ok {
		reg.MustRegister(c)
	}
	return m
}

// registerQueue adds the queue's counters, once the queue exists.
func (m *metrics) registerQueue(q *queue.Queue) { m.reg.MustRegister(queueCollector{q}) }

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

var (
	descPackets   = prometheus.NewDesc("nfmasq_queue_packets_total", "Packets received from NFQUEUE (first packets of pod flows).", nil, nil)
	descDecisions = prometheus.NewDesc("nfmasq_decisions_total", "Flows decided by the agent, by action.", []string{"action"}, nil)
	descUndecided = prometheus.NewDesc("nfmasq_undecided_total", "Queued packets accepted without a decision (left to the kernel fallback), by reason.", []string{"reason"}, nil)
	descMalformed = prometheus.NewDesc("nfmasq_malformed_packets_total", "Queued packets that did not decode, by decoder status.", []string{"status"}, nil)
	descPanics    = prometheus.NewDesc("nfmasq_worker_panics_total", "Panics recovered while handling a packet (the packet was still answered).", nil, nil)
	descVerdErr   = prometheus.NewDesc("nfmasq_verdict_errors_total", "Verdicts that could not be sent.", nil, nil)
	descSkipped   = prometheus.NewDesc("nfmasq_queue_skipped_total", "Packet ids that never reached the agent (socket overflow; with fail-open the kernel fallback decided them).", nil, nil)
	descNetlink   = prometheus.NewDesc("nfmasq_netlink_errors_total", "Netlink receive errors, by errno.", []string{"errno"}, nil)
	descHeld      = prometheus.NewDesc("nfmasq_identity_held_total", "First packets held for their pod's identity (a pod-range source no known pod has, while MasqueradePolicies exist).", nil, nil)
	descExpired   = prometheus.NewDesc("nfmasq_identity_expired_total", "Held packets decided without their pod's identity when --identity-wait ran out (the node policy decided).", nil, nil)
	descOverflow  = prometheus.NewDesc("nfmasq_identity_hold_overflow_total", "Packets decided at once, without their pod's identity, because the hold was full.", nil, nil)
	descHolding   = prometheus.NewDesc("nfmasq_identity_holding", "Packets waiting for their pod's identity now.", nil, nil)
	descProc      = prometheus.NewDesc("nfmasq_nfqueue_kernel", "Kernel counters of each bound queue from "+queue.ProcStatsPath+".", []string{"queue", "counter"}, nil)
)

// queueCollector reads the queue's counters and the kernel's at scrape time.
type queueCollector struct{ q *queue.Queue }

func (c queueCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descDecisions, descUndecided, descMalformed, descPanics, descVerdErr, descSkipped, descNetlink, descProc, descHeld, descExpired, descOverflow, descHolding} {
		ch <- d
	}
}

func (c queueCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.q.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(descPackets, s.Packets)
	counter(descDecisions, s.Masquerade, nat.Masquerade.String())
	counter(descDecisions, s.Passthrough, nat.Passthrough.String())
	for o := queue.Outcome(1); o < queue.NumOutcomes; o++ {
		counter(descUndecided, s.Undecided[o], o.String())
	}
	for st := packet.Status(0); st < packet.NumStatus; st++ {
		if s.Malformed[st] > 0 {
			counter(descMalformed, s.Malformed[st], st.String())
		}
	}
	counter(descPanics, s.Panics)
	counter(descVerdErr, s.VerdictErrors)
	counter(descSkipped, s.Skipped)
	counter(descNetlink, s.NetlinkENOBUFS, "ENOBUFS")
	counter(descNetlink, s.NetlinkENOENT, "ENOENT")
	counter(descNetlink, s.NetlinkOther, "other")
	counter(descHeld, s.Held)
	counter(descExpired, s.HeldExpired)
	counter(descOverflow, s.HeldOverflow)
	ch <- prometheus.MustNewConstMetric(descHolding, prometheus.GaugeValue, float64(s.Holding))

	stats, err := c.q.ProcStats()
	if err != nil {
		return // not bound yet
	}
	for _, p := range stats {
		q := strconv.FormatUint(uint64(p.QueueNum), 10)
		for _, kv := range []struct {
			name string
			v    uint32
		}{{"queue_total", p.QueueTotal}, {"queue_dropped", p.QueueDropped}, {"user_dropped", p.UserDropped}, {"id_sequence", p.IDSequence}} {
			ch <- prometheus.MustNewConstMetric(descProc, prometheus.GaugeValue, float64(kv.v), q, kv.name)
		}
	}
}

var (
	descGeneration = prometheus.NewDesc("nfmasq_policy_generation", "Policies put in force since start (1 after the first load).", nil, nil)
	descApplied    = prometheus.NewDesc("nfmasq_policy_applied_generation", "The policy generation whose fallback rules are installed and whose changed flows were re-decided.", nil, nil)
	descPolicy     = prometheus.NewDesc("nfmasq_policy_info", "The policy in force: its hash (1 while in force).", []string{"hash"}, nil)
	descPrefixes   = prometheus.NewDesc("nfmasq_policy_prefixes", "Non-masquerade prefixes in the policy in force.", nil, nil)
	descReady      = prometheus.NewDesc("nfmasq_ready", "1 when rules are installed and the queue is bound.", nil, nil)
	descForeign    = prometheus.NewDesc("nfmasq_ip_masq_agent_chain", "1 when ip-masq-agent's nat chain and its POSTROUTING jump are installed beside nfmasq (both masquerade), checked at every resync.", nil, nil)
)

type policyCollector struct{ a *Agent }

func (c policyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descGeneration
	ch <- descApplied
	ch <- descPolicy
	ch <- descPrefixes
	ch <- descReady
	ch <- descForeign
}

func (c policyCollector) Collect(ch chan<- prometheus.Metric) {
	var gen uint64
	if v := c.a.cur.Load(); v != nil {
		gen = v.generation
		ch <- prometheus.MustNewConstMetric(descPolicy, prometheus.GaugeValue, 1, v.policy.Hash())
		ch <- prometheus.MustNewConstMetric(descPrefixes, prometheus.GaugeValue, float64(v.policy.Len()))
	}
	ch <- prometheus.MustNewConstMetric(descGeneration, prometheus.GaugeValue, float64(gen))
	ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(c.a.applied.Load()))
	ready := 0.0
	if c.a.ready.Load() {
		ready = 1
	}
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, ready)
	foreign := 0.0
	if c.a.foreign.Load() {
		foreign = 1
	}
	ch <- prometheus.MustNewConstMetric(descForeign, prometheus.GaugeValue, foreign)
}

var (
	descCTEntries = prometheus.NewDesc("nfmasq_conntrack_entries", "Entries in the conntrack table of the agent's network namespace.", nil, nil)
	descCTMax     = prometheus.NewDesc("nfmasq_conntrack_max", "nf_conntrack_max: the table size beyond which new flows are dropped.", nil, nil)
	descCTDrops   = prometheus.NewDesc("nfmasq_conntrack_drops_total",
		"Conntrack failures from "+procConntrackStat+", summed over CPUs, by counter: drop (a new flow dropped, table full), early_drop (an unassured entry evicted to make room), insert_failed.",
		[]string{"counter"}, nil)
)

// conntrackDropCounters are the columns of procConntrackStat exported.
var conntrackDropCounters = []string{"drop", "early_drop", "insert_failed"}

type conntrackTableCollector struct{}

func (conntrackTableCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCTEntries
	ch <- descCTMax
	ch <- descCTDrops
}

func (conntrackTableCollector) Collect(ch chan<- prometheus.Metric) {
	for _, g := range []struct {
		d    *prometheus.Desc
		path string
	}{{descCTEntries, procConntrackCount}, {descCTMax, procConntrackMax}} {
		b, err := os.ReadFile(g.path)
		if err != nil {
			continue // no conntrack in this kernel or namespace
		}
		if v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			ch <- prometheus.MustNewConstMetric(g.d, prometheus.GaugeValue, float64(v))
		}
	}
	f, err := os.Open(procConntrackStat)
	if err != nil {
		return
	}
	defer f.Close()
	sums, err := readConntrackStat(f)
	if err != nil {
		return
	}
	for _, name := range conntrackDropCounters {
		if v, ok := sums[name]; ok {
			ch <- prometheus.MustNewConstMetric(descCTDrops, prometheus.CounterValue, float64(v), name)
		}
	}
}

var (
	descMPPods     = prometheus.NewDesc("nfmasq_masquerade_policy_pods", "Pods of this node known to the MasqueradePolicy decisions, by whether any policy selects them.", []string{"selected"}, nil)
	descMPSets     = prometheus.NewDesc("nfmasq_masquerade_policy_sets", "Distinct sets of MasqueradePolicies selecting this node's pods (each one compiled table and one group of fallback ipsets).", nil, nil)
	descMPPolicies = prometheus.NewDesc("nfmasq_masquerade_policies", "MasqueradePolicies in the cluster, by whether they are valid (invalid ones are skipped; see their Valid condition).", []string{"valid"}, nil)
)

// PolicyCounter is a WorkloadSource that counts the policies it compiled.
type PolicyCounter interface {
	PolicyCounts() (valid, invalid int)
}

// workloadCollector reads the per-pod decisions at scrape time.
type workloadCollector struct{ a *Agent }

func (c workloadCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descMPPods
	ch <- descMPSets
	ch <- descMPPolicies
}

func (c workloadCollector) Collect(ch chan<- prometheus.Metric) {
	wl := c.a.workloads()
	if wl == nil {
		return
	}
	selected := 0
	wl.Each(func(_ netip.Addr, s *nat.PolicySet) {
		if s != nil {
			selected++
		}
	})
	ch <- prometheus.MustNewConstMetric(descMPPods, prometheus.GaugeValue, float64(selected), "true")
	ch <- prometheus.MustNewConstMetric(descMPPods, prometheus.GaugeValue, float64(wl.Len()-selected), "false")
	ch <- prometheus.MustNewConstMetric(descMPSets, prometheus.GaugeValue, float64(wl.Sets()))
	if pc, ok := c.a.wl.(PolicyCounter); ok {
		valid, invalid := pc.PolicyCounts()
		ch <- prometheus.MustNewConstMetric(descMPPolicies, prometheus.GaugeValue, float64(valid), "true")
		ch <- prometheus.MustNewConstMetric(descMPPolicies, prometheus.GaugeValue, float64(invalid), "false")
	}
}
