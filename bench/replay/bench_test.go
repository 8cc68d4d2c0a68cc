package replay_test

import (
	"bytes"
	"testing"

	"github.com/nfmasq/nfmasq/bench/replay"
)

// BenchmarkReplayInMemory replays a generated capture held in memory, the
// whole path the command takes: pcap reader, link header, decoder, flow
// map, policy. One op is one packet; flows are decided once, in the first
// pass, so the measured state is the steady one of flows already seen.
func BenchmarkReplayInMemory(b *testing.B) {
	data, st := generate(b, benchConfig)
	r := replay.New(testPolicy(b), replay.Options{})
	if err := r.Replay(bytes.NewReader(data)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for done := 0; done < b.N; done += int(st.Packets) {
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
	}
	cpu := cpuTime() - cpu0
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
	if cpu > 0 {
		b.ReportMetric(float64(b.N)/cpu.Seconds(), "pkts/cpu-s")
	}
}
