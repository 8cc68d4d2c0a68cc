package queue

import (
	"os"
	"strings"
	"testing"
)

func TestReadProcStats(t *testing.T) {
	f, err := os.Open("testdata/nfnetlink_queue")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ReadProcStats(f)
	if err != nil {
		t.Fatal(err)
	}
	want := []ProcStats{
		{QueueNum: 0, PortID: 12345, QueueTotal: 0, CopyMode: 2, CopyRange: 128, IDSequence: 42},
		{QueueNum: 1, PortID: 3210987654, QueueTotal: 17, CopyMode: 2, CopyRange: 65531, QueueDropped: 5, UserDropped: 9, IDSequence: 4294967295},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d queues, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("queue %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}
}

func TestReadProcStatsErrors(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"empty", "", ""},
		{"blank lines", "\n  \n", ""},
		{"short line", "0 1 2 3\n", "4 fields"},
		{"not a number", "0 1 x 2 128 0 0 1 1\n", "field 3"},
		{"queue number too big", "65536 1 0 2 128 0 0 1 1\n", "field 1"},
		{"negative", "0 1 0 2 128 -1 0 1 1\n", "field 6"},
		{"error names the line", "0 1 0 2 128 0 0 1 1\n0 1 0 2\n", "line 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ReadProcStats(strings.NewReader(tt.in))
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("unexpected error %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
