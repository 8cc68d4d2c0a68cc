package who

import (
	"bufio"
	"io"
	"net/netip"
	"strconv"
	"time"

	"github.com/nfmasq/nfmasq/internal/flowlog"
)

// SyntheticFlows is the size of the log BenchmarkWho and the live
// benchmark scan: 100,000 flows, 400,000 records with the gap-free mix
// below.
const SyntheticFlows = 100000

var syntheticStart = time.Date(2026, 12, 6, 17, 0, 0, 0, time.UTC)

// SyntheticLog writes a flow log as a busy node's agent writes it (with
// --flow-log-nat): flows from 250 pods to 1,000 destinations, one every
// 100 µs, each with its decision and nat records, and its end record
// 4,096 flows later. It returns the number of records written.
func SyntheticLog(w io.Writer, flows int) int {
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	const lag = 4096
	at := func(i int) time.Time { return syntheticStart.Add(time.Duration(i) * 100 * time.Microsecond) }
	flow := func(i int) (src, dst, xlate netip.AddrPort, pod string) {
		src = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 244, 0, byte(2 + i%250)}), uint16(32768+i%28000))
		dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, byte(i % 1000 / 250), byte(i % 250), 10}), 443)
		xlate = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 168, 77, 1}), uint16(1024+i%60000))
		return src, dst, xlate, "default/web-" + strconv.Itoa(i%250)
	}
	var buf []byte
	n := 0
	put := func(r flowlog.Record) {
		buf = flowlog.AppendJSON(buf[:0], &r)
		bw.Write(buf)
		n++
	}
	for i := range flows + lag {
		if i < flows {
			src, dst, xlate, pod := flow(i)
			put(flowlog.Record{Kind: flowlog.KindDecision, Time: at(i), Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
				Action: "masquerade", Source: "none", PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 2, Queue: 150, Latency: 12 * time.Microsecond})
			put(flowlog.Record{Kind: flowlog.KindNat, Time: at(i).Add(time.Millisecond), Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
				Action: "masquerade", Xlate: xlate, ConntrackID: uint32(i + 1)})
		}
		if e := i - lag; e >= 0 {
			src, dst, xlate, pod := flow(e)
			put(flowlog.Record{Kind: flowlog.KindEnd, Time: at(i), Node: "node-a", Proto: 6, Src: src, Dst: dst, Pod: pod,
				Action: "masquerade", Accounted: true, PacketsOrig: 10, BytesOrig: 1000, PacketsReply: 8, BytesReply: 9000,
				Start: at(e), Duration: at(i).Sub(at(e)), Xlate: xlate, ConntrackID: uint32(e + 1)})
		}
	}
	return n
}

// SyntheticQueries are the questions asked of SyntheticLog: a translated
// port at a time while flow 30,000 is open (flow 90,000 uses the same
// port later), and one pod's flows (1 in 250).
func SyntheticQueries() []Query {
	return []Query{
		{Translated: netip.MustParseAddrPort("192.168.77.1:31024"), At: syntheticStart.Add(3200 * time.Millisecond), Tolerance: time.Second},
		{Pod: "default/web-7"},
	}
}
