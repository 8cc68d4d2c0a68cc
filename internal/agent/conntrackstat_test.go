package agent

import (
	"strings"
	"testing"
)

func TestReadConntrackStat(t *testing.T) {
	const header = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
	tests := []struct {
		name    string
		in      string
		want    map[string]uint64
		wantErr bool
	}{
		{
			name: "two CPUs summed",
			in: header +
				"00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00040000 00000000 0000000a 00000001 00000000  00000000 00000000 00000000 00000000\n" +
				"00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000003 000000f0 00000000 00000000  00000000 00000000 00000000 00000000\n",
			want: map[string]uint64{"drop": 0xfa, "early_drop": 1, "insert_failed": 3, "insert": 0x40002},
		},
		{name: "header only", in: header, want: map[string]uint64{"drop": 0}},
		{name: "empty", in: "", wantErr: true},
		{name: "short row", in: header + "00000001 00000002\n", wantErr: true},
		{name: "not hexadecimal", in: "drop\nzz\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readConntrackStat(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error: %v", err, tt.wantErr)
			}
			for k, v := range tt.want {
				if got[k] != v {
					t.Errorf("%s = %d, want %d", k, got[k], v)
				}
			}
		})
	}
}
