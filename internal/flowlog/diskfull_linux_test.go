package flowlog

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// TestDiskFull fills a tiny tmpfs: writes fail (some half way), the loss is
// counted, and once space returns the log resumes with a gap record.
func TestDiskFull(t *testing.T) {
	netnstest.Require(t, "mount", "umount")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "nfmasq-flowlog-test", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	path := filepath.Join(dir, "flows.log")
	l := newLogger(t, Options{Sink: Sink{Kind: SinkFile, Path: path}, CheckInterval: 5 * time.Millisecond})
	sent := 0
	for l.Stats().WriteErrors == 0 {
		if sent > 10000 {
			t.Fatalf("no write error after %d records on a 64 KiB file system", sent)
		}
		for range 100 {
			l.Log(decision(sent))
			sent++
		}
		netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "the batch to be written or lost", func() bool {
			st := l.Stats()
			return int(st.Written[KindDecision]+st.Lost(KindDecision)) == sent
		})
	}
	if out, err := exec.Command("mount", "-o", "remount,size=4m", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v: %s", err, out)
	}
	for range 10 {
		l.Log(decision(sent))
		sent++
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var good []byte
	bad := 0
	for line := range bytes.Lines(b) {
		if json.Valid(line) {
			good = append(good, line...)
		} else {
			bad++
		}
	}
	if bad > 1 {
		t.Errorf("%d broken lines; a full disk may cut one line short, no more", bad)
	}
	recs := parseLines(t, good)
	st := l.Stats()
	lost := st.Dropped[ReasonWriteError][KindDecision]
	if uint64(count(recs, "decision")) != st.Written[KindDecision] || st.Written[KindDecision]+lost != uint64(sent) {
		t.Errorf("%d decision lines, %d written, %d lost, %d sent", count(recs, "decision"), st.Written[KindDecision], lost, sent)
	}
	if gapTotals(recs)["write_error"] != lost {
		t.Errorf("gap records report %v, want %d write errors", gapTotals(recs), lost)
	}
	t.Logf("sent %d, written %d, lost to ENOSPC %d (%d failed writes): %s", sent, st.Written[KindDecision], lost, st.WriteErrors, st.LastWriteError)
}
