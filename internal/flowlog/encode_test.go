package flowlog

import (
	"bytes"
	"encoding/json"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

var (
	t0 = time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC)
	// Records covering each kind and the optional fields on and off.
	goldenRecords = map[string][]Record{
		"decision": {
			{
				Kind: KindDecision, Time: t0, Node: "node-a", Proto: 6,
				Src: netip.MustParseAddrPort("10.244.0.2:40112"),
				Dst: netip.MustParseAddrPort("10.200.0.10:443"),
				Pod: "default/web-5d9c7", Action: "passthrough",
				Prefix: netip.MustParsePrefix("10.0.0.0/8"), Source: "config",
				PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 4, Queue: 1, Latency: 12345 * time.Nanosecond,
			},
			{
				Kind: KindDecision, Time: t0, Node: "node-a", Proto: 17,
				Src:    netip.MustParseAddrPort("[fd00:10:244::2]:53001"),
				Dst:    netip.MustParseAddrPort("[2001:db8:100::10]:53"),
				Action: "masquerade", Source: "none",
				PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 4, Latency: 7 * time.Microsecond, Sample: 10,
			},
			{
				Kind: KindDecision, Time: t0, Node: "node-a", Proto: 1,
				Src: netip.MustParseAddrPort("10.244.0.2:0"),
				Dst: netip.MustParseAddrPort("11.0.0.10:0"),
				Pod: "prod/api-0", Action: "passthrough",
				Prefix: netip.MustParsePrefix("11.0.0.0/24"), Source: "egress-policy", Origin: "keep-source-for-partner",
				PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 5, Queue: 3, Latency: 31 * time.Microsecond,
			},
		},
		"end": {
			{
				Kind: KindEnd, Time: t0.Add(30 * time.Second), Node: "node-a", Proto: 17,
				Src: netip.MustParseAddrPort("10.244.0.2:53001"),
				Dst: netip.MustParseAddrPort("11.0.0.10:53"),
				Pod: "default/web-5d9c7", Action: "masquerade",
				Accounted: true, PacketsOrig: 1, BytesOrig: 61, PacketsReply: 1, BytesReply: 125,
				Start: t0, Duration: 30*time.Second + 1500*time.Microsecond,
				Xlate:       netip.MustParseAddrPort("192.168.77.1:61417"),
				ConntrackID: 3735928559,
			},
			{
				Kind: KindEnd, Time: t0.Add(2 * time.Second), Node: "node-a", Proto: 6,
				Src:       netip.MustParseAddrPort("[fd00:10:244::2]:40200"),
				Dst:       netip.MustParseAddrPort("[fd00:200::10]:8080"),
				Action:    "passthrough",
				Accounted: true, PacketsOrig: 6, BytesOrig: 500, PacketsReply: 4, BytesReply: 330,
				Start: t0, Duration: 2 * time.Second, ConntrackID: 17,
			},
		},
		"fallback": {
			{
				Kind: KindFallback, Time: t0.Add(time.Minute), Node: "node-a", Proto: 6,
				Src: netip.MustParseAddrPort("10.244.0.7:38000"),
				Dst: netip.MustParseAddrPort("11.0.0.10:80"),
				Pod: "default/batch-x", Action: "masquerade", Source: "kernel-fallback",
				Accounted: true, PacketsOrig: 10, BytesOrig: 1200, PacketsReply: 8, BytesReply: 9000,
				Start: t0, Duration: time.Minute,
				Xlate:       netip.MustParseAddrPort("192.168.77.1:1025"),
				ConntrackID: 99,
			},
			{
				// Accounting and timestamps off when the flow began.
				Kind: KindFallback, Time: t0, Node: "node-a", Proto: 17,
				Src:    netip.MustParseAddrPort("10.244.0.7:5000"),
				Dst:    netip.MustParseAddrPort("10.200.0.10:5000"),
				Action: "passthrough", Source: "kernel-fallback", ConntrackID: 100,
			},
		},
		"nat": {
			{
				Kind: KindNat, Time: t0.Add(200 * time.Microsecond), Node: "node-a", Proto: 17,
				Src: netip.MustParseAddrPort("10.244.0.2:53001"),
				Dst: netip.MustParseAddrPort("11.0.0.10:53"),
				Pod: "default/web-5d9c7", Action: "masquerade",
				Xlate:       netip.MustParseAddrPort("192.168.77.1:61417"),
				ConntrackID: 3735928559,
			},
			{
				Kind: KindNat, Time: t0, Node: "node-a", Proto: 6,
				Src:    netip.MustParseAddrPort("[fd00:10:244::2]:40300"),
				Dst:    netip.MustParseAddrPort("[2001:db8:100::10]:443"),
				Action: "masquerade",
				Xlate:  netip.MustParseAddrPort("[fd00:77::1]:40300"), ConntrackID: 18,
			},
			{
				// Decided by the kernel fallback while the agent was busy.
				Kind: KindNat, Time: t0, Node: "node-a", Proto: 6,
				Src: netip.MustParseAddrPort("10.244.0.7:38000"),
				Dst: netip.MustParseAddrPort("11.0.0.10:80"),
				Pod: "default/batch-x", Action: "masquerade", Source: "kernel-fallback",
				PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 4,
				Xlate:       netip.MustParseAddrPort("192.168.77.1:1025"),
				ConntrackID: 99,
			},
		},
		"gap": {
			{
				Kind: KindGap, Time: t0, Node: "node-a",
				Gap: &Gap{Start: t0.Add(-3 * time.Second), End: t0, Dropped: func() (d [NumReasons][NumKinds]uint64) {
					d[ReasonOverflow][KindDecision] = 1200
					d[ReasonOverflow][KindEnd] = 31
					d[ReasonWriteError][KindFallback] = 2
					d[ReasonKernelOverrun][KindEnd] = 1
					d[ReasonKernelOverrun][KindNat] = 2
					return d
				}()},
			},
		},
	}
)

func TestGolden(t *testing.T) {
	for name, recs := range goldenRecords {
		t.Run(name, func(t *testing.T) {
			var got []byte
			for i := range recs {
				got = AppendJSON(got, &recs[i])
			}
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("AppendJSON differs from %s (run with -update to accept):\ngot:\n%s\nwant:\n%s", path, got, want)
			}
			for i, line := range bytes.SplitAfter(bytes.TrimSuffix(got, []byte("\n")), []byte("\n")) {
				if !json.Valid(line) {
					t.Errorf("line %d is not valid JSON: %s", i, line)
				}
			}
		})
	}
}

// refRecord is the schema of flow records expressed for encoding/json: the
// reference AppendJSON must match byte for byte.
type refRecord struct {
	V            int        `json:"v"`
	Kind         string     `json:"kind"`
	Time         *time.Time `json:"time"`
	Node         string     `json:"node,omitempty"`
	Family       string     `json:"family,omitempty"`
	Proto        string     `json:"proto"`
	Src          *string    `json:"src"`
	Sport        *uint16    `json:"sport,omitempty"`
	Dst          *string    `json:"dst"`
	Dport        *uint16    `json:"dport,omitempty"`
	Pod          string     `json:"pod,omitempty"`
	Action       string     `json:"action,omitempty"`
	Prefix       string     `json:"prefix,omitempty"`
	Source       string     `json:"source,omitempty"`
	Origin       string     `json:"origin,omitempty"`
	PolicyHash   string     `json:"policy_hash,omitempty"`
	PolicyGen    *uint64    `json:"policy_generation,omitempty"`
	Queue        *uint16    `json:"queue,omitempty"`
	LatencyUS    *float64   `json:"latency_us,omitempty"`
	Sample       uint32     `json:"sample,omitempty"`
	PacketsOrig  *uint64    `json:"packets_orig,omitempty"`
	BytesOrig    *uint64    `json:"bytes_orig,omitempty"`
	PacketsReply *uint64    `json:"packets_reply,omitempty"`
	BytesReply   *uint64    `json:"bytes_reply,omitempty"`
	Start        *time.Time `json:"start,omitempty"`
	DurationMS   *float64   `json:"duration_ms,omitempty"`
	XlateSrc     string     `json:"xlate_src,omitempty"`
	XlateSport   *uint16    `json:"xlate_sport,omitempty"`
	ConntrackID  uint32     `json:"conntrack_id,omitempty"`
}

func ptr[T any](v T) *T { return &v }

func reference(r *Record) []byte {
	ref := refRecord{V: SchemaVersion, Kind: r.Kind.String(), Node: r.Node, Family: r.Family(), Proto: ProtoName(r.Proto),
		Pod: r.Pod, Action: r.Action, Source: r.Source, Origin: r.Origin, PolicyHash: r.PolicyHash}
	if !r.Time.IsZero() {
		ref.Time = ptr(r.Time.UTC())
	}
	ports := hasPorts(r.Proto)
	if r.Src.Addr().IsValid() {
		ref.Src = ptr(r.Src.Addr().Unmap().String())
		if ports {
			ref.Sport = ptr(r.Src.Port())
		}
	}
	if r.Dst.Addr().IsValid() {
		ref.Dst = ptr(r.Dst.Addr().Unmap().String())
		if ports {
			ref.Dport = ptr(r.Dst.Port())
		}
	}
	if r.Prefix.IsValid() {
		ref.Prefix = r.Prefix.String()
	}
	if r.PolicyHash != "" {
		ref.PolicyGen = ptr(r.PolicyGeneration)
	}
	if r.Kind == KindDecision {
		ref.Queue = ptr(r.Queue)
		ref.LatencyUS = ptr(float64(r.Latency.Nanoseconds()) / 1000)
		if r.Sample > 1 {
			ref.Sample = r.Sample
		}
	} else {
		if r.Accounted {
			ref.PacketsOrig, ref.BytesOrig = ptr(r.PacketsOrig), ptr(r.BytesOrig)
			ref.PacketsReply, ref.BytesReply = ptr(r.PacketsReply), ptr(r.BytesReply)
		}
		if !r.Start.IsZero() {
			ref.Start = ptr(r.Start.UTC())
			ref.DurationMS = ptr(float64(r.Duration.Microseconds()) / 1000)
		}
		if r.Xlate.IsValid() {
			ref.XlateSrc = r.Xlate.Addr().Unmap().String()
			if ports {
				ref.XlateSport = ptr(r.Xlate.Port())
			}
		}
		ref.ConntrackID = r.ConntrackID
	}
	b, err := json.Marshal(ref)
	if err != nil {
		panic(err)
	}
	return append(b, '\n')
}

func TestMatchesEncodingJSON(t *testing.T) {
	for _, kind := range []string{"decision", "end", "fallback"} {
		for i, r := range goldenRecords[kind] {
			if got, want := AppendJSON(nil, &r), reference(&r); !bytes.Equal(got, want) {
				t.Errorf("%s[%d]:\n got %s\nwant %s", kind, i, got, want)
			}
		}
	}
}

func TestGapMatchesEncodingJSON(t *testing.T) {
	r := goldenRecords["gap"][0]
	var got map[string]any
	if err := json.Unmarshal(AppendJSON(nil, &r), &got); err != nil {
		t.Fatal(err)
	}
	dropped := map[string]map[string]uint64{}
	for reason := range Reason(NumReasons) {
		for kind := range Kind(NumKinds) {
			if n := r.Gap.Dropped[reason][kind]; n > 0 {
				if dropped[reason.String()] == nil {
					dropped[reason.String()] = map[string]uint64{}
				}
				dropped[reason.String()][kind.String()] = n
			}
		}
	}
	b, _ := json.Marshal(map[string]any{"v": 1, "kind": "gap", "time": r.Time, "node": r.Node,
		"start": r.Gap.Start, "end": r.Gap.End, "dropped": dropped})
	var want map[string]any
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if !bytes.Equal(gb, wb) {
		t.Errorf("gap record:\n got %s\nwant %s", gb, wb)
	}
}

// Hostile strings in any field must stay inside their field: one line, one
// object, the same kind, and the text back intact after decoding.
func TestHostileStrings(t *testing.T) {
	hostile := []string{
		`evil"}` + "\n" + `{"v":1,"kind":"end","src":"1.2.3.4"`,
		`back\slash\"quote`,
		"line\nfeed\rcarriage\ttab\x00nul\x1fus\x7fdel",
		"sep\u2028line\u2029para",
		"ünïcödé/名前-🙂",
		"bad\xffutf8\xc3",
		"<script>&amp;</script>",
		strings.Repeat("\n", 300),
	}
	for _, s := range hostile {
		r := goldenRecords["decision"][0]
		r.Pod, r.Node, r.Origin, r.Source, r.PolicyHash = s, s, s, s, s
		line := AppendJSON(nil, &r)
		if bytes.Count(line, []byte("\n")) != 1 || line[len(line)-1] != '\n' {
			t.Errorf("%q: not exactly one line: %q", s, line)
		}
		var got map[string]any
		dec := json.NewDecoder(bytes.NewReader(line))
		if err := dec.Decode(&got); err != nil {
			t.Fatalf("%q: %v: %s", s, err, line)
		}
		if dec.More() {
			t.Errorf("%q: more than one JSON value on the line: %s", s, line)
		}
		want := strings.ToValidUTF8(s, "\uFFFD")
		for _, f := range []string{"pod", "node", "origin", "source", "policy_hash"} {
			if got[f] != want {
				t.Errorf("%q: field %s decoded as %q", s, f, got[f])
			}
		}
		if got["kind"] != "decision" || got["src"] != "10.244.0.2" {
			t.Errorf("%q: record forged: %v", s, got)
		}
	}
}

func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "plain", "a\"b\\c", "\x00\x01\b\f\n\r\t\x1f\x7f", "\u2028\u2029", "\xff\xfe", "é\xc3", "<>&", "\xed\xa0\x80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendString(nil, s); !bytes.Equal(got, want) {
			t.Fatalf("appendString(%q) = %s, encoding/json gives %s", s, got, want)
		}
	})
}

func FuzzAppendJSON(f *testing.F) {
	f.Add(uint8(0), uint8(6), []byte{10, 244, 0, 2}, uint16(40000), []byte{11, 0, 0, 10}, uint16(443), "default/web", "masquerade", "config", "", "h", uint64(1), int64(12345), uint32(0), int64(1500), true)
	f.Add(uint8(1), uint8(17), make([]byte, 16), uint16(1), []byte{0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint16(53), "ns/\"x\"\n", "passthrough", "egress-policy", "p\u2028", "", uint64(0), int64(0), uint32(7), int64(0), false)
	f.Add(uint8(2), uint8(58), []byte{1, 2, 3}, uint16(0), []byte{}, uint16(0), "\xff", "", "kernel-fallback", "", "", uint64(0), int64(-5), uint32(0), int64(999), true)
	f.Fuzz(func(t *testing.T, kind, proto uint8, src []byte, sport uint16, dst []byte, dport uint16,
		pod, action, source, origin, hash string, gen uint64, latency int64, sample uint32, dur int64, acct bool) {
		addr := func(b []byte, port uint16) netip.AddrPort {
			a, _ := netip.AddrFromSlice(b)
			return netip.AddrPortFrom(a, port)
		}
		// Durations beyond float64's exact integer range (about 104 days in
		// nanoseconds) would make the reference, not AppendJSON, round.
		const limit = 1 << 52
		latency %= limit
		dur %= limit
		r := Record{Kind: Kind(kind % uint8(KindGap)), Time: t0.Add(time.Duration(latency)), Node: origin, Proto: proto,
			Src: addr(src, sport), Dst: addr(dst, dport), Pod: pod, Action: action, Source: source, Origin: origin,
			PolicyHash: hash, PolicyGeneration: gen, Queue: sport, Latency: time.Duration(latency), Sample: sample,
			Accounted: acct, PacketsOrig: gen, BytesOrig: gen + 1, PacketsReply: uint64(sport), BytesReply: uint64(dport),
			Duration: time.Duration(dur), Xlate: addr(dst, sport), ConntrackID: uint32(gen)}
		if acct {
			r.Start = t0
		}
		got := AppendJSON(nil, &r)
		if want := reference(&r); !bytes.Equal(got, want) {
			t.Fatalf("AppendJSON:\n got %s\nwant %s", got, want)
		}
		if bytes.IndexByte(got, '\n') != len(got)-1 {
			t.Fatalf("record is not one line: %q", got)
		}
	})
}

func TestAppendJSONAllocs(t *testing.T) {
	buf := make([]byte, 0, 4096)
	for _, kind := range []string{"decision", "end", "fallback", "gap"} {
		r := goldenRecords[kind][0]
		if n := testing.AllocsPerRun(100, func() { buf = AppendJSON(buf[:0], &r) }); n != 0 {
			t.Errorf("AppendJSON(%s) allocates %.1f times per record", kind, n)
		}
	}
}

// BenchmarkAppendJSON compares the hand-written encoder with encoding/json
// on the same record (the reference struct built per record, as a
// straightforward encoding/json implementation would).
func BenchmarkAppendJSON(b *testing.B) {
	for _, kind := range []string{"decision", "end"} {
		r := goldenRecords[kind][0]
		b.Run(kind+"/append", func(b *testing.B) {
			buf := make([]byte, 0, 4096)
			b.ReportAllocs()
			for b.Loop() {
				buf = AppendJSON(buf[:0], &r)
			}
			b.SetBytes(int64(len(buf)))
		})
		b.Run(kind+"/logger", func(b *testing.B) {
			// As the Logger encodes: one encoder, its second cached.
			var e encoder
			buf := make([]byte, 0, 4096)
			b.ReportAllocs()
			for b.Loop() {
				buf = e.appendJSON(buf[:0], &r)
			}
			b.SetBytes(int64(len(buf)))
		})
		b.Run(kind+"/encoding-json", func(b *testing.B) {
			b.ReportAllocs()
			var n int
			for b.Loop() {
				n = len(reference(&r))
			}
			b.SetBytes(int64(n))
		})
	}
}

// The schema reference shows the golden records; keep it in step.
func TestDocsShowGoldenRecords(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "flow-log.md"))
	if err != nil {
		t.Skipf("docs not found: %v", err)
	}
	for name := range goldenRecords {
		golden, err := os.ReadFile(filepath.Join("testdata", name+".golden"))
		if err != nil {
			t.Fatal(err)
		}
		for line := range bytes.Lines(golden) {
			if !bytes.Contains(doc, line) {
				t.Errorf("docs/flow-log.md does not show this %s record:\n%s", name, line)
			}
		}
	}
}

// The encoder's cached timestamps must read exactly as time.RFC3339Nano
// writes them, whether or not the second is the cached one.
func TestEncoderTimeMatchesRFC3339Nano(t *testing.T) {
	base := time.Date(2026, 11, 24, 21, 30, 5, 0, time.UTC)
	times := []time.Time{
		base,
		base.Add(1),
		base.Add(120 * time.Millisecond),
		base.Add(123456789),
		base.Add(999999999),
		base.Add(time.Second),
		base.Add(time.Second + 100),
		base.Add(5), // the two cached seconds, alternately
		base.Add(time.Second + 70),
		base.Add(2*time.Second + 1), // a third second replaces one
		base.Add(9),
		base.Add(time.Second + 3),
		base.In(time.FixedZone("east", 5*3600)).Add(42),
		time.Date(1969, 12, 31, 23, 59, 59, 500, time.UTC),
		time.Date(0, 1, 1, 0, 0, 0, 7, time.UTC),
		time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(10000, 1, 1, 0, 0, 0, 10, time.UTC),
		time.Date(-1, 1, 1, 0, 0, 0, 10, time.UTC),
	}
	var e encoder
	for _, tm := range times {
		want := `"` + tm.UTC().Format(time.RFC3339Nano) + `"`
		if got := string(e.appendTime(nil, tm)); got != want {
			t.Errorf("%v: got %s, want %s", tm, got, want)
		}
	}
}
