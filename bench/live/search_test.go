package main

import (
	"errors"
	"math"
	"testing"
)

func TestSearch(t *testing.T) {
	// capacity is the highest rate the fake dataplane passes.
	tests := []struct {
		name      string
		s         search
		capacity  float64
		wantPass  bool
		wantMin   float64 // best offered rate is in [wantMin, capacity]
		maxTrials int
		// senderBound: above capacity the sender only reaches capacity
		// (a kernel-only dataplane runs in the sender's system calls).
		senderBound bool
	}{
		{"cold start, capacity above start", search{start: 20000, floor: 250, ceiling: 400000, step: 2, tolerance: 0.1, maxTrials: 10}, 55000, true, 55000 / 1.1, 10, false},
		{"cold start, capacity below start", search{start: 20000, floor: 250, ceiling: 400000, step: 2, tolerance: 0.1, maxTrials: 10}, 3000, true, 3000 / 1.1, 10, false},
		{"warm start near the answer", search{start: 50000, floor: 250, ceiling: 400000, step: 1.25, tolerance: 0.1, maxTrials: 10}, 55000, true, 55000 / 1.1, 4, false},
		{"capacity above the ceiling", search{start: 20000, floor: 250, ceiling: 100000, step: 2, tolerance: 0.1, maxTrials: 10}, 1e9, true, 100000, 4, false},
		{"nothing passes", search{start: 20000, floor: 250, ceiling: 400000, step: 2, tolerance: 0.1, maxTrials: 20}, 100, false, 0, 8, false},
		{"sender-bound, warm start far above", search{start: 28000, floor: 250, ceiling: 400000, step: 1.25, tolerance: 0.1, maxTrials: 10}, 2000, true, 2000 / 1.1, 4, true},
		{"sender-bound, cold start below", search{start: 20000, floor: 250, ceiling: 400000, step: 2, tolerance: 0.1, maxTrials: 10}, 29000, true, 29000 / 1.1, 5, true},
		{"trial budget", search{start: 20000, floor: 250, ceiling: 400000, step: 2, tolerance: 0.001, maxTrials: 3}, 55000, true, 40000, 3, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			best, trials, err := tt.s.run(func(rate float64) (Trial, error) {
				achieved := rate
				if tt.senderBound {
					achieved = math.Min(rate, tt.capacity)
				}
				return Trial{Offered: rate, Achieved: achieved, Pass: rate <= tt.capacity}, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(trials) > tt.maxTrials {
				t.Errorf("%d trials, want at most %d", len(trials), tt.maxTrials)
			}
			if best.Pass != tt.wantPass {
				t.Fatalf("best %+v, want pass %v", best, tt.wantPass)
			}
			if tt.wantPass && (best.Offered < tt.wantMin-1e-6 || best.Offered > tt.capacity) {
				t.Errorf("best offered %.0f, want within [%.0f, %.0f]", best.Offered, tt.wantMin, tt.capacity)
			}
			for _, tr := range trials {
				if tr.Offered < tt.s.floor || tr.Offered > tt.s.ceiling || math.IsNaN(tr.Offered) {
					t.Errorf("trial at %.0f outside [%.0f, %.0f]", tr.Offered, tt.s.floor, tt.s.ceiling)
				}
			}
		})
	}
}

func TestSearchError(t *testing.T) {
	boom := errors.New("boom")
	_, trials, err := search{start: 1000, floor: 1, ceiling: 1e6, step: 2, tolerance: 0.1, maxTrials: 10}.run(func(rate float64) (Trial, error) {
		if rate > 3000 {
			return Trial{}, boom
		}
		return Trial{Offered: rate, Pass: true}, nil
	})
	if !errors.Is(err, boom) || len(trials) != 2 {
		t.Errorf("err %v after %d trials, want boom after 2", err, len(trials))
	}
}
