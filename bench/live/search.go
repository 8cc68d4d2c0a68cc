package main

import "math"

// search bounds the rate search for the highest rate with no loss and no
// undecided flow.
type search struct {
	start, floor, ceiling float64 // flows/s
	step                  float64 // growth while every trial passes (> 1)
	tolerance             float64 // stop when failing/passing rates differ by less than this factor
	maxTrials             int
}

// run calls trial at rates chosen by growing (or shrinking) by step from
// start until a pass and a failure bracket the answer, then bisects
// geometrically. It returns the passing trial with the highest offered
// rate (Pass false when none passed) and every trial in order.
func (s search) run(trial func(rate float64) (Trial, error)) (best Trial, trials []Trial, err error) {
	lo, hi := 0.0, math.Inf(1)
	r := math.Min(math.Max(s.start, s.floor), s.ceiling)
	for len(trials) < s.maxTrials {
		t, err := trial(r)
		if err != nil {
			return best, trials, err
		}
		trials = append(trials, t)
		if t.Pass {
			if r > lo {
				lo, best = r, t
			}
		} else {
			hi = math.Min(hi, r)
			// A burst passes only at ≥ 95 % of its pace, so a sender
			// that reached only Achieved fails every rate above
			// Achieved/0.95 as well.
			if t.Achieved > 0 {
				hi = math.Min(hi, math.Max(t.Achieved/0.95, lo))
			}
		}
		switch {
		case math.IsInf(hi, 1):
			if r >= s.ceiling {
				return best, trials, nil
			}
			r = math.Min(r*s.step, s.ceiling)
		case lo == 0:
			if r <= s.floor {
				return best, trials, nil
			}
			next := r / s.step
			// A sender that fell well short of the pace has measured the
			// dataplane's capacity already: go just below it rather than
			// creeping down step by step.
			if t.Achieved > 0 {
				next = math.Min(next, 0.9*t.Achieved)
			}
			r = math.Max(next, s.floor)
		default:
			if hi <= lo || hi/lo <= 1+s.tolerance {
				return best, trials, nil
			}
			r = math.Sqrt(lo * hi)
		}
	}
	return best, trials, nil
}
