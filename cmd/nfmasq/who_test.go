package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/netnstest"
)

var whoT0 = time.Date(2026, 12, 6, 17, 0, 0, 0, time.UTC)

// whoFlow is the i-th flow of writeRotatedLog: pod, source, translation.
func whoFlow(i int) (pod string, src, dst, xlate netip.AddrPort) {
	pod = fmt.Sprintf("default/web-%d", i%50)
	src = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 244, 0, byte(2 + i%50)}), uint16(30000+i))
	dst = netip.MustParseAddrPort("11.0.0.10:443")
	xlate = netip.AddrPortFrom(netip.MustParseAddr("192.168.77.1"), uint16(1024+i))
	return
}

// writeRotatedLog writes flows through the agent's Logger into a file sink
// that rotates at 1 MB and compresses rotated files, as a busy node's log
// is: each flow's decision and nat records are written as it starts, its
// end record 500 flows later, so flows span rotated files.
func writeRotatedLog(t *testing.T, dir string, flows int) {
	t.Helper()
	lg, err := flowlog.New(flowlog.Options{
		Sink: flowlog.Sink{Kind: flowlog.SinkFile, Path: filepath.Join(dir, "flows.log")},
		Node: "node-a", MaxFileMB: 1, MaxFiles: 100, Compress: true, Buffer: 1 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	at := func(i int) time.Time { return whoT0.Add(time.Duration(i) * time.Second) }
	const lag = 500
	for i := range flows + lag {
		if i < flows {
			pod, src, dst, xlate := whoFlow(i)
			lg.Log(flowlog.Record{Kind: flowlog.KindDecision, Time: at(i), Proto: 6, Src: src, Dst: dst, Pod: pod,
				Action: "masquerade", Source: "none", PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 1, Latency: time.Microsecond})
			lg.Log(flowlog.Record{Kind: flowlog.KindNat, Time: at(i).Add(time.Millisecond), Proto: 6, Src: src, Dst: dst, Pod: pod,
				Action: "masquerade", Xlate: xlate, ConntrackID: uint32(i + 1)})
		}
		if e := i - lag; e >= 0 {
			pod, src, dst, xlate := whoFlow(e)
			lg.Log(flowlog.Record{Kind: flowlog.KindEnd, Time: at(i), Proto: 6, Src: src, Dst: dst, Pod: pod, Action: "masquerade",
				Accounted: true, PacketsOrig: 3, BytesOrig: 180, Start: at(e), Duration: at(i).Sub(at(e)), Xlate: xlate, ConntrackID: uint32(e + 1)})
		}
		if i%1000 == 999 {
			// Let the writer keep up (the buffer is large, not endless).
			netnstest.Poll(t, 10*time.Second, time.Millisecond, "flow log written", func() bool { return lg.Stats().Buffered == 0 })
		}
	}
	lg.Close()
	if s := lg.Stats(); s.Lost(flowlog.KindDecision)+s.Lost(flowlog.KindNat)+s.Lost(flowlog.KindEnd) > 0 {
		t.Fatalf("records lost writing the test log: %+v", s.Dropped)
	}
	// lumberjack compresses rotated files in the background.
	netnstest.Poll(t, 20*time.Second, 10*time.Millisecond, "rotated files compressed", func() bool {
		plain, _ := filepath.Glob(filepath.Join(dir, "flows-*.log"))
		return len(plain) == 0
	})
}

func whoFlows(t *testing.T, stdout string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("who printed %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

// nfmasq who over the rotated set as the agent's Logger leaves it
// (compressed rotated files, the active file), the active file cut
// mid-line as a rotation or a crash can leave it.
func TestWhoRotatedAndCutFiles(t *testing.T) {
	dir := t.TempDir()
	const flows = 6000
	writeRotatedLog(t, dir, flows)
	gz, _ := filepath.Glob(filepath.Join(dir, "flows-*.log.gz"))
	if len(gz) < 2 {
		t.Fatalf("%d compressed rotated files; the test needs flows spanning several", len(gz))
	}
	active := filepath.Join(dir, "flows.log")
	data, err := os.ReadFile(active)
	if err != nil {
		t.Fatal(err)
	}
	cut := strings.LastIndexByte(strings.TrimSuffix(string(data), "\n"), '\n') + 40
	if err := os.WriteFile(active, data[:cut], 0o600); err != nil {
		t.Fatal(err)
	}

	// Flow 100: decision and nat in the first compressed file, its end
	// in a later one.
	pod, src, _, xlate := whoFlow(100)
	at := whoT0.Add(350 * time.Second).Format(time.RFC3339)
	stdout, stderr, code := nfmasq(t, "who", "--translated", xlate.String(), "--at", at, dir)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got := whoFlows(t, stdout)
	if len(got) != 1 {
		t.Fatalf("%d flows for %v at %s, want 1:\n%s", len(got), xlate, at, stdout)
	}
	f := got[0]
	if f["pod"] != pod || f["src"] != src.Addr().String() || f["sport"] != float64(src.Port()) || f["xlate_sport"] != float64(xlate.Port()) ||
		f["end"] != whoT0.Add(600*time.Second).Format(time.RFC3339) || f["start"] != whoT0.Add(100*time.Second).Format(time.RFC3339) ||
		f["conntrack_id"] != 101.0 || f["source"] != "none" || f["open"] != nil {
		t.Errorf("flow %v", f)
	}
	if !strings.Contains(stderr, "skipped 1 malformed lines") {
		t.Errorf("the cut last line is not reported: %q", stderr)
	}

	// The same port later belongs to no flow; before the flow, to none.
	for _, when := range []time.Duration{50 * time.Second, 700 * time.Second} {
		if out, _, code := nfmasq(t, "who", "--translated", xlate.String(), "--at", whoT0.Add(when).Format(time.RFC3339), dir); code != 1 || out != "" {
			t.Errorf("at +%v: exit %d, %q; want 1 and nothing", when, code, out)
		}
	}

	// A pod's flows: one flow in 50 belongs to default/web-0, each
	// joined from its three records (the cut end record is web-49's).
	stdout, _, code = nfmasq(t, "who", "--pod", "default/web-0", dir)
	got = whoFlows(t, stdout)
	open := 0
	for _, f := range got {
		if f["pod"] != "default/web-0" {
			t.Fatalf("--pod default/web-0 printed %v", f)
		}
		if f["open"] == true {
			open++
		}
	}
	if code != 0 || len(got) != flows/50 || open != 0 {
		t.Errorf("--pod: exit %d, %d flows (%d open), want %d flows, none open", code, len(got), open, flows/50)
	}

	// Files in any order give the same answer; standard input too.
	all, _ := filepath.Glob(filepath.Join(dir, "*"))
	stdout2, _, _ := nfmasq(t, append([]string{"who", "--pod", "default/web-0"}, all...)...)
	if len(whoFlows(t, stdout2)) != flows/50 {
		t.Errorf("files in glob order: %d flows", len(whoFlows(t, stdout2)))
	}
}

func TestWhoUsage(t *testing.T) {
	log := writeFile(t, "flows.log", "")
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"who", log}, "exactly one of"},
		{[]string{"who", "--translated", "192.168.77.1:1", log}, "needs --at"},
		{[]string{"who", "--translated", "192.168.77.1", "--at", "2026-12-06T17:28:16Z", log}, "want ADDR:PORT"},
		{[]string{"who", "--translated", "192.168.77.1:1", "--at", "17:28", log}, "RFC 3339"},
		{[]string{"who", "--pod", "web", log}, "NAMESPACE/NAME"},
		{[]string{"who", "--pod", "a/b", "--dst", "1.1.1.1", log}, "exactly one of"},
		{[]string{"who", "--dst", "1.1.1.x", log}, "--dst"},
		{[]string{"who", "--pod", "a/b", "--since", "2026-12-06T18:00:00Z", "--until", "2026-12-06T17:00:00Z", log}, "before --since"},
		{[]string{"who", "--pod", "a/b", "/nonexistent/flows.log"}, "no such file"},
	} {
		t.Run(strings.Join(tt.args[1:], " "), func(t *testing.T) {
			stdout, stderr, code := nfmasq(t, tt.args...)
			if code != exitConfig || stdout != "" || !strings.Contains(stderr, tt.want) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 2 and %q", code, stdout, stderr, tt.want)
			}
		})
	}
}
