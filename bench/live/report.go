package main

import (
	"fmt"
	"math"
	"path"
	"slices"
	"strings"
)

// Targets of issue 5, as ratios and bounds.
const (
	targetVsIPSet     = 0.8  // agent new flows/s ≥ 0.8 × ipset, 0 undecided
	targetVsChain     = 3.0  // agent new flows/s ≥ 3 × chain …
	targetVsChainAt   = 5000 // … at 5,000 CIDRs
	targetTCP         = 0.97 // established TCP ≥ 0.97 × kernel only
	targetAddedP50    = 30.0 // µs
	targetAddedP99    = 150.0
	targetReloadSecs  = 0.2
	targetReloadCIDRs = 100000
)

// target is one line of the targets table.
type target struct {
	What, Scope, Measured string
	Met                   *bool // nil: not measured in this run
}

func (t target) status() string {
	switch {
	case t.Met == nil:
		return "not measured"
	case *t.Met:
		return "**met**"
	default:
		return "**missed**"
	}
}

func boolp(b bool) *bool { return &b }

// targets evaluates every target the results can speak to. Ratios and
// differences are medians over repetitions of the same-repetition pair.
func targets(r *Results) []target {
	var out []target
	sustained := func(s Sample) float64 { return s.NewFlows.Sustained }
	tcp := func(s Sample) float64 { return s.TCP.BitsPerSecond }
	p50 := func(s Sample) float64 { return s.Connect.P50 }
	p99 := func(s Sample) float64 { return s.Connect.P99 }
	scope := func(n int) string { return fmt.Sprintf("%s CIDRs", thousands(n)) }
	for _, n := range cidrCounts(r.Samples) {
		if v, ok := paired(r.Samples, n, Agent, IPSet, sustained, false); ok {
			out = append(out, target{"new flows/s ≥ 0.8 × ipset, 0 undecided", scope(n), fmt.Sprintf("%.2f ×", v), boolp(v >= targetVsIPSet)})
		}
	}
	if v, ok := paired(r.Samples, targetVsChainAt, Agent, Chain, sustained, false); ok {
		out = append(out, target{"new flows/s ≥ 3 × ip-masq-agent chain", scope(targetVsChainAt), fmt.Sprintf("%.2f ×", v), boolp(v >= targetVsChain)})
	} else {
		out = append(out, target{"new flows/s ≥ 3 × ip-masq-agent chain", scope(targetVsChainAt), "–", nil})
	}
	for _, n := range cidrCounts(r.Samples) {
		a, okA := paired(r.Samples, n, Agent, IPSet, tcp, false)
		c, okC := paired(r.Samples, n, Agent, Chain, tcp, false)
		if okA || okC {
			v := minKnown(a, c)
			out = append(out, target{"established TCP ≥ 0.97 × kernel only", scope(n),
				fmt.Sprintf("%s × ipset, %s × chain", ratio(a), ratio(c)), boolp(v >= targetTCP)})
		}
	}
	for _, n := range cidrCounts(r.Samples) {
		d50, ok50 := paired(r.Samples, n, Agent, IPSet, p50, true)
		d99, ok99 := paired(r.Samples, n, Agent, IPSet, p99, true)
		if ok50 {
			out = append(out, target{"added connect latency p50 ≤ 30 µs (vs ipset)", scope(n), fmt.Sprintf("%+.1f µs", d50), boolp(d50 <= targetAddedP50)})
		}
		if ok99 {
			out = append(out, target{"added connect latency p99 ≤ 150 µs (vs ipset)", scope(n), fmt.Sprintf("%+.1f µs", d99), boolp(d99 <= targetAddedP99)})
		}
	}
	if len(r.Reloads) > 0 {
		secs := make([]float64, len(r.Reloads))
		applied := make([]float64, len(r.Reloads))
		var lost uint64
		for i, rl := range r.Reloads {
			secs[i], applied[i] = rl.Seconds, rl.Applied
			lost += rl.Load.Undecided.Total() + (rl.Load.Sent - min(rl.Load.Sent, rl.Load.Delivered))
		}
		m := median(secs)
		to := r.Reloads[0].ToCIDRs
		met := m <= targetReloadSecs && lost == 0
		var mp *bool
		if to >= targetReloadCIDRs {
			mp = boolp(met)
		}
		out = append(out, target{"reload ≤ 200 ms, no verdict lost", scope(to) + " config",
			fmt.Sprintf("%.0f ms median (kernel fallback: %.0f ms), %d flows undecided or lost", m*1e3, median(applied)*1e3, lost), mp})
	}
	return out
}

func minKnown(a, b float64) float64 {
	switch {
	case math.IsNaN(a):
		return b
	case math.IsNaN(b):
		return a
	}
	return math.Min(a, b)
}

func ratio(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fmt.Sprintf("%.3f", v)
}

// thousands writes n with commas: 50000 → "50,000".
func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func rate(v float64) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

// summaryTables are the result tables: medians per CIDR count and
// dataplane, with the agent's ratios to each anchor.
func summaryTables(r *Results) string {
	var b strings.Builder
	sums := summarise(r.Samples)
	get := func(n int, dp string) (Summary, bool) {
		for _, s := range sums {
			if s.CIDRs == n && s.Dataplane == dp {
				return s, true
			}
		}
		return Summary{}, false
	}
	cell := func(n int, dp string, f func(Summary) string) string {
		if s, ok := get(n, dp); ok {
			return f(s)
		}
		return "–"
	}
	pair := func(n int, a, bb string, f func(Sample) float64, diff bool) string {
		v, ok := paired(r.Samples, n, a, bb, f, diff)
		switch {
		case !ok:
			return "–"
		case diff:
			return fmt.Sprintf("%+.1f", v)
		}
		return fmt.Sprintf("%.2f", v)
	}
	counts := cidrCounts(r.Samples)

	b.WriteString("### New flows per second (first packet of each flow)\n\n")
	b.WriteString("Sustained: highest paced rate at which every flow arrived, masqueraded, and none went undecided. ")
	b.WriteString("Unpaced: delivered rate when the sender does not pace itself (undecided flows allowed; median count shown).\n\n")
	b.WriteString("| CIDRs | kernel prefixes | agent sustained | chain sustained | ipset sustained | agent ÷ ipset | agent ÷ chain | agent unpaced (undecided) | chain unpaced | ipset unpaced |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	sustained := func(s Sample) float64 { return s.NewFlows.Sustained }
	for _, n := range counts {
		prefixes := "–"
		for _, dp := range dataplanes {
			if s, ok := get(n, dp); ok {
				prefixes = thousands(s.KernelPrefixes)
				break
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", thousands(n), prefixes,
			cell(n, Agent, func(s Summary) string { return rate(s.Sustained) }),
			cell(n, Chain, func(s Summary) string { return rate(s.Sustained) }),
			cell(n, IPSet, func(s Summary) string { return rate(s.Sustained) }),
			pair(n, Agent, IPSet, sustained, false), pair(n, Agent, Chain, sustained, false),
			cell(n, Agent, func(s Summary) string { return fmt.Sprintf("%s (%.0f)", rate(s.Max), s.MaxUndecided) }),
			cell(n, Chain, func(s Summary) string { return rate(s.Max) }),
			cell(n, IPSet, func(s Summary) string { return rate(s.Max) }))
	}

	b.WriteString("\n### Established TCP throughput (median bulk transfer pod → remote through the node)\n\n")
	b.WriteString("| CIDRs | agent Gbit/s | chain Gbit/s | ipset Gbit/s | agent ÷ ipset | agent ÷ chain |\n|---:|---:|---:|---:|---:|---:|\n")
	tcp := func(s Sample) float64 { return s.TCP.BitsPerSecond }
	gbit := func(s Summary) string { return fmt.Sprintf("%.2f", s.TCPBits/1e9) }
	for _, n := range counts {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", thousands(n),
			cell(n, Agent, gbit), cell(n, Chain, gbit), cell(n, IPSet, gbit),
			pair(n, Agent, IPSet, tcp, false), pair(n, Agent, Chain, tcp, false))
	}

	b.WriteString("\n### TCP connect time (µs; the SYN is each flow's first packet)\n\n")
	b.WriteString("| CIDRs | agent p50 | agent p99 | chain p50 | chain p99 | ipset p50 | ipset p99 | added p50 vs ipset | added p99 vs ipset | added p50 vs chain | added p99 vs chain |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	p50 := func(s Sample) float64 { return s.Connect.P50 }
	p99 := func(s Sample) float64 { return s.Connect.P99 }
	us := func(f func(Summary) float64) func(Summary) string {
		return func(s Summary) string { return fmt.Sprintf("%.1f", f(s)) }
	}
	s50 := us(func(s Summary) float64 { return s.P50 })
	s99 := us(func(s Summary) float64 { return s.P99 })
	for _, n := range counts {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", thousands(n),
			cell(n, Agent, s50), cell(n, Agent, s99), cell(n, Chain, s50), cell(n, Chain, s99), cell(n, IPSet, s50), cell(n, IPSet, s99),
			pair(n, Agent, IPSet, p50, true), pair(n, Agent, IPSet, p99, true),
			pair(n, Agent, Chain, p50, true), pair(n, Agent, Chain, p99, true))
	}

	if len(r.Reloads) > 0 {
		b.WriteString("\n### Reload under load (agent)\n\n")
		b.WriteString("| rep | CIDRs | published → agent decides with it | → kernel fallback holds it | flows sent meanwhile | arrived | undecided | queue drops |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
		for _, rl := range r.Reloads {
			u := rl.Load.Undecided
			fmt.Fprintf(&b, "| %d | %s → %s | %.0f ms | %.0f ms | %d | %d | %d | %d |\n", rl.Rep, thousands(rl.FromCIDRs), thousands(rl.ToCIDRs),
				rl.Seconds*1e3, rl.Applied*1e3, rl.Load.Sent, rl.Load.Delivered, u.Fallback, u.QueueDropped+u.UserDropped)
		}
	}

	if len(r.Variants) > 0 {
		b.WriteString(variantsTable(r.Variants))
	}
	if len(r.Who) > 0 {
		b.WriteString(whoTable(r.Who))
	}
	if len(r.Polling) > 0 {
		b.WriteString(pollingTable(r.Polling))
	}

	b.WriteString("\n### Spread over repetitions (min – max)\n\n")
	b.WriteString("On a shared machine one repetition can be far off; the medians above resist that, this shows how far.\n\n")
	b.WriteString("| CIDRs | dataplane | reps | sustained flows/s | TCP Gbit/s | connect p50 µs | connect p99 µs |\n|---:|---|---:|---:|---:|---:|---:|\n")
	for _, n := range counts {
		for _, dp := range dataplanes {
			var sus, gb, c50, c99 []float64
			for _, s := range r.Samples {
				if s.CIDRs == n && s.Dataplane == dp {
					sus = append(sus, s.NewFlows.Sustained)
					gb = append(gb, s.TCP.BitsPerSecond/1e9)
					c50 = append(c50, s.Connect.P50)
					c99 = append(c99, s.Connect.P99)
				}
			}
			if len(sus) == 0 {
				continue
			}
			fmt.Fprintf(&b, "| %s | %s | %d | %s – %s | %.2f – %.2f | %.1f – %.1f | %.1f – %.1f |\n", thousands(n), dp, len(sus),
				rate(slices.Min(sus)), rate(slices.Max(sus)), slices.Min(gb), slices.Max(gb),
				slices.Min(c50), slices.Max(c50), slices.Min(c99), slices.Max(c99))
		}
	}

	b.WriteString("\n### Setup time (s: agent start to ready, or rule install)\n\n| CIDRs | agent | chain | ipset |\n|---:|---:|---:|---:|\n")
	setup := func(s Summary) string { return fmt.Sprintf("%.2f", s.SetupSeconds) }
	for _, n := range counts {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", thousands(n), cell(n, Agent, setup), cell(n, Chain, setup), cell(n, IPSet, setup))
	}
	return b.String()
}

// renderReport is docs/benchmarks.md: the machine, the commands, the
// targets and the tables, with the plots from plotDir.
func renderReport(r *Results, plotDir string) string {
	var b strings.Builder
	m := r.Machine
	b.WriteString("# Benchmarks\n\n")
	b.WriteString("<!-- Generated by bench/run.sh from the results file; edit bench/live/report.go, not this file. -->\n\n")
	fmt.Fprintf(&b, "Measured %s, %.0f s of measurement", r.Started.Format("2006-01-02 15:04 UTC"), r.Seconds)
	if m.Commit != "" {
		fmt.Fprintf(&b, ", at commit `%s`", m.Commit)
	}
	b.WriteString(".")
	if r.Settings.Short {
		b.WriteString(" **This is a `-short` run (CI smoke test): tiny bursts, one repetition. Its numbers mean nothing.**")
	}
	b.WriteString("\n\n## Machine\n\n| kernel | CPU | cores | Go | iptables backend | nf_conntrack_max |\n|---|---|---:|---|---|---:|\n")
	fmt.Fprintf(&b, "| %s | %s | %d | %s | %s | %s |\n\n", m.Kernel, m.CPU, m.Cores, m.GoVersion, m.Backend, thousands(m.ConntrackMax))
	b.WriteString("Sender, receiver, node forwarding and the agent share these cores; nothing is pinned.\n\n")

	b.WriteString("## Commands\n\n```sh\n" +
		"sudo bench/run.sh                     # measure, then write this file, the plots and the results file\n" +
		"sudo bench/run.sh -short              # smoke run (< 60 s) into a temporary directory; numbers mean nothing\n" +
		"sudo NFMASQ_E2E=1 go test ./bench/live  # the same smoke run as a test (CI)\n" +
		"```\n\n")
	b.WriteString("which ran:\n\n```sh\n" + r.Command + "\ngo run ./bench/plot -in docs/benchmarks/live.json -dir docs/benchmarks\ngo run ./bench/live -report -in docs/benchmarks/live.json -o docs/benchmarks.md\n```\n\n")
	s := r.Settings
	search := ""
	if s.Tolerance > 0 {
		search = fmt.Sprintf(", the rate searched to within %.0f %% in at most %d bursts", 100*s.Tolerance, s.MaxTrials)
	}
	fmt.Fprintf(&b, "Settings: CIDR counts %s; %d repetitions; paced bursts of %.1f s (at least %s, at most %s flows)%s; median of %d TCP transfers of %.1f s; %s connects; reload to %s CIDRs under %s new flows/s; agent flags %s.\n\n",
		joinInts(s.CIDRCounts), s.Reps, s.TrialSeconds, thousands(s.MinFlows), thousands(s.MaxFlows), search, s.TCPTransfers, s.TCPSeconds, thousands(s.Connects),
		thousands(s.ReloadCIDRs), rate(s.ReloadRate), agentFlags(s.AgentArgs))

	b.WriteString(methodText)

	b.WriteString("## Targets\n\n| target | scope | measured | status |\n|---|---|---|---|\n")
	for _, t := range targets(r) {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.What, t.Scope, t.Measured, t.status())
	}
	b.WriteString("\nRatios and added latencies are medians, over repetitions, of the agent against the anchor measured in the same repetition. " +
		"\"Kernel only\" for TCP is the lower of the two ratios.\n\n")

	b.WriteString("## Results (medians)\n\n")
	fmt.Fprintf(&b, "![new flows per second against the number of non-masquerade CIDRs](%s)\n\n", path.Join(plotDir, "newflows.png"))
	fmt.Fprintf(&b, "![TCP connect time CDF](%s)\n\n", path.Join(plotDir, "connect-cdf.png"))
	b.WriteString(summaryTables(r))
	b.WriteString("\nEvery burst, connect distribution and reload is in the results file, with why each failing burst failed.\n")
	return b.String()
}

func agentFlags(args []string) string {
	if len(args) == 0 {
		return "(defaults)"
	}
	return "`" + strings.Join(args, " ") + "`"
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = thousands(n)
	}
	return strings.Join(s, ", ")
}

const methodText = `## What is measured

Three namespaces, pod → node → remote, joined by veth pairs
(internal/sandbox); the node forwards and does the NAT. Each dataplane
is set up on a bare node, measured, and removed:

- **agent**: ` + "`nfmasq agent`" + ` (built from this tree) with every decision
  written to a file flow log (` + "`--flow-log file:…`" + `). The first packet
  of each flow goes to NFQUEUE; the verdict's mark is saved in the
  connmark; MASQUERADE acts on the connmark. Its kernel fallback (an ipset
  above 64 CIDRs) decides only what the agent does not.
- **chain**: kernel only, ip-masq-agent's layout: one ` + "`-d CIDR -j RETURN`" + `
  rule per non-masquerade CIDR, then MASQUERADE.
- **ipset**: kernel only, one ` + "`-m set --match-set … dst -j RETURN`" + ` rule
  over an ipset ` + "`hash:net`" + `.

The non-masquerade list is GKE's 11 default ranges plus random disjoint
prefixes (lengths /18–/30, in 20.0.0.0–99.255.255.255) up to the CIDR
count; the kernel rules get the list the agent compiles from the same
file (link-local added). The test destination (11.0.0.10) is in none of
them, so every flow is masqueraded after the whole list is consulted —
the chain's worst case.

- **New flows/s**: a packet socket in the pod writes IPv4/UDP packets, each
  from a new source address/port (a new conntrack entry, so the whole
  first-packet path runs). The remote drops them in raw PREROUTING and
  counts them by source address; the bench reads the remote's packet
  counter only once the send has returned (every millisecond, until
  200 ms pass with no arrival), so nothing of its own polls during a
  burst. A burst passes when every flow arrived
  masqueraded, the pod's socket refused none, the sender kept the offered
  pace, and nothing went undecided: the NFMASQ-FALLBACK chain's CONNMARK
  counter (fail-open, bypass, unmarked accepts), the kernel's
  ` + "`queue_dropped`/`user_dropped`" + ` counters, and the agent's
  ` + "`nfmasq_queue_skipped_total`" + ` all stayed put (conntrack entries with
  the fallback mark are counted too, as a cross-check). For the agent,
  the flow log must also have written a decision record for every
  decided flow and dropped none (` + "`nfmasq_flowlog_records_total`" + `,
  ` + "`nfmasq_flowlog_dropped_total`" + `). The rate is
  searched (doubling, then geometric bisection) for the highest passing
  rate; the node's conntrack table is flushed before every burst. A
  kernel-only dataplane does all its work inside the sender's ` + "`sendto`" + `
  (veth hands the frame to the softirq on the same CPU), so its rate is
  one core's; the agent's verdicts re-inject packets in the agent's own
  system calls, on whichever core the agent runs. When a kernel-only
  burst fails only because "the sender reached N of M flows/s", N is that
  core's capacity. With the agent, the kernel's NFQUEUE enqueue (building
  the netlink message, queueing it, waking the reader) also runs inside
  the sender's ` + "`sendto`" + `: "the sender reached N" in an agent burst is the
  pod's own first-packet path at its limit.
- **Established TCP**: bulk transfers pod → remote on one connection each,
  rate measured by the receiver; the median transfer counts (one
  setting's transfers vary by a third on this machine, so the best of a
  few is an outlier, not the path's capacity).
- **Connect time**: blocking ` + "`connect(2)`" + ` from the pod, one after another,
  each closed with a reset; "added" latency is the agent's percentile
  minus the anchor's, in the same repetition.
- **Reload**: the agent runs with the 11 default CIDRs and receives new
  flows at a steady rate; its config directory is laid out and updated as
  kubelet updates a ConfigMap volume (the new version written, then the
  ` + "`..data`" + ` symlink swapped). The time from the swap until
  ` + "`nfmasq_policy_generation`" + ` moves is the reload time: the agent
  has read, parsed and compiled the new config and decides every new flow
  with it. The table also gives the time until
  ` + "`nfmasq_policy_applied_generation`" + ` moves, when the kernel
  fallback (an ipset refilled and swapped) holds the new list too; until
  then only flows the agent does not see use the old list. Every flow sent
  meanwhile must arrive with no undecided flow.

`

// pollingTable compares the agent with and without busy polling: medians
// over repetitions of its CPU use at each steady rate and of its connect
// times.
func pollingTable(ps []PollSample) string {
	var b strings.Builder
	var rates []float64
	var variants []string
	for _, p := range ps {
		if !slices.Contains(variants, p.Variant) {
			variants = append(variants, p.Variant)
		}
		for _, c := range p.CPU {
			if !slices.Contains(rates, c.Rate) {
				rates = append(rates, c.Rate)
			}
		}
	}
	slices.Sort(rates)
	b.WriteString("\n### Busy polling: the agent's CPU and connect time (11 CIDRs)\n\n")
	b.WriteString("CPU is the agent process's CPU time per second of wall time (1.00 is one core) while new flows arrive evenly spaced " +
		"at a steady rate (the sender spins between flows on its own core); connect times as above. " +
		"A polling reader catches the next packet without being woken, and pays in CPU when the gaps between flows are shorter than its window.\n\n")
	b.WriteString("| agent |")
	for _, rt := range rates {
		if rt == 0 {
			b.WriteString(" CPU idle |")
		} else {
			fmt.Fprintf(&b, " CPU at %s/s |", rate(rt))
		}
	}
	b.WriteString(" connect p50 µs | connect p99 µs |\n|---|")
	b.WriteString(strings.Repeat("---:|", len(rates)+2) + "\n")
	for _, v := range variants {
		fmt.Fprintf(&b, "| %s |", v)
		var c50, c99 []float64
		for _, rt := range rates {
			var cores []float64
			failed := false
			for _, p := range ps {
				if p.Variant != v {
					continue
				}
				for _, c := range p.CPU {
					if c.Rate == rt {
						cores = append(cores, c.Cores)
						failed = failed || !c.Pass
					}
				}
			}
			mark := ""
			if failed {
				mark = " (a burst failed)"
			}
			fmt.Fprintf(&b, " %.3f%s |", median(cores), mark)
		}
		for _, p := range ps {
			if p.Variant == v {
				c50 = append(c50, p.Connect.P50)
				c99 = append(c99, p.Connect.P99)
			}
		}
		fmt.Fprintf(&b, " %.1f | %.1f |\n", median(c50), median(c99))
	}
	return b.String()
}

// variantsTable compares agent variants with the defaults: medians over
// repetitions of the sustained new-flow rate, and the median of the
// per-repetition ratios.
func variantsTable(vs []VariantSample) string {
	var b strings.Builder
	b.WriteString("\n### Agent variants: sustained new flows/s against the defaults (11 CIDRs)\n\n")
	b.WriteString("Each repetition measures the defaults and every variant one after the other, in rotated order; " +
		"the ratio is the variant's rate over the defaults' in the same repetition (median over repetitions). " +
		"A burst passes only if every flow arrived, was decided and had its flow-log records written. " +
		"masquerade-policies-N reads N MasqueradePolicies, all selecting the 250 sending pods, from a test API server " +
		"(hack/kube-apiserver.sh); after each run it checks that every sending pod was selected and that no packet waited for its identity. " +
		"Its baseline is the same agent on the same API server with MasqueradePolicies off (api-no-policies: the pods are named in the records, no policy applies).\n\n")
	b.WriteString("| variant | flags | sustained new flows/s | against | its rate, same repetitions | ratio |\n|---|---|---:|---|---:|---:|\n")
	// rates[variant][rep]
	byRep := map[string]map[int]float64{}
	var names []string
	for _, v := range vs {
		if byRep[v.Variant] == nil {
			byRep[v.Variant] = map[int]float64{}
		}
		byRep[v.Variant][v.Rep] = v.NewFlows.Sustained
		if v.Variant != VariantDefaults && !slices.Contains(names, v.Variant) {
			names = append(names, v.Variant)
		}
	}
	for _, name := range names {
		var rates, bases, ratios []float64
		var flags []string
		against := VariantDefaults
		for _, v := range vs {
			if v.Variant != name {
				continue
			}
			flags = v.Flags
			if v.Baseline != "" {
				against = v.Baseline
			}
			rates = append(rates, v.NewFlows.Sustained)
			if bv, ok := byRep[against][v.Rep]; ok {
				bases = append(bases, bv)
				if bv > 0 {
					ratios = append(ratios, v.NewFlows.Sustained/bv)
				}
			}
		}
		ratioText := "n/a"
		if len(ratios) > 0 {
			ratioText = fmt.Sprintf("%.3f", median(ratios))
		}
		fmt.Fprintf(&b, "| %s | `%s` | %s | %s | %s | %s |\n", name, strings.Join(flags, " "), rate(median(rates)), against, rate(median(bases)), ratioText)
	}
	return b.String()
}

// whoTable reports nfmasq who's scan rate: records per CPU second,
// median over repetitions.
func whoTable(ws []WhoSample) string {
	var b strings.Builder
	b.WriteString("\n### nfmasq who: records scanned per CPU second\n\n")
	b.WriteString("internal/who's reader on a generated flow log (who.SyntheticLog: 100,000 flows of 250 pods, decision, nat and end records, " +
		"each end 4,096 flows after its start), from memory, on one goroutine; CPU time of the process, garbage collection included.\n\n")
	b.WriteString("| query | records | records/s (median) | range |\n|---|---:|---:|---:|\n")
	var queries []string
	for _, w := range ws {
		if !slices.Contains(queries, w.Query) {
			queries = append(queries, w.Query)
		}
	}
	for _, q := range queries {
		var rates []float64
		records := 0
		for _, w := range ws {
			if w.Query == q && w.Seconds > 0 {
				rates = append(rates, float64(w.Records)/w.Seconds)
				records = w.Records
			}
		}
		if len(rates) == 0 {
			continue
		}
		fmt.Fprintf(&b, "| `--%s` | %s | %s | %s–%s |\n", q, thousands(records), rate(median(rates)), rate(slices.Min(rates)), rate(slices.Max(rates)))
	}
	return b.String()
}
