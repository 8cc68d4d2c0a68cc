package replay_test

import (
	"bytes"
	"testing"

	"github.com/nfmasq/nfmasq/internal/cputime"
	"github.com/nfmasq/nfmasq/internal/replay"
)

// BenchmarkReplayInMemory replays a generated capture held in memory, the
// whole path the command takes: pcap reader, link header, decoder, flow
// map, policy. One op is one packet; flows are decided once, in a first
// pass before the timer starts, so the measured state is the steady one
// of flows already seen. Target: 5 million packets/s per core.
func BenchmarkReplayInMemory(b *testing.B) {
	data, st := generate(b, benchConfig)
	r := replay.New(testPolicy(b), replay.Options{})
	if err := r.Replay(bytes.NewReader(data)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cputime.Process()
	// Whole captures are replayed, so up to one capture more than b.N
	// packets; the rates count what was done.
	done := 0
	for done < b.N {
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		done += int(st.Packets)
	}
	cpu := cputime.Process() - cpu0
	b.StopTimer()
	b.ReportMetric(float64(done)/b.Elapsed().Seconds(), "pkts/s")
	// Per CPU second of the process: on a shared machine the wall-clock
	// rate measures the neighbours as much as the code.
	if cpu > 0 {
		b.ReportMetric(float64(done)/cpu.Seconds(), "pkts/cpu-s")
	}
}

// BenchmarkReplayNewFlows replays a capture in which every packet starts a
// new flow: one map insertion and one Decide per packet, the cost of a
// capture of short connections. One op is one packet (one flow).
func BenchmarkReplayNewFlows(b *testing.B) {
	cfg := benchConfig
	cfg.Flows, cfg.PacketsPerFlow = 100_000, 1
	data, st := generate(b, cfg)
	policy := testPolicy(b)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cputime.Process()
	done := 0
	for done < b.N {
		r := replay.New(policy, replay.Options{})
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		done += int(st.Packets)
	}
	cpu := cputime.Process() - cpu0
	b.StopTimer()
	b.ReportMetric(float64(done)/b.Elapsed().Seconds(), "flows/s")
	if cpu > 0 {
		b.ReportMetric(float64(done)/cpu.Seconds(), "flows/cpu-s")
	}
}
