package main

import (
	"io"
	"slices"
	"testing"

	"github.com/nfmasq/nfmasq/internal/mark"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		check   func(options) bool
		wantErr bool
	}{
		{"defaults", nil, func(o options) bool {
			return slices.Equal(o.cidrCounts, []int{11, 1000, 5000, 50000}) && o.reps == 3 && o.reloadCIDRs == 100000 && len(o.dataplanes) == 3
		}, false},
		{"short preset", []string{"-short"}, func(o options) bool {
			return slices.Equal(o.cidrCounts, []int{11}) && o.reps == 1 && o.maxFlows == 3000 && o.reloadCIDRs == 10000
		}, false},
		{"explicit flags beat the short preset", []string{"-short", "-cidrs", "1_000", "-reps", "2"}, func(o options) bool {
			return slices.Equal(o.cidrCounts, []int{1000}) && o.reps == 2 && o.maxFlows == 3000
		}, false},
		{"agent args split", []string{"-agent-args", "--queues 2  --workers 1"}, func(o options) bool {
			return slices.Equal(o.agentArgs, []string{"--queues", "2", "--workers", "1"})
		}, false},
		{"agent mark mask", []string{"-agent-args", "--mark-mask 0x300 --queues 2"}, func(o options) bool {
			return o.marks.Mask == 0x300 && o.marks.Fallback == 0x300 && o.marks.Masquerade == 0x100
		}, false},
		{"agent mark mask with =", []string{"-agent-args", "--mark-mask=0x600"}, func(o options) bool { return o.marks.Fallback == 0x600 }, false},
		{"flow log off", []string{"-agent-args", "--flow-log=file:/x --flow-log off"}, func(o options) bool { return o.flowLogOff }, false},
		{"flow log on", []string{"-agent-args", "--flow-log off --flow-log=file:/x"}, func(o options) bool { return !o.flowLogOff }, false},
		{"default marks", nil, func(o options) bool { return o.marks == mark.Default }, false},
		{"bad agent mark mask", []string{"-agent-args", "--mark-mask 0x1"}, nil, true},
		{"one dataplane", []string{"-dataplanes", "ipset"}, func(o options) bool { return slices.Equal(o.dataplanes, []string{IPSet}) }, false},
		{"unknown dataplane", []string{"-dataplanes", "nft"}, nil, true},
		{"bad count", []string{"-cidrs", "11,zero"}, nil, true},
		{"IPv6 destination", []string{"-dst", "2001:db8::1"}, nil, true},
		{"stray argument", []string{"run"}, nil, true},
		{"cpu rates", []string{"-cpu-rates", "0, 1000,2.5e4"}, func(o options) bool { return slices.Equal(o.cpuRates, []float64{0, 1000, 25000}) }, false},
		{"short cpu rates", []string{"-short"}, func(o options) bool { return slices.Equal(o.cpuRates, []float64{0, 1000}) && o.pollReps == 1 }, false},
		{"negative cpu rate", []string{"-cpu-rates", "-5"}, nil, true},
		{"bad cpu rate", []string{"-cpu-rates", "fast"}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, io.Discard)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err %v, want error %v", err, tt.wantErr)
			}
			if err == nil && !tt.check(o) {
				t.Errorf("options %+v", o)
			}
		})
	}
}
