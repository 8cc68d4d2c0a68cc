package main

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// Dataplane names, as they appear in the results and the report.
const (
	Agent = "agent" // nfmasq agent: NFQUEUE first packet, decision in the mark
	Chain = "chain" // kernel only: ip-masq-agent's chain, one rule per CIDR
	IPSet = "ipset" // kernel only: one rule matching an ipset hash:net
)

// dataplanes lists them in report order.
var dataplanes = []string{Agent, Chain, IPSet}

// Results is everything one run measured; the JSON file holds one.
type Results struct {
	Machine  Machine         `json:"machine"`
	Command  string          `json:"command"`
	Started  time.Time       `json:"started"`
	Seconds  float64         `json:"seconds"`
	Settings Settings        `json:"settings"`
	Samples  []Sample        `json:"samples"`
	Reloads  []Reload        `json:"reloads"`
	Polling  []PollSample    `json:"polling"`
	Variants []VariantSample `json:"variants,omitempty"`
	Who      []WhoSample     `json:"who,omitempty"`
}

// Machine describes where the numbers come from.
type Machine struct {
	Kernel       string `json:"kernel"`
	CPU          string `json:"cpu"`
	Cores        int    `json:"cores"`
	GoVersion    string `json:"goVersion"`
	Backend      string `json:"iptablesBackend"`
	ConntrackMax int    `json:"conntrackMax"`
	Commit       string `json:"commit,omitempty"`
}

// Settings are the knobs of the run.
type Settings struct {
	CIDRCounts   []int    `json:"cidrCounts"`
	Reps         int      `json:"reps"`
	Short        bool     `json:"short"`
	TrialSeconds float64  `json:"trialSeconds"`
	Tolerance    float64  `json:"searchTolerance,omitempty"` // the rate search's resolution (factor)
	MaxTrials    int      `json:"maxTrials,omitempty"`
	MinFlows     int      `json:"minFlowsPerTrial"`
	MaxFlows     int      `json:"maxFlowsPerTrial"`
	Connects     int      `json:"connects"`
	TCPSeconds   float64  `json:"tcpSeconds"`
	TCPTransfers int      `json:"tcpTransfers"`
	ReloadCIDRs  int      `json:"reloadCIDRs"`
	ReloadRate   float64  `json:"reloadFlowsPerSecond"`
	AgentArgs    []string `json:"agentArgs"`
	Seed         uint64   `json:"seed"`
	PrefixBits   [2]int   `json:"prefixBits"`
	Destination  string   `json:"destination"`
}

// Sample is one dataplane measured once at one CIDR count.
type Sample struct {
	CIDRs          int      `json:"cidrs"`          // entries in the config file
	KernelPrefixes int      `json:"kernelPrefixes"` // prefixes the kernel rules match
	Dataplane      string   `json:"dataplane"`
	Rep            int      `json:"rep"`
	SetupSeconds   float64  `json:"setupSeconds"` // agent start to ready, or rule install
	NewFlows       NewFlows `json:"newFlows"`
	TCP            TCP      `json:"tcp"`
	Connect        Connect  `json:"connect"`
	FlowLog        *FlowLog `json:"flowLog,omitempty"` // agent only
}

// NewFlows is the first-packet path: UDP packets each on a new 5-tuple.
type NewFlows struct {
	// Sustained is the highest rate (flows/s offered and achieved) at
	// which every flow arrived and none went undecided.
	Sustained float64 `json:"sustained"`
	// Max is the delivered rate when the sender does not pace itself,
	// whatever went undecided on the way (MaxTrial says how many).
	Max      float64 `json:"max"`
	MaxTrial Trial   `json:"maxTrial"`
	Trials   []Trial `json:"trials"` // the search, in order
}

// Trial is one burst of new flows.
type Trial struct {
	Offered     float64   `json:"offered"` // flows/s; 0 for unpaced
	Sent        uint64    `json:"sent"`
	Delivered   uint64    `json:"delivered"`   // counted at the remote
	Masqueraded uint64    `json:"masqueraded"` // of those, arriving from the node's address
	SendSeconds float64   `json:"sendSeconds"`
	Seconds     float64   `json:"seconds"`  // first send to last arrival
	Achieved    float64   `json:"achieved"` // sent / SendSeconds
	Rate        float64   `json:"rate"`     // delivered / Seconds
	Undecided   Undecided `json:"undecided"`
	// Logged and LogDropped (agent only) are the flow log's decision
	// records written and its records dropped, for any reason, during
	// the trial: every decided flow must have its record.
	Logged     uint64 `json:"logged,omitempty"`
	LogDropped uint64 `json:"logDropped,omitempty"`
	Pass       bool   `json:"pass"`
	Why        string `json:"why,omitempty"` // why it did not pass
}

// Undecided counts first packets that did not get the agent's decision.
// Every counter is the change over one trial.
type Undecided struct {
	// Fallback is the NFMASQ-FALLBACK chain's CONNMARK rule: every flow
	// whose first packet reached NAT without a decision mark (fail-open,
	// queue bypass, accepted unmarked by the agent).
	Fallback uint64 `json:"fallback"`
	// QueueDropped and UserDropped are the kernel's queue counters
	// (/proc/net/netfilter/nfnetlink_queue): packets dropped, not passed.
	QueueDropped uint64 `json:"queueDropped"`
	UserDropped  uint64 `json:"userDropped"`
	// Skipped (nfmasq_queue_skipped_total) and Agent
	// (nfmasq_undecided_total) are the agent's own view; both are
	// already inside Fallback.
	Skipped uint64 `json:"skipped"`
	Agent   uint64 `json:"agent"`
	// Conntrack counts the node's conntrack entries carrying the fallback
	// mark after the burst: the same flows as Fallback, counted by the
	// kernel's table instead of the rule (a cross-check).
	Conntrack uint64 `json:"conntrack"`
}

// Total is the number of flows that were not decided by the agent.
func (u Undecided) Total() uint64 { return u.Fallback + u.QueueDropped + u.UserDropped }

// TCP is the established-flow throughput: the median of a few bulk
// transfers through the node. (It was the best one, on the reasoning that
// interference only slows a transfer down; but one setting's transfers
// ran from 18 to 25 Gbit/s, also with the two ends pinned to different
// CPUs, and the best of three picked whichever outlier came up.)
type TCP struct {
	BitsPerSecond float64   `json:"bitsPerSecond"`
	Transfers     []float64 `json:"transfers"` // bits/s of each transfer
}

// Connect is the TCP connect time distribution, in microseconds.
type Connect struct {
	N        int     `json:"n"`
	Failures int     `json:"failures"`
	P50      float64 `json:"p50"`
	P90      float64 `json:"p90"`
	P99      float64 `json:"p99"`
	Max      float64 `json:"max"`
	// Quantiles holds the 0th, 0.5th, … 100th percentiles (201 values).
	Quantiles []float64 `json:"quantiles"`
}

// FlowLog is what the agent's flow log reported at the end of a sample.
type FlowLog struct {
	Written map[string]float64 `json:"written"` // by kind
	Dropped float64            `json:"dropped"`
}

// Reload is one config reload under load.
type Reload struct {
	Rep       int     `json:"rep"`
	FromCIDRs int     `json:"fromCIDRs"`
	ToCIDRs   int     `json:"toCIDRs"`
	Seconds   float64 `json:"seconds"`                  // new version published → policy generation moved
	Applied   float64 `json:"appliedSeconds,omitempty"` // → applied generation moved (kernel fallback rewritten)
	Load      Trial   `json:"load"`                     // the flows sent meanwhile
}

// PollSample is the agent measured once in one busy-polling
// configuration: its CPU time at steady rates and its connect times.
type PollSample struct {
	Variant string   `json:"variant"`
	Flags   []string `json:"flags"` // added to the benchmark's agent flags
	Rep     int      `json:"rep"`
	CPU     []CPUAt  `json:"cpu"`
	Connect Connect  `json:"connect"`
}

// VariantSample is the agent's new-flow rate measured once with extra
// flags (a variant) or with none (VariantDefaults), at 11 CIDRs; every
// variant is measured in each repetition, in rotated order, so that the
// ratio of a variant to the defaults is paired.
type VariantSample struct {
	Variant string   `json:"variant"`
	Flags   []string `json:"flags"` // added to the benchmark's agent flags
	// Baseline is the variant the ratio is taken against ("": the
	// defaults).
	Baseline string   `json:"baseline,omitempty"`
	Rep      int      `json:"rep"`
	NewFlows NewFlows `json:"newFlows"`
}

// WhoSample is nfmasq who's reader (internal/who) scanning a generated
// flow log once, on one core.
type WhoSample struct {
	Query   string  `json:"query"`
	Records int     `json:"records"`
	Seconds float64 `json:"seconds"` // CPU time of the scan
}

// VariantDefaults names the agent run without extra flags in the variant
// comparison.
const VariantDefaults = "defaults"

// CPUAt is the agent's CPU time while new flows arrive at a steady rate.
type CPUAt struct {
	Rate    float64 `json:"rate"`    // new flows/s offered (0: idle)
	Seconds float64 `json:"seconds"` // wall time measured
	Cores   float64 `json:"cores"`   // CPU seconds per second: 1 is one core busy
	Pass    bool    `json:"pass"`    // every flow arrived and was decided
	Why     string  `json:"why,omitempty"`
}

// connectStats summarises connect times.
func connectStats(d []time.Duration, failures int) Connect {
	c := Connect{N: len(d), Failures: failures}
	if len(d) == 0 {
		return c
	}
	us := make([]float64, len(d))
	for i, v := range d {
		us[i] = float64(v.Nanoseconds()) / 1e3
	}
	slices.Sort(us)
	c.P50, c.P90, c.P99, c.Max = quantile(us, 0.5), quantile(us, 0.9), quantile(us, 0.99), us[len(us)-1]
	c.Quantiles = make([]float64, 201)
	for i := range c.Quantiles {
		c.Quantiles[i] = quantile(us, float64(i)/200)
	}
	return c
}

// quantile of sorted values, nearest rank.
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// Summary is the medians of one dataplane at one CIDR count.
type Summary struct {
	CIDRs          int     `json:"cidrs"`
	Dataplane      string  `json:"dataplane"`
	Reps           int     `json:"reps"`
	KernelPrefixes int     `json:"kernelPrefixes"`
	Sustained      float64 `json:"sustained"`
	Max            float64 `json:"max"`
	MaxUndecided   float64 `json:"maxUndecided"`
	TCPBits        float64 `json:"tcpBitsPerSecond"`
	P50            float64 `json:"p50"`
	P99            float64 `json:"p99"`
	SetupSeconds   float64 `json:"setupSeconds"`
}

// summarise returns the medians per (CIDR count, dataplane), in CIDR
// count then report order.
func summarise(samples []Sample) []Summary {
	type key struct {
		cidrs int
		dp    string
	}
	groups := map[key][]Sample{}
	for _, s := range samples {
		k := key{s.CIDRs, s.Dataplane}
		groups[k] = append(groups[k], s)
	}
	var out []Summary
	for k, g := range groups {
		pick := func(f func(Sample) float64) float64 {
			v := make([]float64, len(g))
			for i, s := range g {
				v[i] = f(s)
			}
			return median(v)
		}
		out = append(out, Summary{
			CIDRs: k.cidrs, Dataplane: k.dp, Reps: len(g), KernelPrefixes: g[0].KernelPrefixes,
			Sustained:    pick(func(s Sample) float64 { return s.NewFlows.Sustained }),
			Max:          pick(func(s Sample) float64 { return s.NewFlows.Max }),
			MaxUndecided: pick(func(s Sample) float64 { return float64(s.NewFlows.MaxTrial.Undecided.Total()) }),
			TCPBits:      pick(func(s Sample) float64 { return s.TCP.BitsPerSecond }),
			P50:          pick(func(s Sample) float64 { return s.Connect.P50 }),
			P99:          pick(func(s Sample) float64 { return s.Connect.P99 }),
			SetupSeconds: pick(func(s Sample) float64 { return s.SetupSeconds }),
		})
	}
	slices.SortFunc(out, func(a, b Summary) int {
		return cmp.Or(cmp.Compare(a.CIDRs, b.CIDRs), cmp.Compare(slices.Index(dataplanes, a.Dataplane), slices.Index(dataplanes, b.Dataplane)))
	})
	return out
}

// paired returns, over the repetitions where both dataplanes were
// measured at the CIDR count, the median of f(a)/f(b) (ratio) or
// f(a)-f(b) (difference). Pairing within a repetition keeps slow drift
// of a shared machine out of the comparison. ok is false when no
// repetition has both.
func paired(samples []Sample, cidrs int, a, b string, f func(Sample) float64, diff bool) (v float64, ok bool) {
	byRep := map[int]map[string]Sample{}
	for _, s := range samples {
		if s.CIDRs != cidrs {
			continue
		}
		if byRep[s.Rep] == nil {
			byRep[s.Rep] = map[string]Sample{}
		}
		byRep[s.Rep][s.Dataplane] = s
	}
	var vals []float64
	for _, m := range byRep {
		sa, okA := m[a]
		sb, okB := m[b]
		if !okA || !okB {
			continue
		}
		if diff {
			vals = append(vals, f(sa)-f(sb))
		} else if fb := f(sb); fb > 0 {
			vals = append(vals, f(sa)/fb)
		}
	}
	if len(vals) == 0 {
		return math.NaN(), false
	}
	return median(vals), true
}

// cidrCounts returns the distinct CIDR counts of the samples, ascending.
func cidrCounts(samples []Sample) []int {
	var out []int
	for _, s := range samples {
		if !slices.Contains(out, s.CIDRs) {
			out = append(out, s.CIDRs)
		}
	}
	slices.Sort(out)
	return out
}
