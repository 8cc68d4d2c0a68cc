//go:build linux

package main

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
)

// burst is what a trial sends: n flows at rate flows/s (0: unpaced), for
// at most maxDur. A non-nil stop ends it early on purpose; started, when
// set, is closed as the first flow goes out.
type burst struct {
	rate    float64
	n       uint64
	maxDur  time.Duration
	stop    *atomic.Bool
	started chan<- struct{}
	// even spaces the flows equally instead of in small bursts.
	even bool
}

// trial sends one burst of new flows through the dataplane and accounts
// for every one: delivered at the remote (and with which source), or
// undecided/dropped on the node. The node's conntrack table is flushed
// first.
func (b *bench) trial(ctx context.Context, r *running, p burst) (Trial, error) {
	agent := r.agent != nil
	rate, n := p.rate, p.n
	if err := b.flushConntrack(ctx, agent); err != nil {
		return Trial{}, err
	}
	before, err := b.snapshot(ctx, agent)
	if err != nil {
		return Trial{}, err
	}
	if p.started != nil {
		close(p.started)
	}
	res, sendErr := b.sender.send(rate, n, p.maxDur, p.stop, p.even)
	// Queued packets may still be waiting for verdicts: wait until the
	// remote has seen nothing new for a while. The clock starts only now:
	// it polls a counter every millisecond, which during the burst would
	// take CPU from the dataplane under test (about 5 % of a core, that
	// a kernel-only dataplane, bound to the sender's core, never misses).
	// A burst's last arrival is at or after the end of the send anyway.
	clock := b.startClock()
	last, waitErr := clock.waitQuiet(ctx, 200*time.Millisecond, time.Now().Add(10*time.Second))
	clockErr := clock.Close()
	for _, err := range []error{sendErr, waitErr, clockErr} {
		if err != nil {
			return Trial{}, err
		}
	}
	after, err := b.snapshot(ctx, agent)
	if err != nil {
		return Trial{}, err
	}
	var ctFallback uint64
	if agent {
		if ctFallback, err = b.countFallbackEntries(); err != nil {
			return Trial{}, err
		}
	}
	t := Trial{
		Offered:     rate,
		Sent:        res.sent,
		Delivered:   after.all - before.all,
		Masqueraded: after.masq - before.masq,
		SendSeconds: res.duration.Seconds(),
		Seconds:     math.Max(last.Sub(res.start).Seconds(), res.duration.Seconds()),
		Undecided: Undecided{
			Fallback:     after.fallback - before.fallback,
			QueueDropped: after.queueDrop - before.queueDrop,
			UserDropped:  after.userDrop - before.userDrop,
			Skipped:      uint64(after.skipped - before.skipped),
			Agent:        uint64(after.agentUndec - before.agentUndec),
			Conntrack:    ctFallback,
		},
	}
	if agent {
		t.Logged = uint64(after.decisions - before.decisions)
		t.LogDropped = uint64(after.flowDrop - before.flowDrop)
	}
	if t.SendSeconds > 0 {
		t.Achieved = float64(t.Sent) / t.SendSeconds
	}
	if t.Seconds > 0 {
		t.Rate = float64(t.Delivered) / t.Seconds
	}
	var why []string
	if res.errs > 0 {
		why = append(why, fmt.Sprintf("%d sends failed in the pod", res.errs))
	}
	if t.Delivered != t.Sent {
		why = append(why, fmt.Sprintf("%d of %d flows arrived", t.Delivered, t.Sent))
	}
	if t.Masqueraded != t.Delivered {
		why = append(why, fmt.Sprintf("%d of %d arrivals not masqueraded", t.Delivered-t.Masqueraded, t.Delivered))
	}
	if u := t.Undecided.Total(); u > 0 {
		why = append(why, fmt.Sprintf("%d undecided", u))
	}
	if agent && t.LogDropped > 0 {
		why = append(why, fmt.Sprintf("%d flow-log records dropped", t.LogDropped))
	}
	if decided := t.Delivered - min(t.Delivered, t.Undecided.Total()); agent && !b.opts.flowLogOff && t.Logged < decided {
		why = append(why, fmt.Sprintf("%d of %d decisions logged", t.Logged, decided))
	}
	if rate > 0 && t.Achieved < 0.95*rate {
		why = append(why, fmt.Sprintf("sender reached %.0f of %.0f flows/s", t.Achieved, rate))
	}
	if p.stop == nil && rate > 0 && res.sent+res.errs < n && len(why) == 0 {
		why = append(why, fmt.Sprintf("time ran out after %d of %d flows", res.sent, n))
	}
	t.Pass, t.Why = len(why) == 0, strings.Join(why, "; ")
	return t, nil
}

// newFlows searches for the highest rate with every flow decided and
// delivered, then measures the unpaced rate.
func (b *bench) newFlows(ctx context.Context, r *running, cidrs int) (NewFlows, error) {
	o := b.opts
	flows := func(rate float64) uint64 {
		return uint64(math.Min(math.Max(rate*o.trialSeconds, float64(o.minFlows)), float64(o.maxFlows)))
	}
	trialTime := time.Duration(3 * o.trialSeconds * float64(time.Second))
	// The search starts from this dataplane's answer in the previous
	// repetition (small steps), else at the previous CIDR count (doubling).
	s := search{start: 20000, floor: 250, ceiling: o.maxRate, step: 2, tolerance: o.tolerance, maxTrials: o.maxTrials}
	if prev := b.lastRate[rateKey{r.name, cidrs}]; prev > 0 {
		s.start, s.step = prev, 1.25
	} else if prev := b.lastRate[rateKey{r.name, 0}]; prev > 0 {
		s.start = prev
	}
	best, trials, err := s.run(func(rate float64) (Trial, error) {
		t, err := b.trial(ctx, r, burst{rate: rate, n: flows(rate), maxDur: trialTime})
		if err == nil {
			b.logf("  %s %8.0f flows/s offered: %s", r.name, rate, verdict(t))
		}
		return t, err
	})
	if err != nil {
		return NewFlows{}, err
	}
	nf := NewFlows{Trials: trials}
	if best.Pass {
		nf.Sustained = best.Achieved
		b.lastRate[rateKey{r.name, cidrs}] = best.Offered
		b.lastRate[rateKey{r.name, 0}] = best.Offered
	}
	max, err := b.trial(ctx, r, burst{n: uint64(o.maxFlows), maxDur: trialTime})
	if err != nil {
		return NewFlows{}, err
	}
	b.logf("  %s unpaced: %.0f flows/s delivered; %s", r.name, max.Rate, verdict(max))
	nf.Max, nf.MaxTrial = max.Rate, max
	return nf, nil
}

func verdict(t Trial) string {
	if t.Pass {
		return fmt.Sprintf("pass (%d flows)", t.Sent)
	}
	return "fail: " + t.Why
}

// sample measures one dataplane at one CIDR count.
func (b *bench) sample(ctx context.Context, name string, cidrs int, rep int, cfgPath string, nonMasq []netip.Prefix) (Sample, error) {
	s := Sample{CIDRs: cidrs, KernelPrefixes: len(nonMasq), Dataplane: name, Rep: rep}
	start := time.Now()
	r, err := b.start(ctx, name, cfgPath, nonMasq)
	if err != nil {
		return s, err
	}
	s.SetupSeconds = time.Since(start).Seconds()
	b.logf("%s at %d CIDRs (rep %d): ready in %.2fs", name, cidrs, rep, s.SetupSeconds)
	err = b.measure(ctx, r, &s)
	if stopErr := b.stop(context.WithoutCancel(ctx), r); err == nil {
		err = stopErr
	}
	return s, err
}

func (b *bench) measure(ctx context.Context, r *running, s *Sample) error {
	var err error
	if s.NewFlows, err = b.newFlows(ctx, r, s.CIDRs); err != nil {
		return err
	}
	if err := b.flushConntrack(ctx, r.agent != nil); err != nil {
		return err
	}
	if s.TCP, err = b.tcpThroughput(ctx, b.opts.tcpTransfers, time.Duration(b.opts.tcpSeconds*float64(time.Second))); err != nil {
		return err
	}
	b.logf("  %s TCP: median %.2f Gbit/s of %d transfers", r.name, s.TCP.BitsPerSecond/1e9, len(s.TCP.Transfers))
	times, failures, err := b.connectTimes(ctx, b.opts.connects, b.opts.connects/20+10)
	if err != nil {
		return err
	}
	s.Connect = connectStats(times, failures)
	b.logf("  %s connect: p50 %.1fµs p99 %.1fµs (%d failed)", r.name, s.Connect.P50, s.Connect.P99, failures)
	if r.agent != nil {
		m, err := b.scrape(ctx)
		if err != nil {
			return err
		}
		fl := &FlowLog{Written: map[string]float64{}}
		for _, kind := range []string{"decision", "nat", "end", "fallback", "gap"} {
			fl.Written[kind], _ = metricSum(m, "nfmasq_flowlog_records_total", `kind="`+kind+`"`)
		}
		fl.Dropped, _ = metricSum(m, "nfmasq_flowlog_dropped_total")
		s.FlowLog = fl
	}
	return nil
}

// variantSample measures the agent's new flows/s with v's extra flags.
// Each variant's rate search starts from its own previous answer.
func (b *bench) variantSample(ctx context.Context, v variant, rep int, cfgPath string) (VariantSample, error) {
	vs := VariantSample{Variant: v.name, Flags: v.flags, Rep: rep, Baseline: v.baseline}
	if v.shown != nil {
		vs.Flags = v.shown
	}
	a, err := b.startAgent(ctx, cfgPath, v.flags)
	if err != nil {
		return vs, err
	}
	b.logf("agent variant %s (rep %d)", v.name, rep)
	r := &running{name: Agent + " " + v.name, agent: a}
	vs.NewFlows, err = b.newFlows(ctx, r, 0)
	if err == nil && v.check != nil {
		err = v.check(ctx)
	}
	if stopErr := b.stop(context.WithoutCancel(ctx), r); err == nil {
		err = stopErr
	}
	return vs, err
}

// reload measures, with the agent running on a small config and new flows
// arriving at a steady rate, the time from publishing a config of `to`
// CIDRs to the agent deciding with it (its policy generation moves) and
// to its kernel fallback holding it (the applied generation moves), and
// checks that no flow went undecided meanwhile.
func (b *bench) reload(ctx context.Context, rep int, small []string, to []string) (Reload, error) {
	rl := Reload{Rep: rep, FromCIDRs: len(small), ToCIDRs: len(to)}
	dir := filepath.Join(b.opts.tmp, fmt.Sprintf("reload-%d", rep))
	vol, err := newConfigMapVolume(dir, "config", configFile(small))
	if err != nil {
		return rl, err
	}
	r, err := b.start(ctx, Agent, vol.path(), nil)
	if err != nil {
		return rl, err
	}
	defer func() {
		if err := b.stop(context.WithoutCancel(ctx), r); err != nil {
			b.logf("warning: %v", err)
		}
	}()
	gen0, _, err := b.generations(ctx)
	if err != nil {
		return rl, err
	}
	// Written before the clock starts, as kubelet writes the new version
	// before it publishes it.
	if err := vol.prepare(configFile(to)); err != nil {
		return rl, err
	}

	// The load runs until shortly after the new policy is in force (at
	// most reloadMax), so that it covers the whole reload.
	const reloadMax = 30 * time.Second
	var stop atomic.Bool
	type result struct {
		t   Trial
		err error
	}
	done := make(chan result, 1)
	started := make(chan struct{})
	go func() {
		t, err := b.trial(ctx, r, burst{rate: b.opts.reloadRate, n: uint64(b.opts.reloadRate * reloadMax.Seconds()),
			maxDur: reloadMax, stop: &stop, started: started})
		done <- result{t, err}
	}()
	halt := func() result {
		stop.Store(true)
		return <-done
	}
	select {
	case <-started:
	case res := <-done:
		return rl, fmt.Errorf("load did not start: %v", res.err)
	}
	// Let the load reach its pace before the change.
	time.Sleep(300 * time.Millisecond) // load warm-up, not synchronisation
	start := time.Now()
	if err := vol.publish(); err != nil {
		halt()
		return rl, err
	}
	deadline := start.Add(reloadMax - time.Second)
	for rl.Applied == 0 {
		g, applied, err := b.generations(ctx)
		if err != nil {
			halt()
			return rl, err
		}
		if g > gen0 && rl.Seconds == 0 {
			rl.Seconds = time.Since(start).Seconds()
		}
		if applied > gen0 {
			rl.Applied = time.Since(start).Seconds()
			break
		}
		if time.Now().After(deadline) {
			halt()
			return rl, fmt.Errorf("policy generation %v, applied %v, %v after the config change (want > %v)\n%s", g, applied, reloadMax, gen0, r.agent.tail(20))
		}
		time.Sleep(2 * time.Millisecond) // polling the metric is the measurement
	}
	if err := vol.cleanup(); err != nil {
		b.logf("warning: %v", err)
	}
	// Flows decided by the new policy, after the swap, belong in the load.
	time.Sleep(300 * time.Millisecond) // load tail, not synchronisation
	res := halt()
	if res.err != nil {
		return rl, res.err
	}
	rl.Load = res.t
	b.logf("reload %d → %d CIDRs: deciding with it after %.0f ms, fallback after %.0f ms; load %s",
		len(small), len(to), rl.Seconds*1e3, rl.Applied*1e3, verdict(res.t))
	return rl, nil
}

// generations reads the agent's policy generation (policies it decides
// with) and applied generation (policies its kernel fallback holds).
func (b *bench) generations(ctx context.Context) (gen, applied float64, err error) {
	m, err := b.scrape(ctx)
	if err != nil {
		return 0, 0, err
	}
	gen, ok := metricSum(m, "nfmasq_policy_generation")
	if !ok {
		return 0, 0, fmt.Errorf("the agent exports no nfmasq_policy_generation")
	}
	applied, ok = metricSum(m, "nfmasq_policy_applied_generation")
	if !ok {
		return 0, 0, fmt.Errorf("the agent exports no nfmasq_policy_applied_generation")
	}
	return gen, applied, nil
}
