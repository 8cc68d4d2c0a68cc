package main

import (
	"encoding/json"
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

func TestRun(t *testing.T) {
	dir := t.TempDir()
	quantiles := func(base float64) []float64 {
		q := make([]float64, 201)
		for i := range q {
			q[i] = base + float64(i)
		}
		return q
	}
	var samples []map[string]any
	for _, n := range []int{11, 1000, 5000, 50000} {
		for i, dp := range []string{"agent", "chain", "ipset"} {
			samples = append(samples, map[string]any{
				"cidrs": n, "dataplane": dp,
				"newFlows": map[string]any{"sustained": 50000.0 / float64(i+1), "max": 90000.0},
				"connect":  map[string]any{"quantiles": quantiles(float64(10 * (i + 1)))},
			})
		}
	}
	data, err := json.Marshal(map[string]any{"samples": samples})
	if err != nil {
		t.Fatal(err)
	}
	in := filepath.Join(dir, "live.json")
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		cdfCIDRs int
	}{
		{"CDF at a measured count", 5000},
		{"CDF falls back to the largest count", 42},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(dir, tt.name)
			if err := run(in, out, tt.cdfCIDRs); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"newflows.png", "connect-cdf.png"} {
				fh, err := os.Open(filepath.Join(out, f))
				if err != nil {
					t.Fatal(err)
				}
				img, err := png.Decode(fh)
				fh.Close()
				if err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 300 {
					t.Errorf("%s is %v", f, b)
				}
			}
		})
	}
}

func TestRunRejectsEmptyResults(t *testing.T) {
	in := filepath.Join(t.TempDir(), "live.json")
	if err := os.WriteFile(in, []byte(`{"samples":[]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(in, t.TempDir(), 5000); err == nil {
		t.Error("no error for a results file without samples")
	}
}
