//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nfmasq/nfmasq/nat"
)

// run measures every dataplane at every CIDR count, each repetition
// taking the dataplanes in a rotated order so that a slow drift of the
// machine does not always favour the same one. save is called with the
// results so far after every sample.
func run(ctx context.Context, o options, progress io.Writer, save func(*Results) error) (*Results, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the live benchmark needs root (network namespaces, iptables)")
	}
	res := &Results{
		Command: "go run ./bench/live " + strings.Join(os.Args[1:], " "),
		Started: time.Now().UTC(),
		Settings: Settings{
			CIDRCounts: o.cidrCounts, Reps: o.reps, MinFlows: o.minFlows, Short: o.short, TrialSeconds: o.trialSeconds,
			Connects: o.connects, TCPSeconds: o.tcpSeconds, TCPTransfers: o.tcpTransfers, ReloadCIDRs: o.reloadCIDRs, ReloadRate: o.reloadRate,
			Tolerance: o.tolerance, MaxTrials: o.maxTrials,
			AgentArgs: o.agentArgs, Seed: o.seed, PrefixBits: [2]int{minGenBits, maxGenBits}, Destination: o.dst.String(),
		},
		Machine: machine(),
	}
	if cm := res.Machine.ConntrackMax; cm > 0 && o.maxFlows > cm/2 {
		o.maxFlows = cm / 2
	}
	res.Settings.MaxFlows = o.maxFlows
	if o.tmp == "" {
		dir, err := os.MkdirTemp("", "nfmasq-live-")
		if err != nil {
			return nil, err
		}
		o.tmp = dir
		if !o.keepTmp {
			defer os.RemoveAll(dir)
		}
	}
	if o.agentBin == "" && slices.Contains(o.dataplanes, Agent) {
		bin, err := buildAgent(ctx, o.tmp)
		if err != nil {
			return nil, err
		}
		o.agentBin = bin
	}
	b, err := newBench(ctx, o, progress)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	res.Machine.Backend = backendFlag(b.backend)
	start := time.Now()
	saveNow := func() error {
		res.Seconds = time.Since(start).Seconds()
		return save(res)
	}

	for _, n := range o.cidrCounts {
		list, err := nonMasqueradeList(n, o.seed)
		if err != nil {
			return res, err
		}
		cfgPath, nonMasq, err := writeConfig(filepath.Join(o.tmp, fmt.Sprintf("cidrs-%d", n)), list)
		if err != nil {
			return res, err
		}
		for rep := 0; rep < o.reps; rep++ {
			for i := range o.dataplanes {
				name := o.dataplanes[(i+rep)%len(o.dataplanes)]
				s, err := b.sample(ctx, name, n, rep, cfgPath, nonMasq)
				if err != nil {
					return res, fmt.Errorf("%s at %d CIDRs: %w", name, n, err)
				}
				res.Samples = append(res.Samples, s)
				if err := saveNow(); err != nil {
					return res, err
				}
			}
		}
	}

	if o.pollReps > 0 && slices.Contains(o.dataplanes, Agent) {
		list, err := nonMasqueradeList(len(nat.DefaultNonMasqueradeCIDRs(true)), o.seed)
		if err != nil {
			return res, err
		}
		cfgPath, _, err := writeConfig(filepath.Join(o.tmp, "polling"), list)
		if err != nil {
			return res, err
		}
		for rep := 0; rep < o.pollReps; rep++ {
			ps, err := b.pollCompare(ctx, rep, cfgPath)
			res.Polling = append(res.Polling, ps...)
			if err != nil {
				return res, fmt.Errorf("busy-polling comparison: %w", err)
			}
			if err := saveNow(); err != nil {
				return res, err
			}
		}
	}

	if o.variantReps > 0 && (len(o.variants) > 0 || o.kubeconfig != "") && slices.Contains(o.dataplanes, Agent) {
		list, err := nonMasqueradeList(len(nat.DefaultNonMasqueradeCIDRs(true)), o.seed)
		if err != nil {
			return res, err
		}
		cfgPath, _, err := writeConfig(filepath.Join(o.tmp, "variants"), list)
		if err != nil {
			return res, err
		}
		all := append([]variant{{name: VariantDefaults}}, o.variants...)
		if o.kubeconfig != "" {
			vs, cleanup, err := b.masqueradeVariants(ctx, cfgPath)
			if err != nil {
				return res, fmt.Errorf("MasqueradePolicy variant: %w", err)
			}
			defer cleanup()
			all = append(all, vs...)
		}
		for rep := 0; rep < o.variantReps; rep++ {
			for i := range all {
				v := all[(i+rep)%len(all)]
				vs, err := b.variantSample(ctx, v, rep, cfgPath)
				if err != nil {
					return res, fmt.Errorf("variant %s: %w", v.name, err)
				}
				res.Variants = append(res.Variants, vs)
				if err := saveNow(); err != nil {
					return res, err
				}
			}
		}
	}

	if o.variantReps > 0 {
		ws, err := whoScan(max(o.variantReps, 3))
		if err != nil {
			return res, fmt.Errorf("nfmasq who scan: %w", err)
		}
		res.Who = ws
		for _, w := range ws {
			b.logf("nfmasq who --%s: %d records in %.3f s of CPU", w.Query, w.Records, w.Seconds)
		}
		if err := saveNow(); err != nil {
			return res, err
		}
	}

	if o.reloadCIDRs > 0 && slices.Contains(o.dataplanes, Agent) {
		small, err := nonMasqueradeList(len(nat.DefaultNonMasqueradeCIDRs(true)), o.seed)
		if err != nil {
			return res, err
		}
		big, err := nonMasqueradeList(o.reloadCIDRs, o.seed+1)
		if err != nil {
			return res, err
		}
		for rep := 0; rep < o.reloadReps; rep++ {
			rl, err := b.reload(ctx, rep, small, big)
			if err != nil {
				return res, fmt.Errorf("reload: %w", err)
			}
			res.Reloads = append(res.Reloads, rl)
			if err := saveNow(); err != nil {
				return res, err
			}
		}
	}
	return res, saveNow()
}

// writeConfig writes the config file into dir and returns its path and
// the list the kernel rules get for it: the policy compiled from the same
// file, as the agent compiles it.
func writeConfig(dir string, cidrs []string) (string, []netip.Prefix, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, err
	}
	path := filepath.Join(dir, "config")
	if err := os.WriteFile(path, configFile(cidrs), 0o644); err != nil {
		return "", nil, err
	}
	cfg, _, err := nat.LoadConfig(path, nat.ParseOptions{AllReservedRanges: true})
	if err != nil {
		return "", nil, err
	}
	pol, err := nat.Compile(nat.Input{Config: cfg, AllReservedRanges: true})
	if err != nil {
		return "", nil, err
	}
	return path, pol.NonMasquerade(false), nil
}

// buildAgent builds cmd/nfmasq of the module this program belongs to.
func buildAgent(ctx context.Context, dir string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find the module root (go env GOMOD): %v; run from the repository or pass -agent", err)
	}
	bin := filepath.Join(dir, "nfmasq")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/nfmasq")
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/nfmasq: %w\n%s", err, out)
	}
	return bin, nil
}

func machine() Machine {
	m := Machine{CPU: hostCPU(), Cores: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_max"); err == nil {
		m.ConntrackMax, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	return m
}
