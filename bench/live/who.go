package main

import (
	"bytes"
	"fmt"

	"github.com/nfmasq/nfmasq/internal/cputime"
	"github.com/nfmasq/nfmasq/internal/who"
)

// whoScan measures nfmasq who's reader on the log internal/who's
// benchmark scans (who.SyntheticLog), reps times per query, in CPU time
// of the process (garbage collection included), so that other processes
// on the machine count less than in wall time.
func whoScan(reps int) ([]WhoSample, error) {
	var buf bytes.Buffer
	records := who.SyntheticLog(&buf, who.SyntheticFlows)
	names := []string{"translated ADDR:PORT --at T", "pod NAMESPACE/NAME"}
	var out []WhoSample
	for rep := 0; rep < reps; rep++ {
		for i, q := range who.SyntheticQueries() {
			start := cputime.Process()
			j := who.NewJoiner(q, who.Options{}, func(*who.Flow) {})
			if err := j.Read(bytes.NewReader(buf.Bytes()), "synthetic"); err != nil {
				return nil, err
			}
			j.Finish()
			end := cputime.Process()
			if j.Stats().Matched == 0 {
				return nil, fmt.Errorf("query %s matched nothing", names[i])
			}
			out = append(out, WhoSample{Query: names[i], Records: records, Seconds: (end - start).Seconds()})
		}
	}
	return out, nil
}
