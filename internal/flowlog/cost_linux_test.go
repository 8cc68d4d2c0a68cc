package flowlog

import (
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/cputime"
)

// BenchmarkLogCost is the whole cost of a decision record for the
// process: Log, the writer's encoding and its write to the sink, in CPU
// time per record (the writer runs on another goroutine, so ns/op alone
// would miss it). Sinks: io.Discard (encoding only), a file in the test's
// temporary directory (the page cache of its file system), and one in
// /dev/shm (tmpfs) when there is one.
func BenchmarkLogCost(b *testing.B) {
	r := goldenRecords["decision"][0]
	sinks := []struct {
		name string
		dir  func(b *testing.B) string
	}{
		{"discard", nil},
		{"file", func(b *testing.B) string { return b.TempDir() }},
		{"tmpfs", func(b *testing.B) string {
			d, err := os.MkdirTemp("/dev/shm", "flowlog")
			if err != nil {
				b.Skip("no /dev/shm")
			}
			b.Cleanup(func() { os.RemoveAll(d) })
			return d
		}},
	}
	for _, s := range sinks {
		b.Run(s.name, func(b *testing.B) {
			o := Options{Writer: io.Discard}
			if s.dir != nil {
				o = Options{Sink: Sink{Kind: SinkFile, Path: filepath.Join(s.dir(b), "flows.log")}, MaxFileMB: 1 << 10}
			}
			l, err := New(o)
			if err != nil {
				b.Fatal(err)
			}
			cpu0 := cputime.Process()
			n := 0
			for b.Loop() {
				l.Log(r)
				// Let the writer catch up every half buffer, as the
				// dataplane's pace would: this measures cost, not overflow.
				if n++; n%(DefaultBuffer/2) == 0 {
					for l.Stats().Buffered > 0 {
						time.Sleep(100 * time.Microsecond)
					}
				}
			}
			l.Close()
			cpu := cputime.Process() - cpu0
			st := l.Stats()
			if st.Lost(KindDecision) > 0 {
				b.Fatalf("%d records lost", st.Lost(KindDecision))
			}
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(n), "cpu-ns/record")
		})
	}
}
