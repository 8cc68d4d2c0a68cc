package who

import (
	"bytes"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/flowlog"
)

var t0 = time.Date(2026, 12, 6, 17, 28, 0, 0, time.UTC)

// rec builds a flow-log line with the agent's own encoder.
func rec(r flowlog.Record) string { return string(flowlog.AppendJSON(nil, &r)) }

var (
	pod4   = netip.MustParseAddrPort("10.244.0.2:40112")
	remote = netip.MustParseAddrPort("11.0.0.10:443")
	node4  = netip.MustParseAddrPort("192.168.77.1:61417")
)

func decision(src, dst netip.AddrPort, at time.Time, pod, action string) flowlog.Record {
	return flowlog.Record{Kind: flowlog.KindDecision, Time: at, Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
		Action: action, Source: "none", PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 2, Queue: 1, Latency: time.Microsecond}
}

func natRec(src, dst, xlate netip.AddrPort, at time.Time, pod string, id uint32) flowlog.Record {
	return flowlog.Record{Kind: flowlog.KindNat, Time: at, Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
		Action: "masquerade", Xlate: xlate, ConntrackID: id}
}

func endRec(src, dst, xlate netip.AddrPort, start, at time.Time, pod string, id uint32) flowlog.Record {
	r := flowlog.Record{Kind: flowlog.KindEnd, Time: at, Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
		Action: "masquerade", Xlate: xlate, ConntrackID: id, Accounted: true, PacketsOrig: 10, BytesOrig: 1000,
		PacketsReply: 8, BytesReply: 9000, Start: start, Duration: at.Sub(start)}
	if !xlate.IsValid() {
		r.Action = "passthrough"
	}
	return r
}

// run joins lines under q and returns the matching flows and the stats.
func run(t *testing.T, q Query, lines ...string) ([]*Flow, Stats) {
	t.Helper()
	var got []*Flow
	j := NewJoiner(q, Options{}, func(f *Flow) { got = append(got, f) })
	if err := j.Read(strings.NewReader(strings.Join(lines, "")), "test"); err != nil {
		t.Fatal(err)
	}
	j.Finish()
	return got, j.Stats()
}

func TestTranslatedAt(t *testing.T) {
	start := t0.Add(16 * time.Second)
	lines := []string{
		rec(decision(pod4, remote, start, "default/web", "masquerade")),
		rec(natRec(pod4, remote, node4, start.Add(time.Millisecond), "default/web", 77)),
		// Another pod's flow, translated to another port.
		rec(decision(netip.MustParseAddrPort("10.244.0.3:40112"), remote, start, "default/db", "masquerade")),
		rec(natRec(netip.MustParseAddrPort("10.244.0.3:40112"), remote, netip.MustParseAddrPort("192.168.77.1:1025"), start, "default/db", 78)),
		rec(endRec(pod4, remote, node4, start, start.Add(time.Hour), "default/web", 77)),
	}
	for _, tt := range []struct {
		name string
		at   time.Time
		want int
	}{
		{"during", start.Add(30 * time.Minute), 1},
		{"at the start", start, 1},
		{"just before the start, within the tolerance", start.Add(-500 * time.Millisecond), 1},
		{"before the start", start.Add(-2 * time.Second), 0},
		{"after the end, within the tolerance", start.Add(time.Hour + 500*time.Millisecond), 1},
		{"after the end", start.Add(time.Hour + 2*time.Second), 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, _ := run(t, Query{Translated: node4, At: tt.at, Tolerance: time.Second}, lines...)
			if len(got) != tt.want {
				t.Fatalf("%d flows, want %d: %v", len(got), tt.want, got)
			}
			if tt.want == 0 {
				return
			}
			f := got[0]
			if f.Pod != "default/web" || f.Src != "10.244.0.2" || *f.Sport != 40112 || f.XlateSrc != "192.168.77.1" || *f.XlateSport != 61417 ||
				f.Action != "masquerade" || f.Source != "none" || f.PolicyHash != "3f1a9c0d5e7b2a41" || f.ConntrackID != 77 ||
				!f.Start.Equal(start) || f.End == nil || !f.End.Equal(start.Add(time.Hour)) || f.Open ||
				!slices.Equal(f.Records, []string{"decision", "nat", "end"}) || *f.BytesReply != 9000 {
				b, _ := json.Marshal(f)
				t.Errorf("joined flow %s", b)
			}
		})
	}
}

// An open flow (no end yet) is answered from its nat record.
func TestOpenFlow(t *testing.T) {
	start := t0
	got, _ := run(t, Query{Translated: node4, At: start.Add(5 * time.Hour)},
		rec(decision(pod4, remote, start, "default/web", "masquerade")),
		rec(natRec(pod4, remote, node4, start, "default/web", 77)))
	if len(got) != 1 || !got[0].Open || got[0].End != nil || got[0].Pod != "default/web" {
		t.Fatalf("open flow: %v", got)
	}
}

// Records of one flow out of order: the nat record before the decision
// (which waited for the pod's name), and the end before the decision.
func TestOutOfOrder(t *testing.T) {
	start := t0
	lines := []string{
		rec(natRec(pod4, remote, node4, start.Add(time.Millisecond), "", 77)),
		rec(endRec(pod4, remote, node4, start, start.Add(time.Second), "", 77)),
		rec(decision(pod4, remote, start, "default/web", "masquerade")),
		// Later records move the log's clock past the window.
		rec(decision(netip.MustParseAddrPort("10.244.0.9:1"), remote, start.Add(time.Minute), "x/y", "masquerade")),
	}
	got, st := run(t, Query{Translated: node4, At: start.Add(500 * time.Millisecond)}, lines...)
	if len(got) != 1 || got[0].Pod != "default/web" || !slices.Equal(got[0].Records, []string{"decision", "nat", "end"}) || got[0].Open {
		t.Fatalf("flows %v, stats %+v", got, st)
	}
}

// A 5-tuple reused by a later flow: the two are told apart by the
// conntrack id and by time.
func TestReusedTuple(t *testing.T) {
	first, second := t0, t0.Add(10*time.Minute)
	other := netip.MustParseAddrPort("192.168.77.1:2000")
	got, _ := run(t, Query{Pod: "default/web"},
		rec(decision(pod4, remote, first, "default/web", "masquerade")),
		rec(natRec(pod4, remote, node4, first, "default/web", 1)),
		rec(endRec(pod4, remote, node4, first, first.Add(time.Minute), "default/web", 1)),
		rec(decision(pod4, remote, second, "default/web", "masquerade")),
		rec(natRec(pod4, remote, other, second, "default/web", 2)),
	)
	if len(got) != 2 || got[0].ConntrackID != 1 || got[1].ConntrackID != 2 || *got[1].XlateSport != 2000 || !got[1].Open || got[0].Open {
		t.Fatalf("flows: %+v %+v", got[0], got[len(got)-1])
	}
}

// A decision whose end record is lost, then the same 5-tuple again: the
// first is answered as open, the second joined on its own.
func TestLostEnd(t *testing.T) {
	got, _ := run(t, Query{Pod: "default/web"},
		rec(decision(pod4, remote, t0, "default/web", "masquerade")),
		rec(decision(pod4, remote, t0.Add(time.Hour), "default/web", "masquerade")),
		rec(endRec(pod4, remote, node4, t0.Add(time.Hour), t0.Add(2*time.Hour), "default/web", 5)),
	)
	if len(got) != 2 || !got[0].Open || got[1].Open || !got[1].Start.Equal(t0.Add(time.Hour)) {
		t.Fatalf("flows %v", got)
	}
}

func TestPodAndDstQueries(t *testing.T) {
	other := netip.MustParseAddrPort("10.244.0.3:5000")
	dns := netip.MustParseAddrPort("10.96.0.10:53")
	lines := []string{
		rec(decision(pod4, remote, t0, "default/web", "masquerade")),
		rec(endRec(pod4, remote, node4, t0, t0.Add(time.Minute), "default/web", 1)),
		rec(decision(other, dns, t0.Add(time.Hour), "kube-system/dns", "passthrough")),
		rec(endRec(other, dns, netip.AddrPort{}, t0.Add(time.Hour), t0.Add(2*time.Hour), "kube-system/dns", 2)),
	}
	for _, tt := range []struct {
		name string
		q    Query
		want []uint32
	}{
		{"pod", Query{Pod: "default/web"}, []uint32{1}},
		{"pod in a window", Query{Pod: "kube-system/dns", Since: t0.Add(90 * time.Minute), Until: t0.Add(3 * time.Hour)}, []uint32{2}},
		{"pod outside the window", Query{Pod: "default/web", Since: t0.Add(time.Hour)}, nil},
		{"dst", Query{Dst: dns.Addr()}, []uint32{2}},
		{"dst and port", Query{Dst: remote.Addr(), DstPort: 443}, []uint32{1}},
		{"dst, other port", Query{Dst: remote.Addr(), DstPort: 80}, nil},
		{"proto", Query{Proto: "udp"}, nil},
		{"everything", Query{}, []uint32{1, 2}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, _ := run(t, tt.q, lines...)
			var ids []uint32
			for _, f := range got {
				ids = append(ids, f.ConntrackID)
			}
			if !slices.Equal(ids, tt.want) {
				t.Errorf("flows %v, want %v", ids, tt.want)
			}
		})
	}
}

// What the agent can write that is not a whole record: a line cut by
// rotation or by a failed write, a gap record, and lines of other
// programs. They are counted; the records around them still join.
func TestMalformedAndGaps(t *testing.T) {
	end := rec(endRec(pod4, remote, node4, t0, t0.Add(time.Minute), "default/web", 1))
	gap := flowlog.Record{Kind: flowlog.KindGap, Time: t0, Gap: &flowlog.Gap{Start: t0.Add(-time.Second), End: t0}}
	gap.Gap.Dropped[flowlog.ReasonOverflow][flowlog.KindEnd] = 31
	gap.Gap.Dropped[flowlog.ReasonKernelOverrun][flowlog.KindNat] = 2
	lines := []string{
		rec(decision(pod4, remote, t0, "default/web", "masquerade")),
		end[:len(end)/2] + "\n", // cut short by a failed write
		"not json\n",
		rec(gap),
		`{"v":1,"kind":"end","time":"yesterday","proto":"tcp","src":"10.244.0.2","dst":"11.0.0.10"}` + "\n",
		`{"v":2,"kind":"future-kind","time":"2026-12-06T17:28:00Z"}` + "\n",
		end,
		end[:len(end)/3], // the last line of a file cut by rotation, no newline
	}
	got, st := run(t, Query{}, lines...)
	if len(got) != 1 || got[0].Open {
		t.Errorf("flows %v", got)
	}
	if st.Malformed != 4 || st.Skipped != 1 || st.Lost != 33 || !st.LostFrom.Equal(t0.Add(-time.Second)) || !st.LostTo.Equal(t0) || !strings.HasPrefix(st.FirstMalformed, "test:2:") {
		t.Errorf("stats %+v", st)
	}
}

// The bound on open flows gives up the oldest, counted.
func TestMaxOpen(t *testing.T) {
	var lines []string
	for i := range 100 {
		lines = append(lines, rec(decision(netip.AddrPortFrom(pod4.Addr(), uint16(1000+i)), remote, t0.Add(time.Duration(i)*time.Second), "default/web", "masquerade")))
	}
	var got []*Flow
	j := NewJoiner(Query{}, Options{MaxOpen: 10}, func(f *Flow) { got = append(got, f) })
	if err := j.Read(strings.NewReader(strings.Join(lines, "")), "t"); err != nil {
		t.Fatal(err)
	}
	if len(j.open) > 10 || j.Stats().Evicted != 90 || len(got) != 90 || *got[0].Sport != 1000 {
		t.Fatalf("%d open, %d evicted, %d emitted", len(j.open), j.Stats().Evicted, len(got))
	}
	j.Finish()
	if len(got) != 100 {
		t.Errorf("%d flows after Finish", len(got))
	}
}

// The agent's own golden records all scan as what encoding/json reads.
func TestGoldenRecordsScan(t *testing.T) {
	files, err := filepath.Glob("../flowlog/testdata/*.golden")
	if err != nil || len(files) == 0 {
		t.Fatal("no golden records", err)
	}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
			checkOracle(t, line)
		}
	}
}

// Memory stays flat over a long log: the join holds the flows open in it
// (the synthetic log has 4,096 at a time), not the log. A million records
// (about 330 MB; fewer under the race detector) are streamed through a
// pipe while the heap is sampled.
func TestMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("streams a million records")
	}
	flows := 340000 // 1,020,000 records
	if raceEnabled {
		flows = 20000
	}
	pr, pw := io.Pipe()
	go func() { SyntheticLog(pw, flows); pw.Close() }()
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	j := NewJoiner(Query{}, Options{}, func(*Flow) {}) // every flow matches: nothing is skipped
	if err := j.Read(pr, "pipe"); err != nil {
		t.Fatal(err)
	}
	open := len(j.open)
	j.Finish()
	close(stop)
	<-sampled
	st := j.Stats()
	if st.Records != uint64(3*flows) || st.Matched != uint64(flows) {
		t.Fatalf("read %d records, matched %d flows; want %d records and %d flows", st.Records, st.Matched, 3*flows, flows)
	}
	if open > 4096 {
		t.Errorf("%d flows held open at the end of the log, want at most the 4,096 open in it", open)
	}
	if p := peak.Load(); p > 64<<20 {
		t.Errorf("heap peaked at %d MB over %d records", p>>20, st.Records)
	} else {
		t.Logf("heap peaked at %.1f MB over %d records", float64(p)/(1<<20), st.Records)
	}
}
