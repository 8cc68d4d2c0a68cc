package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/nfmasq/nfmasq/internal/mark"
)

func init() {
	// Agents are started from the main goroutine, and their parent-death
	// signal is tied to the starting thread: pin the goroutine so that
	// thread lives as long as the benchmark (see startAgent).
	runtime.LockOSThread()
}

// options are the knobs of one run.
type options struct {
	cidrCounts   []int
	dataplanes   []string
	reps         int
	short        bool
	out          string
	markdown     string
	report       bool
	in           string
	plots        string
	agentBin     string
	agentArgs    []string
	backend      string
	trialSeconds float64
	minFlows     int
	maxFlows     int
	maxRate      float64
	tolerance    float64
	maxTrials    int
	tcpSeconds   float64
	tcpTransfers int
	connects     int
	reloadCIDRs  int
	reloadRate   float64
	reloadReps   int
	cpuRates     []float64
	pollReps     int
	variants     []variant
	variantReps  int
	kubeconfig   string // the test API server, for the MasqueradePolicy variant
	masqPolicies int
	seed         uint64
	dst          netip.Addr
	tmp          string
	pdeathsig    bool
	keepTmp      bool
	marks        mark.Layout // the agent's, from --mark-mask in agentArgs
	flowLogOff   bool        // agentArgs turn the flow log off: no decision records to count
}

// shortPreset is -short: one CIDR count, one repetition, tiny bursts. It
// exercises every measurement in well under a minute so CI keeps the
// suite working; its numbers mean nothing.
var shortPreset = map[string]string{
	"cidrs":         "11",
	"reps":          "1",
	"trial-seconds": "0.1",
	"min-flows":     "200",
	"max-flows":     "3000",
	"max-trials":    "3",
	"tolerance":     "0.5",
	"tcp-seconds":   "0.3",
	"tcp-transfers": "1",
	"connects":      "200",
	"reload-cidrs":  "10000",
	"reload-rate":   "1000",
	"reload-reps":   "1",
	"cpu-rates":     "0,1000",
	"poll-reps":     "1",
	"variant-reps":  "1",
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("live", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, `usage: go run ./bench/live [flags]            (as root)
       go run ./bench/live -report -in results.json -o docs/benchmarks.md

Measures the nfmasq agent against the two kernel-only dataplanes (an
ip-masq-agent-style chain, one rule per CIDR; one ipset hash:net rule) in
throw-away network namespaces: new flows/s with every flow decided,
established TCP throughput, TCP connect latency, and the agent's reload of
a large config under load. Writes a JSON results file; -report renders
the markdown report from one.

`)
		fs.PrintDefaults()
	}
	cidrs := fs.String("cidrs", "11,1000,5000,50000", "comma-separated non-masquerade CIDR counts (each includes GKE's 11 defaults)")
	dps := fs.String("dataplanes", strings.Join(dataplanes, ","), "dataplanes to measure")
	fs.IntVar(&o.reps, "reps", 3, "repetitions of every measurement (the report gives medians)")
	fs.BoolVar(&o.short, "short", false, "CI mode: one CIDR count, one repetition, tiny bursts (< 60 s); explicit flags still win")
	fs.StringVar(&o.out, "out", "live.json", "results file (JSON), rewritten after every sample")
	fs.StringVar(&o.markdown, "o", "", "with -report: markdown output file (default stdout)")
	fs.BoolVar(&o.report, "report", false, "render the markdown report from -in instead of measuring")
	fs.StringVar(&o.in, "in", "live.json", "with -report: results file to read")
	fs.StringVar(&o.plots, "plots", "benchmarks", "with -report: directory of the PNG plots, relative to the markdown file")
	fs.StringVar(&o.agentBin, "agent", "", "nfmasq binary (default: go build ./cmd/nfmasq into a temporary directory)")
	agentArgs := fs.String("agent-args", "", "extra flags for `nfmasq agent`, space-separated (e.g. \"--queues 2\")")
	fs.StringVar(&o.backend, "iptables-backend", "auto", "iptables backend for every dataplane: auto, nft or legacy")
	fs.Float64Var(&o.trialSeconds, "trial-seconds", 1, "length of one paced burst of new flows")
	fs.IntVar(&o.minFlows, "min-flows", 2000, "fewest flows in a burst")
	fs.IntVar(&o.maxFlows, "max-flows", 120000, "most flows in a burst (bounded by half of nf_conntrack_max)")
	fs.Float64Var(&o.maxRate, "max-rate", 400000, "highest rate the search offers (flows/s)")
	fs.Float64Var(&o.tolerance, "tolerance", 0.03, "the rate search stops when failing and passing rates are within this factor")
	fs.IntVar(&o.maxTrials, "max-trials", 14, "most bursts per rate search")
	fs.Float64Var(&o.tcpSeconds, "tcp-seconds", 1, "length of one bulk TCP transfer")
	fs.IntVar(&o.tcpTransfers, "tcp-transfers", 5, "bulk TCP transfers per measurement (their median counts)")
	fs.IntVar(&o.connects, "connects", 2000, "TCP connects per latency measurement")
	fs.IntVar(&o.reloadCIDRs, "reload-cidrs", 100000, "CIDRs in the config the agent reloads (0: skip the reload measurement)")
	fs.Float64Var(&o.reloadRate, "reload-rate", 2000, "new flows/s sent while the agent reloads")
	fs.IntVar(&o.reloadReps, "reload-reps", 3, "reload measurements")
	cpuRates := fs.String("cpu-rates", "0,1000,10000,50000,150000", "steady new-flow rates at which the agent's CPU is measured, with and without busy polling")
	fs.IntVar(&o.pollReps, "poll-reps", 3, "repetitions of the busy-polling comparison (0: skip it)")
	variants := fs.String("variants", "nat-records=--flow-log-nat;ipfix-export=--ipfix-collector 192.168.77.2:4739",
		"agent variants whose sustained new flows/s is compared with the defaults in the same repetitions: NAME=FLAGS, separated by ';'")
	fs.IntVar(&o.variantReps, "variant-reps", 3, "repetitions of the variant comparison (0: skip it)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "a test API server (hack/kube-apiserver.sh): adds the variant where MasqueradePolicies select every sending pod")
	fs.IntVar(&o.masqPolicies, "masquerade-policies", 100, "with -kubeconfig: MasqueradePolicies selecting the sending pods")
	fs.Uint64Var(&o.seed, "seed", 1, "seed of the generated CIDR lists")
	dst := fs.String("dst", "11.0.0.10", "destination of the test flows (in the remote namespace; must be masqueraded)")
	fs.StringVar(&o.tmp, "tmp", "", "working directory for configs, agent logs and flow logs (default: a new temporary one)")
	fs.BoolVar(&o.keepTmp, "keep-tmp", false, "keep the working directory")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.short {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range shortPreset {
			if !set[name] {
				if err := fs.Set(name, v); err != nil {
					return o, err
				}
			}
		}
	}
	var err error
	if o.cidrCounts, err = parseInts(*cidrs); err != nil {
		return o, fmt.Errorf("-cidrs: %w", err)
	}
	for _, d := range strings.Split(*dps, ",") {
		if !slices.Contains(dataplanes, d) {
			return o, fmt.Errorf("-dataplanes: unknown %q (want %s)", d, strings.Join(dataplanes, ", "))
		}
		o.dataplanes = append(o.dataplanes, d)
	}
	if o.cpuRates, err = parseRates(*cpuRates); err != nil {
		return o, fmt.Errorf("-cpu-rates: %w", err)
	}
	if o.variants, err = parseVariants(*variants); err != nil {
		return o, fmt.Errorf("-variants: %w", err)
	}
	o.agentArgs = strings.Fields(*agentArgs)
	if o.marks, err = agentMarks(o.agentArgs); err != nil {
		return o, fmt.Errorf("-agent-args: %w", err)
	}
	if v, ok := flagValue(o.agentArgs, "--flow-log"); ok && v == "off" {
		o.flowLogOff = true
	}
	if o.dst, err = netip.ParseAddr(*dst); err != nil || !o.dst.Is4() {
		return o, fmt.Errorf("-dst %q: want an IPv4 address", *dst)
	}
	if o.reps < 1 || o.trialSeconds <= 0 || o.minFlows < 1 || o.maxFlows < o.minFlows || o.maxTrials < 1 || o.connects < 1 || o.tcpTransfers < 1 {
		return o, errors.New("-reps, -trial-seconds, -min-flows, -max-trials, -connects and -tcp-transfers must be positive, -max-flows at least -min-flows")
	}
	return o, nil
}

// variant is an agent run with extra flags, compared with the defaults.
type variant struct {
	name  string
	flags []string
	// check, when set, verifies after the run that the agent measured
	// what the variant says.
	check func(context.Context) error
	// shown, when set, stands for flags in the results (a temporary
	// path means nothing there).
	shown []string
	// baseline names the variant this one is compared with ("": the
	// defaults).
	baseline string
}

// parseVariants parses "NAME=FLAGS;NAME=FLAGS".
func parseVariants(s string) ([]variant, error) {
	var out []variant
	for _, part := range strings.Split(s, ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		name, flags, ok := strings.Cut(part, "=")
		name = strings.TrimSpace(name)
		switch {
		case !ok || name == "" || strings.TrimSpace(flags) == "":
			return nil, fmt.Errorf("%q: want NAME=FLAGS", part)
		case name == VariantDefaults || slices.ContainsFunc(out, func(v variant) bool { return v.name == name }):
			return nil, fmt.Errorf("%q: variant name used twice (or %q, the baseline's)", name, VariantDefaults)
		}
		out = append(out, variant{name: name, flags: strings.Fields(flags)})
	}
	return out, nil
}

// agentMarks returns the marks the agent will use: mark.Default, or
// those of a --mark-mask among its flags.
func agentMarks(args []string) (mark.Layout, error) {
	if v, ok := flagValue(args, "--mark-mask"); ok {
		return mark.Parse(v)
	}
	return mark.Default, nil
}

// flagValue returns the last value given to the long flag name in args
// ("--name value" or "--name=value"), as the agent's flag parsing would.
func flagValue(args []string, name string) (v string, found bool) {
	for i, a := range args {
		if s, ok := strings.CutPrefix(a, name+"="); ok {
			v, found = s, true
		} else if a == name && i+1 < len(args) {
			v, found = args[i+1], true
		}
	}
	return v, found
}

// parseRates parses comma-separated non-negative rates.
func parseRates(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || v < 0 || math.IsInf(v, 0) {
			return nil, fmt.Errorf("bad rate %q", f)
		}
		out = append(out, v)
	}
	return out, nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(strings.ReplaceAll(f, "_", "")))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive count", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "live:", err)
		os.Exit(2)
	}
	if o.report {
		if err := writeReport(o); err != nil {
			fmt.Fprintln(os.Stderr, "live:", err)
			os.Exit(1)
		}
		return
	}
	o.pdeathsig = true
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, o, os.Stderr, func(r *Results) error { return writeJSON(o.out, r) })
	if res != nil {
		fmt.Print(summaryTables(res))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "live:", err)
		os.Exit(1)
	}
}

func writeJSON(path string, r *Results) error {
	data, err := json.MarshalIndent(r, "", " ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readJSON(path string) (*Results, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Results
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

func writeReport(o options) error {
	r, err := readJSON(o.in)
	if err != nil {
		return err
	}
	md := renderReport(r, o.plots)
	if o.markdown == "" {
		_, err = io.WriteString(os.Stdout, md)
		return err
	}
	return os.WriteFile(o.markdown, []byte(md), 0o644)
}
