package who

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// checkOracle holds scanLine and record.parse to encoding/json: a line
// scans if and only if encoding/json reads it as an object, with the same
// members; and the fields nfmasq who uses have the values encoding/json
// gives them.
func checkOracle(t *testing.T, line []byte) {
	t.Helper()
	var want map[string]json.RawMessage
	jsonErr := json.Unmarshal(line, &want)
	got := map[string]string{}
	scanErr := scanLine(line, func(f field) {
		v := string(f.val)
		if f.str {
			v = strconv.Quote(f.text())
		}
		got[field{val: f.key, str: true, escaped: bytes.IndexByte(f.key, '\\') >= 0}.text()] = v
	})
	if (jsonErr == nil) != (scanErr == nil) {
		t.Fatalf("%q: encoding/json says %v, scanLine says %v", line, jsonErr, scanErr)
	}
	if jsonErr != nil {
		return
	}
	if len(got) != len(want) {
		// Duplicate keys: encoding/json keeps the last; so must the reader.
		t.Logf("%q: %d members scanned, %d distinct", line, len(got), len(want))
	}
	for k, raw := range want {
		g, ok := got[k]
		if !ok {
			t.Fatalf("%q: member %q not scanned", line, k)
		}
		if len(raw) > 0 && raw[0] == '"' {
			var ws string
			if err := json.Unmarshal(raw, &ws); err != nil {
				t.Fatal(err)
			}
			gs, err := strconv.Unquote(g)
			if err != nil || gs != ws {
				t.Fatalf("%q: member %q scanned as %s, encoding/json reads %q", line, k, g, ws)
			}
		} else if g != string(raw) {
			t.Fatalf("%q: member %q scanned as %s, encoding/json reads %s", line, k, g, raw)
		}
	}
	// The typed fields, against encoding/json's reading of the same
	// members (matched exactly: the schema's names are lower case).
	var r record
	if r.parse(line) != nil {
		return // well-formed JSON, but not a flow record
	}
	var (
		kind         string
		at           time.Time
		sport, xport uint16
		conntrackID  uint32
	)
	for _, m := range []struct {
		key string
		v   any
	}{{"kind", &kind}, {"time", &at}, {"sport", &sport}, {"xlate_sport", &xport}, {"conntrack_id", &conntrackID}} {
		if raw, ok := want[m.key]; ok {
			if err := json.Unmarshal(raw, m.v); err != nil {
				return // a member of another type than the schema's
			}
		}
	}
	if kind != r.kind.String() && r.kind != kindOther || !at.Equal(r.time) {
		t.Fatalf("%q: kind/time %v %v, encoding/json reads %v %v", line, r.kind, r.time, kind, at)
	}
	if r.kind != kindGap && r.kind != kindOther && (r.src.Port() != sport || r.conntrackID != conntrackID || r.hasXlate && r.xlate.Port() != xport) {
		t.Fatalf("%q: ports/id %v %v %v, encoding/json reads %v %v %v", line, r.src.Port(), r.conntrackID, r.xlate.Port(), sport, conntrackID, xport)
	}
}

func FuzzScanOracle(f *testing.F) {
	files, _ := filepath.Glob("../flowlog/testdata/*.golden")
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
			f.Add(line)
			f.Add(line[:len(line)/2])
		}
	}
	for _, s := range []string{`{}`, ` { "a" : [1, -0.5e+3, true, null, {"b": "\u00e9\n"}] } `, `{"a":01}`, `{"a":1.}`, `{"a":"\x"}`, `{"a":1}x`, `[1]`, `{"pod":"a\u2028b"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		checkOracle(t, line)
	})
}

// BenchmarkScan compares the hand-written reader of a flow-log line with
// encoding/json decoding the same line into the fields nfmasq who reads.
func BenchmarkScan(b *testing.B) {
	data, err := os.ReadFile("../flowlog/testdata/end.golden")
	if err != nil {
		b.Fatal(err)
	}
	line := bytes.SplitN(data, []byte("\n"), 2)[0]
	b.Run("scan", func(b *testing.B) {
		b.SetBytes(int64(len(line)))
		b.ReportAllocs()
		var r record
		for b.Loop() {
			if err := r.parse(line); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.SetBytes(int64(len(line)))
		b.ReportAllocs()
		for b.Loop() {
			var r struct {
				Kind        string    `json:"kind"`
				Time        time.Time `json:"time"`
				Proto       string    `json:"proto"`
				Src         string    `json:"src"`
				Sport       uint16    `json:"sport"`
				Dst         string    `json:"dst"`
				Dport       uint16    `json:"dport"`
				Pod         string    `json:"pod"`
				Action      string    `json:"action"`
				Start       time.Time `json:"start"`
				XlateSrc    string    `json:"xlate_src"`
				XlateSport  uint16    `json:"xlate_sport"`
				ConntrackID uint32    `json:"conntrack_id"`
			}
			if err := json.Unmarshal(line, &r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkWho is nfmasq who's whole pipeline (read, scan, join, match)
// over a generated log; records/s is per core, as it runs on one.
func BenchmarkWho(b *testing.B) {
	var buf bytes.Buffer
	records := SyntheticLog(&buf, SyntheticFlows)
	data := buf.Bytes()
	for _, q := range []struct {
		name string
		q    Query
	}{
		{"translated", SyntheticQueries()[0]},
		{"pod", SyntheticQueries()[1]},
	} {
		b.Run(q.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				j := NewJoiner(q.q, Options{}, func(*Flow) {})
				if err := j.Read(bytes.NewReader(data), "bench"); err != nil {
					b.Fatal(err)
				}
				j.Finish()
				if j.Stats().Matched == 0 {
					b.Fatal("nothing matched")
				}
			}
			b.ReportMetric(float64(records)*float64(b.N)/b.Elapsed().Seconds(), "records/s")
		})
	}
}
