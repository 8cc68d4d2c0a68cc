package main

import (
	"flag"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func TestConnectStats(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 1000; i++ {
		d = append(d, time.Duration(i)*time.Microsecond)
	}
	c := connectStats(d, 2)
	if c.N != 1000 || c.Failures != 2 || c.P50 != 500 || c.P90 != 900 || c.P99 != 990 || c.Max != 1000 {
		t.Errorf("connectStats = %+v", c)
	}
	if len(c.Quantiles) != 201 || c.Quantiles[0] != 1 || c.Quantiles[100] != 500 || c.Quantiles[200] != 1000 {
		t.Errorf("quantiles: %d values, 0th %v, 50th %v, 100th %v", len(c.Quantiles), c.Quantiles[0], c.Quantiles[100], c.Quantiles[200])
	}
	if e := connectStats(nil, 3); e.N != 0 || e.Failures != 3 || e.Quantiles != nil {
		t.Errorf("empty connectStats = %+v", e)
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{7}, 7},
	}
	for _, tt := range tests {
		if got := median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is a number")
	}
}

// sampleRun is a small, fully determined set of results: two CIDR counts,
// three repetitions at 5,000 (one incomplete), and reloads.
func sampleRun() *Results {
	mk := func(cidrs, rep int, dp string, sustained, gbit, p50, p99 float64) Sample {
		return Sample{
			CIDRs: cidrs, KernelPrefixes: cidrs + 1, Dataplane: dp, Rep: rep, SetupSeconds: 0.5,
			NewFlows: NewFlows{Sustained: sustained, Max: 2 * sustained, MaxTrial: Trial{Undecided: Undecided{Fallback: 10}}},
			TCP:      TCP{BitsPerSecond: gbit * 1e9},
			Connect:  Connect{P50: p50, P99: p99},
		}
	}
	r := &Results{
		Machine:  Machine{Kernel: "6.18.0", CPU: "Test CPU", Cores: 2, GoVersion: "go1.26", Backend: "nft", ConntrackMax: 262144, Commit: "abc123"},
		Command:  "go run ./bench/live -reps 3",
		Started:  time.Date(2025, 1, 2, 3, 4, 0, 0, time.UTC),
		Seconds:  600,
		Settings: Settings{CIDRCounts: []int{11, 5000}, Reps: 3, TrialSeconds: 1, Tolerance: 0.03, MaxTrials: 14, MinFlows: 2000, MaxFlows: 120000, Connects: 2000, TCPSeconds: 1, TCPTransfers: 3, ReloadCIDRs: 100000, ReloadRate: 2000},
	}
	for rep := 0; rep < 3; rep++ {
		f := 1 + 0.1*float64(rep)
		r.Samples = append(r.Samples,
			mk(11, rep, Agent, 60000*f, 9.7*f, 70, 140),
			mk(11, rep, Chain, 100000*f, 10*f, 20, 60),
			mk(11, rep, IPSet, 100000*f, 10*f, 20, 60),
			mk(5000, rep, Agent, 50000*f, 9.8, 40, 100),
			mk(5000, rep, IPSet, 55000*f, 10, 20, 60))
		if rep < 2 {
			r.Samples = append(r.Samples, mk(5000, rep, Chain, 10000*f, 10, 200, 400))
		}
	}
	for rep, secs := range []float64{0.15, 0.25, 0.18} {
		r.Reloads = append(r.Reloads, Reload{Rep: rep, FromCIDRs: 11, ToCIDRs: 100000, Seconds: secs, Applied: secs + 0.3,
			Load: Trial{Sent: 1000, Delivered: 1000}})
	}
	return r
}

func TestSummarise(t *testing.T) {
	sums := summarise(sampleRun().Samples)
	if len(sums) != 6 {
		t.Fatalf("%d summaries, want 6", len(sums))
	}
	first, last := sums[0], sums[len(sums)-1]
	if first.CIDRs != 11 || first.Dataplane != Agent || first.Reps != 3 || math.Abs(first.Sustained-66000) > 1e-6 {
		t.Errorf("first summary %+v", first)
	}
	if last.CIDRs != 5000 || last.Dataplane != IPSet {
		t.Errorf("last summary %+v", last)
	}
	for _, s := range sums {
		if s.CIDRs == 5000 && s.Dataplane == Chain && (s.Reps != 2 || math.Abs(s.Sustained-10500) > 1e-6) {
			t.Errorf("chain at 5000: %+v, want 2 reps, median 10500", s)
		}
	}
}

func TestPaired(t *testing.T) {
	r := sampleRun()
	sustained := func(s Sample) float64 { return s.NewFlows.Sustained }
	p50 := func(s Sample) float64 { return s.Connect.P50 }
	tests := []struct {
		cidrs  int
		a, b   string
		f      func(Sample) float64
		diff   bool
		want   float64
		wantOK bool
	}{
		{11, Agent, IPSet, sustained, false, 0.6, true},
		{5000, Agent, Chain, sustained, false, 5, true}, // only the two repetitions with both
		{11, Agent, IPSet, p50, true, 50, true},
		{42, Agent, IPSet, p50, true, 0, false},
	}
	for _, tt := range tests {
		got, ok := paired(r.Samples, tt.cidrs, tt.a, tt.b, tt.f, tt.diff)
		if ok != tt.wantOK || (ok && math.Abs(got-tt.want) > 1e-9) {
			t.Errorf("paired(%d, %s, %s, diff %v) = %v, %v; want %v, %v", tt.cidrs, tt.a, tt.b, tt.diff, got, ok, tt.want, tt.wantOK)
		}
	}
}

func TestTargets(t *testing.T) {
	got := map[string]string{}
	for _, tg := range targets(sampleRun()) {
		got[tg.What+" @ "+tg.Scope] = tg.Measured + " " + tg.status()
	}
	want := map[string]string{
		"new flows/s ≥ 0.8 × ipset, 0 undecided @ 11 CIDRs":           "0.60 × **missed**",
		"new flows/s ≥ 0.8 × ipset, 0 undecided @ 5,000 CIDRs":        "0.91 × **met**",
		"new flows/s ≥ 3 × ip-masq-agent chain @ 5,000 CIDRs":         "5.00 × **met**",
		"established TCP ≥ 0.97 × kernel only @ 11 CIDRs":             "0.970 × ipset, 0.970 × chain **met**",
		"established TCP ≥ 0.97 × kernel only @ 5,000 CIDRs":          "0.980 × ipset, 0.980 × chain **met**",
		"added connect latency p50 ≤ 30 µs (vs ipset) @ 11 CIDRs":     "+50.0 µs **missed**",
		"added connect latency p99 ≤ 150 µs (vs ipset) @ 11 CIDRs":    "+80.0 µs **met**",
		"added connect latency p50 ≤ 30 µs (vs ipset) @ 5,000 CIDRs":  "+20.0 µs **met**",
		"added connect latency p99 ≤ 150 µs (vs ipset) @ 5,000 CIDRs": "+40.0 µs **met**",
		"reload ≤ 200 ms, no verdict lost @ 100,000 CIDRs config":     "180 ms median (kernel fallback: 480 ms), 0 flows undecided or lost **met**",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d targets, want %d: %v", len(got), len(want), got)
	}
}

func TestRenderReportGolden(t *testing.T) {
	got := renderReport(sampleRun(), "benchmarks")
	path := filepath.Join("testdata", "report.golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("report differs from %s (run with -update and review the diff):\n%s", path, got)
	}
	for _, s := range []string{"![new flows per second", "benchmarks/connect-cdf.png", "| 6.18.0 | Test CPU | 2 |"} {
		if !strings.Contains(got, s) {
			t.Errorf("report lacks %q", s)
		}
	}
}

func TestThousands(t *testing.T) {
	for in, want := range map[int]string{0: "0", 11: "11", 1000: "1,000", 50000: "50,000", 1234567: "1,234,567"} {
		if got := thousands(in); got != want {
			t.Errorf("thousands(%d) = %q, want %q", in, got, want)
		}
	}
}

func TestPollingTable(t *testing.T) {
	ps := []PollSample{
		{Variant: "benchmarked flags", Rep: 0, CPU: []CPUAt{{Rate: 0, Cores: 0, Pass: true}, {Rate: 1000, Cores: 0.02, Pass: true}}, Connect: Connect{P50: 30, P99: 130}},
		{Variant: "--busy-poll=50us", Rep: 0, CPU: []CPUAt{{Rate: 0, Cores: 0.001, Pass: true}, {Rate: 1000, Cores: 0.4, Pass: false}}, Connect: Connect{P50: 20, P99: 60}},
		{Variant: "benchmarked flags", Rep: 1, CPU: []CPUAt{{Rate: 0, Cores: 0, Pass: true}, {Rate: 1000, Cores: 0.04, Pass: true}}, Connect: Connect{P50: 32, P99: 140}},
	}
	got := pollingTable(ps)
	for _, want := range []string{
		"| agent | CPU idle | CPU at 1.0k/s | connect p50 µs | connect p99 µs |",
		"| benchmarked flags | 0.000 | 0.030 | 31.0 | 135.0 |",
		"| --busy-poll=50us | 0.001 | 0.400 (a burst failed) | 20.0 | 60.0 |",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
}
