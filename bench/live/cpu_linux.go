//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// pollVariants are the agent configurations the busy-polling comparison
// measures: the agent as benchmarked (by default it polls for up to
// 10 µs), and the same with polling off and with windows of up to 50 µs.
var pollVariants = []struct {
	name  string
	extra []string
}{
	{"benchmarked flags", nil},
	{"--busy-poll=0", []string{"--busy-poll=0"}},
	{"--busy-poll=50us", []string{"--busy-poll=50us"}},
}

// pollCompare measures the agent with and without busy polling, at the
// 11 default CIDRs: its CPU time at steady new-flow rates (polling spends
// CPU while traffic is sparse) and the connect time (what polling buys).
func (b *bench) pollCompare(ctx context.Context, rep int, cfgPath string) ([]PollSample, error) {
	var out []PollSample
	for i := range pollVariants {
		v := pollVariants[(i+rep)%len(pollVariants)]
		ps := PollSample{Variant: v.name, Rep: rep, Flags: v.extra}
		a, err := b.startAgent(ctx, cfgPath, v.extra)
		if err != nil {
			return out, err
		}
		err = b.measurePolling(ctx, a, &ps)
		r := &running{name: Agent, agent: a}
		if stopErr := b.stop(context.WithoutCancel(ctx), r); err == nil {
			err = stopErr
		}
		if err != nil {
			return out, fmt.Errorf("%s: %w", v.name, err)
		}
		out = append(out, ps)
	}
	return out, nil
}

func (b *bench) measurePolling(ctx context.Context, a *agentProc, ps *PollSample) error {
	r := &running{name: Agent, agent: a}
	seconds := max(1, b.opts.trialSeconds)
	if b.opts.short {
		seconds = b.opts.trialSeconds
	}
	for _, offered := range b.opts.cpuRates {
		c, err := b.cpuAt(ctx, r, offered, seconds)
		if err != nil {
			return err
		}
		ps.CPU = append(ps.CPU, c)
		b.logf("  %s: %.1f%% of a core at %s new flows/s", ps.Variant, 100*c.Cores, rate(offered))
	}
	if err := b.flushConntrack(ctx, true); err != nil {
		return err
	}
	times, failures, err := b.connectTimes(ctx, b.opts.connects, b.opts.connects/20+10)
	if err != nil {
		return err
	}
	ps.Connect = connectStats(times, failures)
	b.logf("  %s connect: p50 %.1fµs p99 %.1fµs", ps.Variant, ps.Connect.P50, ps.Connect.P99)
	return nil
}

// cpuAt sends new flows at a steady rate (0: none) for about seconds and
// returns the agent's CPU time over that time. The conntrack table is
// flushed before the clock starts, so that the destroy events of earlier
// flows are not counted; those of these flows are, as far as they come
// within the window.
func (b *bench) cpuAt(ctx context.Context, r *running, rate, seconds float64) (CPUAt, error) {
	if err := b.flushConntrack(ctx, true); err != nil {
		return CPUAt{}, err
	}
	pid := r.agent.cmd.Process.Pid
	cpu0, err := processCPU(pid)
	if err != nil {
		return CPUAt{}, err
	}
	start := time.Now()
	c := CPUAt{Rate: rate}
	if rate > 0 {
		t, err := b.trial(ctx, r, burst{rate: rate, n: uint64(rate * seconds), maxDur: time.Duration(2 * seconds * float64(time.Second)), even: true})
		if err != nil {
			return c, err
		}
		c.Pass, c.Why = t.Pass, t.Why
	} else {
		select {
		case <-ctx.Done():
			return c, ctx.Err()
		case <-time.After(time.Duration(seconds * float64(time.Second))):
		}
		c.Pass = true
	}
	wall := time.Since(start)
	cpu1, err := processCPU(pid)
	if err != nil {
		return c, err
	}
	c.Seconds = wall.Seconds()
	c.Cores = (cpu1 - cpu0).Seconds() / wall.Seconds()
	return c, nil
}

// processCPU returns the CPU time every thread of process pid has used
// so far (first field of each /proc/PID/task/TID/schedstat, in ns: finer
// than the clock ticks of /proc/PID/stat).
func processCPU(pid int) (time.Duration, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("agent %d: no task schedstat (%v)", pid, err)
	}
	var total time.Duration
	for _, path := range tasks {
		data, err := os.ReadFile(path)
		if err != nil {
			continue // the thread exited meanwhile
		}
		f := strings.Fields(string(data))
		if len(f) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", path, err)
		}
		total += time.Duration(ns)
	}
	return total, nil
}
