package flowlog

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

func TestParseSink(t *testing.T) {
	tests := []struct {
		in      string
		want    Sink
		wantErr string
	}{
		{in: "stdout", want: Sink{Kind: SinkStdout}},
		{in: "off", want: Sink{Kind: SinkOff}},
		{in: "file:/var/log/nfmasq/flows.log", want: Sink{Kind: SinkFile, Path: "/var/log/nfmasq/flows.log"}},
		{in: "file:/var/log//nfmasq/./flows.log", want: Sink{Kind: SinkFile, Path: "/var/log/nfmasq/flows.log"}},
		{in: "file:flows.log", want: Sink{Kind: SinkFile, Path: "flows.log"}},
		{in: "", wantErr: "empty flow log sink"},
		{in: "file:", wantErr: "needs a path"},
		{in: "file:/var/log/", wantErr: "names a directory"},
		{in: "file:/var/log/..", wantErr: "names a directory"},
		{in: "file:/a\x00b", wantErr: "NUL"},
		{in: "stderr", wantErr: `unknown flow log sink "stderr"`},
		{in: "STDOUT", wantErr: "unknown flow log sink"},
		{in: "/var/log/flows.log", wantErr: "want stdout, file:PATH or off"},
	}
	for _, tt := range tests {
		got, err := ParseSink(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseSink(%q) error = %v, want one containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseSink(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		if round, err := ParseSink(got.String()); err != nil || round != got {
			t.Errorf("ParseSink(%q.String()) = %+v, %v", tt.in, round, err)
		}
	}
}

func TestFileSinkStartupErrors(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A path under a regular file can never be created.
	if _, err := New(Options{Sink: Sink{Kind: SinkFile, Path: filepath.Join(blocker, "flows.log")}}); err == nil {
		t.Fatal("New accepted a log path under a regular file")
	}
	if _, err := New(Options{Sink: Sink{Kind: SinkFile, Path: filepath.Join(dir, "x")}, Buffer: -1}); err == nil {
		t.Fatal("New accepted a negative buffer")
	}
}

func readDir(t testing.TB, dir string) (names []string, all []byte) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if perm := info.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s has mode %v, want 0600: flow records name pods and peers", e.Name(), perm)
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, e.Name())
		all = append(all, b...)
	}
	return names, all
}

func TestFileRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "flows.log")
	l := newLogger(t, Options{Sink: Sink{Kind: SinkFile, Path: path}, MaxFileMB: 1, MaxFiles: 2, Buffer: 1 << 15})
	const n = 14000 // about 3.5 MB of decision records: three rotations
	for i := range n {
		l.Log(decision(i))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if st := l.Stats(); st.Written[KindDecision] != n {
		t.Fatalf("wrote %d of %d records: %+v", st.Written[KindDecision], n, st)
	}
	// lumberjack removes old files in its own goroutine after a rotation.
	var names []string
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "rotation to keep the log and 2 backups", func() bool {
		names, _ = readDir(t, dir)
		return len(names) == 3
	})
	_, all := readDir(t, dir)
	recs := parseLines(t, all)
	if len(recs) == 0 || len(recs) >= n {
		t.Errorf("%d records kept in %v, want some but fewer than %d", len(recs), names, n)
	}
	for _, name := range names {
		info, _ := os.Stat(filepath.Join(dir, name))
		if info.Size() > 1<<20 {
			t.Errorf("%s is %d bytes, over the 1 MB rotation size", name, info.Size())
		}
	}
}

func TestFileDeleted(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "flows.log")
	// No periodic check: Close's final check is the one that notices.
	l := newLogger(t, Options{Sink: Sink{Kind: SinkFile, Path: path}, CheckInterval: time.Hour})
	for i := range 10 {
		l.Log(decision(i))
	}
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "10 records written", func() bool { return l.Stats().Written[KindDecision] == 10 })
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		l.Log(decision(i))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	st := l.Stats()
	// All 15 count: the Logger cannot tell which reached the file before
	// the deletion, so the figure is an upper bound.
	if got := st.Dropped[ReasonFileDeleted][KindDecision]; got != 15 {
		t.Errorf("file_deleted = %d, want 15", got)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("log file not recreated: %v", err)
	}
	recs := parseLines(t, b)
	if len(recs) != 1 || gapTotals(recs)["file_deleted"] != 15 {
		t.Errorf("recreated file holds %s, want one gap record for 15 decisions", b)
	}
}
