package flowlog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// lines is a sink that keeps what it receives, safe to read while the
// Logger writes.
type lines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *lines) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *lines) records(t testing.TB) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return parseLines(t, s.buf.Bytes())
}

// parseLines decodes JSON lines, failing t on any line that is not exactly
// one JSON object.
func parseLines(t testing.TB, b []byte) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil || dec.More() {
			t.Fatalf("line is not one JSON object (%v): %q", err, sc.Text())
		}
		out = append(out, m)
	}
	return out
}

func decision(i int) Record {
	return Record{
		Kind: KindDecision, Proto: 17,
		Src:    netip.AddrPortFrom(netip.MustParseAddr("10.244.0.2"), uint16(i)),
		Dst:    netip.MustParseAddrPort("11.0.0.10:53"),
		Action: "masquerade", Source: "default", PolicyHash: "h", Latency: time.Microsecond,
	}
}

func count(recs []map[string]any, kind string) int {
	n := 0
	for _, r := range recs {
		if r["kind"] == kind {
			n++
		}
	}
	return n
}

// gapTotals sums the counts of all gap records by reason.
func gapTotals(recs []map[string]any) map[string]uint64 {
	sum := map[string]uint64{}
	for _, r := range recs {
		if r["kind"] != "gap" {
			continue
		}
		for reason, kinds := range r["dropped"].(map[string]any) {
			for _, n := range kinds.(map[string]any) {
				v, _ := n.(json.Number).Int64()
				sum[reason] += uint64(v)
			}
		}
	}
	return sum
}

func newLogger(t testing.TB, opts Options) *Logger {
	t.Helper()
	l, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func TestLogWritesEveryKind(t *testing.T) {
	sink := &lines{}
	l := newLogger(t, Options{Writer: sink, Node: "node-a"})
	l.Log(decision(1))
	end := goldenRecords["end"][0]
	end.Node = ""
	l.Log(end)
	l.Log(goldenRecords["fallback"][0])
	l.Log(Record{Kind: KindGap}) // not the caller's to write
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	recs := sink.records(t)
	if len(recs) != 3 {
		t.Fatalf("got %d records, want 3: %v", len(recs), recs)
	}
	for i, kind := range []string{"decision", "end", "fallback"} {
		if recs[i]["kind"] != kind || recs[i]["node"] != "node-a" {
			t.Errorf("record %d = %v, want kind %s on node-a", i, recs[i], kind)
		}
	}
	if _, ok := recs[0]["time"].(string); !ok {
		t.Errorf("Log did not stamp the time: %v", recs[0])
	}
	st := l.Stats()
	if st.Written != [NumKinds]uint64{1, 1, 1, 0} {
		t.Errorf("Stats.Written = %v", st.Written)
	}
	l.Log(decision(2))
	if st := l.Stats(); st.Dropped[ReasonClosed][KindDecision] != 1 {
		t.Errorf("Log after Close not counted: %v", st.Dropped)
	}
}

func TestHostileNamesThroughLogger(t *testing.T) {
	sink := &lines{}
	l := newLogger(t, Options{Writer: sink, Node: "n\"\n{"})
	for _, pod := range []string{"a\"b", "x\n{\"kind\":\"end\"}", "\u2028", "\xff", "ns/ü🙂"} {
		r := decision(1)
		r.Pod = pod
		l.Log(r)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	recs := sink.records(t)
	if len(recs) != 5 || count(recs, "decision") != 5 {
		t.Fatalf("got %d records (%d decisions), want 5: %v", len(recs), count(recs, "decision"), recs)
	}
}

// stalledPipe returns a pipe whose reader nobody reads until drain is
// called; drain copies everything into a buffer returned by wait.
type stalledPipe struct {
	r, w *os.File
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
}

func newStalledPipe(t testing.TB) *stalledPipe {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return &stalledPipe{r: r, w: w, done: make(chan struct{})}
}

func (p *stalledPipe) drain() {
	go func() {
		defer close(p.done)
		buf := make([]byte, 64<<10)
		for {
			n, err := p.r.Read(buf)
			p.mu.Lock()
			p.out.Write(buf[:n])
			p.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
}

func (p *stalledPipe) bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.out.Bytes())
}

func TestStalledSink(t *testing.T) {
	pipe := newStalledPipe(t)
	l := newLogger(t, Options{Writer: pipe.w, Buffer: 256, CheckInterval: 10 * time.Millisecond})
	const producers, each = 4, 20000
	var wg sync.WaitGroup
	for p := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				l.Log(decision(p*each + i))
			}
		}()
	}
	// Every Log call returns although nobody reads the sink.
	wg.Wait()
	st := l.Stats()
	if st.Dropped[ReasonOverflow][KindDecision] == 0 {
		t.Fatalf("no overflow counted with a stalled sink: %+v", st)
	}

	pipe.drain()
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "a gap record after the sink drains", func() bool {
		return strings.Contains(string(pipe.bytes()), `"kind":"gap"`)
	})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	pipe.w.Close()
	<-pipe.done

	recs := parseLines(t, pipe.bytes())
	st = l.Stats()
	written, dropped := uint64(count(recs, "decision")), st.Dropped[ReasonOverflow][KindDecision]
	if written != st.Written[KindDecision] || written+dropped != producers*each {
		t.Errorf("written %d (stats %d) + dropped %d != sent %d", written, st.Written[KindDecision], dropped, producers*each)
	}
	if got := gapTotals(recs)["overflow"]; got != dropped {
		t.Errorf("gap records report %d overflow drops, stats %d", got, dropped)
	}
	t.Logf("sent %d, written %d, dropped %d, gap records %d", producers*each, written, dropped, count(recs, "gap"))
}

// flaky fails every write while broken is set, optionally after writing
// part of the buffer (a short write, as a full disk gives).
type flaky struct {
	lines
	broken  atomic.Bool
	partial atomic.Bool
	fails   atomic.Int64
}

func (f *flaky) Write(p []byte) (int, error) {
	if f.broken.Load() {
		f.fails.Add(1)
		if f.partial.Load() && len(p) > 10 {
			n, _ := f.lines.Write(p[:len(p)/2+3])
			return n, errors.New("no space left on device")
		}
		return 0, errors.New("no space left on device")
	}
	return f.lines.Write(p)
}

func TestWriteErrors(t *testing.T) {
	for _, partial := range []bool{false, true} {
		t.Run(map[bool]string{false: "clean", true: "partial"}[partial], func(t *testing.T) {
			sink := &flaky{}
			sink.partial.Store(partial)
			l := newLogger(t, Options{Writer: sink, CheckInterval: 5 * time.Millisecond})
			sent := 0
			logN := func(n int) {
				for range n {
					l.Log(decision(sent))
					sent++
				}
			}
			logN(10)
			netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "the first records", func() bool { return l.Stats().Written[KindDecision] == 10 })
			sink.broken.Store(true)
			logN(50)
			netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "write errors", func() bool {
				st := l.Stats()
				return st.Written[KindDecision]+st.Dropped[ReasonWriteError][KindDecision] == 60
			})
			if sink.fails.Load() == 0 || l.Stats().WriteErrors == 0 {
				t.Fatal("the broken sink was never written")
			}
			sink.broken.Store(false)
			logN(10)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}

			// The half line a short write left is followed by a newline, so
			// every other line is a whole record.
			var good []byte
			sink.mu.Lock()
			for line := range bytes.Lines(sink.buf.Bytes()) {
				if json.Valid(line) {
					good = append(good, line...)
				} else if !partial {
					t.Errorf("invalid line without short writes: %q", line)
				}
			}
			sink.mu.Unlock()
			recs := parseLines(t, good)
			st := l.Stats()
			lost := st.Dropped[ReasonWriteError][KindDecision]
			if uint64(count(recs, "decision")) != st.Written[KindDecision] || st.Written[KindDecision]+lost != uint64(sent) {
				t.Errorf("decisions: %d lines, %d written, %d lost, %d sent", count(recs, "decision"), st.Written[KindDecision], lost, sent)
			}
			if got := gapTotals(recs)["write_error"]; got != lost || lost == 0 {
				t.Errorf("gap records report %d write errors, stats %d", got, lost)
			}
			if st.LastWriteError != "no space left on device" {
				t.Errorf("LastWriteError = %q", st.LastWriteError)
			}
		})
	}
}

func TestSamplingAndCeiling(t *testing.T) {
	tests := []struct {
		name              string
		opts              Options
		decisions, ends   int
		wantDecisions     int // -1: only checked against the counters
		wantSampled       uint64
		wantRateLimitLoss bool
	}{
		{name: "all", opts: Options{}, decisions: 100, ends: 5, wantDecisions: 100},
		{name: "sample-1", opts: Options{Sample: 1}, decisions: 100, ends: 5, wantDecisions: 100},
		{name: "sample-10", opts: Options{Sample: 10}, decisions: 1000, ends: 5, wantDecisions: 100, wantSampled: 900},
		{name: "ceiling", opts: Options{Ceiling: 50}, decisions: 1000, ends: 5, wantDecisions: -1, wantRateLimitLoss: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sink := &lines{}
			tt.opts.Writer = sink
			l := newLogger(t, tt.opts)
			for i := range tt.decisions {
				l.Log(decision(i))
			}
			for range tt.ends {
				l.Log(goldenRecords["end"][0])
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			recs := sink.records(t)
			st := l.Stats()
			got := count(recs, "decision")
			if tt.wantDecisions >= 0 && got != tt.wantDecisions {
				t.Errorf("%d decision records, want %d", got, tt.wantDecisions)
			}
			if st.Dropped[ReasonSampled][KindDecision] != tt.wantSampled {
				t.Errorf("sampled = %d, want %d", st.Dropped[ReasonSampled][KindDecision], tt.wantSampled)
			}
			limited := st.Dropped[ReasonRateLimit][KindDecision] + st.Dropped[ReasonRateLimit][KindEnd]
			if (limited > 0) != tt.wantRateLimitLoss {
				t.Errorf("rate-limited = %d", limited)
			}
			flows := uint64(count(recs, "decision") + count(recs, "end"))
			if flows+st.Dropped[ReasonSampled][KindDecision]+limited != uint64(tt.decisions+tt.ends) {
				t.Errorf("records written %d + sampled + limited %d != logged %d", flows, limited, tt.decisions+tt.ends)
			}
			gaps := gapTotals(recs)
			if gaps["ratelimit"] != limited || gaps["sampled"] != 0 {
				t.Errorf("gap records report %v, want ratelimit %d and no sampling", gaps, limited)
			}
			for _, r := range recs {
				if r["kind"] == "decision" && tt.opts.Sample > 1 && r["sample"] != json.Number("10") {
					t.Errorf("sampled decision record without its rate: %v", r)
					break
				}
			}
		})
	}
}

func TestReportLost(t *testing.T) {
	sink := &lines{}
	l := newLogger(t, Options{Writer: sink, CheckInterval: 5 * time.Millisecond})
	l.ReportLost(ReasonKernelOverrun, KindEnd, 3)
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "a gap record", func() bool { return l.Stats().Written[KindGap] == 1 })
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	recs := sink.records(t)
	if len(recs) != 1 || gapTotals(recs)["kernel_overrun"] != 3 {
		t.Fatalf("records = %v", recs)
	}
	start, _ := time.Parse(time.RFC3339Nano, recs[0]["start"].(string))
	end, _ := time.Parse(time.RFC3339Nano, recs[0]["end"].(string))
	if !start.Before(end) {
		t.Errorf("gap interval %v..%v is empty", start, end)
	}
}

func TestCloseTimesOutOnStalledSink(t *testing.T) {
	pipe := newStalledPipe(t)
	l, err := New(Options{Writer: pipe.w, Buffer: 1024, CloseTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// More than the pipe (64 KiB) and the buffer hold: the writer is
	// necessarily blocked at the end.
	for i := range 5000 {
		l.Log(decision(i))
	}
	if err := l.Close(); err == nil {
		t.Fatal("Close returned nil with a stalled sink")
	}
	st := l.Stats()
	if st.Dropped[ReasonClosed][KindDecision]+st.Dropped[ReasonOverflow][KindDecision] == 0 {
		t.Errorf("nothing counted as lost: %+v", st)
	}
	pipe.r.Close() // the writer's blocked Write now fails and it exits
	<-l.done
}

func TestOff(t *testing.T) {
	l, err := New(Options{Sink: Sink{Kind: SinkOff}})
	if err != nil {
		t.Fatal(err)
	}
	l.Log(decision(1))
	l.ReportLost(ReasonOverflow, KindEnd, 1)
	if st := l.Stats(); st != (Stats{}) {
		t.Errorf("off logger counted %+v", st)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestLogDoesNotAllocate(t *testing.T) {
	l := newLogger(t, Options{Writer: io.Discard, Buffer: 1 << 16, Sample: 2, Ceiling: 1 << 30})
	r := decision(1)
	r.Time = t0
	if n := testing.AllocsPerRun(1000, func() { l.Log(r) }); n != 0 {
		t.Errorf("Log allocates %.1f times per call", n)
	}
}

// BenchmarkLog measures the producer's cost of Log: with a sink that keeps
// up, and with a stalled one (every call then drops). The second must not
// be slower than the first: a stalled sink costs the dataplane nothing.
func BenchmarkLog(b *testing.B) {
	r := decision(1)
	r.Time = t0
	b.Run("draining", func(b *testing.B) {
		l, _ := New(Options{Writer: io.Discard})
		defer l.Close()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.Log(r)
			}
		})
	})
	b.Run("stalled", func(b *testing.B) {
		pipe := newStalledPipe(b)
		l, _ := New(Options{Writer: pipe.w, CloseTimeout: time.Millisecond})
		defer func() { l.Close(); pipe.r.Close() }()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.Log(r)
			}
		})
		st := l.Stats()
		b.ReportMetric(float64(st.Dropped[ReasonOverflow][KindDecision])/float64(b.N), "dropped/op")
	})
}
