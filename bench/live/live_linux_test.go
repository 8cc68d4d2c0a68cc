//go:build linux

package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// TestShortRun runs the whole benchmark in -short mode, so the suite
// cannot rot: every dataplane is set up, measured and removed, and the
// report renders. It checks that each measurement produced a number, not
// what the number is (the CI machine's load decides that).
func TestShortRun(t *testing.T) {
	netnstest.Require(t, "iptables", "iptables-save", "iptables-restore", "ipset", "go")
	o, err := parseFlags([]string{"-short"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o.tmp = t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	saves := 0
	res, err := run(ctx, o, testWriter{t}, func(*Results) error { saves++; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Samples) != len(dataplanes) || saves < len(dataplanes) {
		t.Fatalf("%d samples, %d saves; want one per dataplane", len(res.Samples), saves)
	}
	for _, s := range res.Samples {
		if len(s.NewFlows.Trials) == 0 || s.NewFlows.MaxTrial.Sent == 0 {
			t.Errorf("%s: no new-flow bursts: %+v", s.Dataplane, s.NewFlows)
		}
		for _, tr := range append(s.NewFlows.Trials, s.NewFlows.MaxTrial) {
			if tr.Delivered > tr.Sent || tr.Masqueraded > tr.Delivered {
				t.Errorf("%s: burst accounts for more flows than it sent: %+v", s.Dataplane, tr)
			}
		}
		if s.TCP.BitsPerSecond <= 0 {
			t.Errorf("%s: no TCP throughput", s.Dataplane)
		}
		if s.Connect.N+s.Connect.Failures != o.connects || len(s.Connect.Quantiles) != 201 {
			t.Errorf("%s: connect stats %+v", s.Dataplane, s.Connect)
		}
		if (s.Dataplane == Agent) != (s.FlowLog != nil) {
			t.Errorf("%s: flow log stats %+v", s.Dataplane, s.FlowLog)
		}
		if s.FlowLog != nil && s.FlowLog.Written["decision"] == 0 {
			t.Errorf("agent logged no decision: %+v", s.FlowLog)
		}
	}
	if len(res.Reloads) != 1 || res.Reloads[0].Seconds <= 0 || res.Reloads[0].Load.Sent == 0 {
		t.Errorf("reloads %+v", res.Reloads)
	}
	md := renderReport(res, "benchmarks")
	if !strings.Contains(md, "-short") || !strings.Contains(md, "| 11 |") {
		t.Errorf("report of a short run:\n%s", md)
	}
}

// testWriter sends progress lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
