//go:build linux

package queue_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/nfmasq/nfmasq/internal/cputime"
	"github.com/nfmasq/nfmasq/internal/flowlog"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// latencyObserver keeps the decision latency of every packet, and wakes
// the sender when the count reaches target.
type latencyObserver struct {
	n       atomic.Int64
	target  atomic.Int64
	reached chan struct{}
	lat     []time.Duration
}

func (o *latencyObserver) Decided(ev *queue.Event) {
	i := o.n.Add(1)
	if i <= int64(len(o.lat)) {
		o.lat[i-1] = ev.Latency
	}
	if i == o.target.Load() {
		o.reached <- struct{}{}
	}
}

// BenchmarkKernelNewFlows pushes new UDP flows (first packets) from the
// pod through the live queue, in windows of at most `window` unanswered
// packets so that nothing overflows, and reports flows per second and the
// receive-to-verdict latency. Sender and queue share the machine's cores,
// as on a node. Run with an explicit count, e.g. -benchtime=20000x: every
// flow leaves a conntrack entry behind for 30 s.
//
// mix=alternate sends every other flow to a passthrough destination, so
// consecutive packets never share a verdict; mix=masquerade sends them
// all to one masqueraded destination, so a batch of packets is answered
// with one batch verdict.
func BenchmarkKernelNewFlows(b *testing.B) {
	for _, workers := range []int{0, 1, 2} {
		for _, window := range []int{64, 256, 512} {
			for _, mix := range []string{"alternate", "masquerade"} {
				b.Run(fmt.Sprintf("workers=%d/window=%d/mix=%s", workers, window, mix), func(b *testing.B) {
					benchNewFlows(b, workers, window, mix == "alternate", false)
				})
			}
		}
	}
}

// BenchmarkKernelNewFlowsLogged is BenchmarkKernelNewFlows (inline
// decisions, windows of 512, all flows masqueraded) with and without a
// decision record per flow written to a file flow log, as the agent
// writes them: what the flow log costs the dataplane.
func BenchmarkKernelNewFlowsLogged(b *testing.B) {
	for _, logged := range []bool{false, true} {
		b.Run(fmt.Sprintf("log=%v", logged), func(b *testing.B) {
			benchNewFlows(b, 0, 512, false, logged)
		})
	}
}

// loggingObserver writes a decision record per decided flow, as the
// agent's audit does, before passing the event on.
type loggingObserver struct {
	log  *flowlog.Logger
	next queue.Observer
}

func (o *loggingObserver) Decided(ev *queue.Event) {
	if ev.Outcome == queue.Decided {
		p := &ev.Packet
		o.log.Log(flowlog.Record{
			Kind: flowlog.KindDecision, Time: ev.Time, Proto: uint8(p.Proto),
			Src:    netip.AddrPortFrom(p.Src, p.SrcPort),
			Dst:    netip.AddrPortFrom(p.Dst, p.DstPort),
			Action: ev.Decision.Action.String(), Prefix: ev.Decision.Prefix,
			Source: ev.Decision.Source.String(), Origin: ev.Decision.Origin,
			PolicyHash: "3f1a9c0d5e7b2a41", PolicyGeneration: 1,
			Queue: ev.Queue, Latency: ev.Latency,
		})
	}
	o.next.Decided(ev)
}

func benchNewFlows(b *testing.B, workers, window int, alternate, logged bool) {
	netnstest.Require(b, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(b)
	restore(b, top.Node, "iptables-restore", rulesFor(sandbox.PodCIDR4, queue4))
	pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
	if err != nil {
		b.Fatal(err)
	}
	obs := &latencyObserver{lat: make([]time.Duration, b.N), reached: make(chan struct{}, 1)}
	var observer queue.Observer = obs
	var flog *flowlog.Logger
	if logged {
		flog, err = flowlog.New(flowlog.Options{
			Sink: flowlog.Sink{Kind: flowlog.SinkFile, Path: filepath.Join(b.TempDir(), "flows.log")},
			Node: "bench-node",
		})
		if err != nil {
			b.Fatal(err)
		}
		defer flog.Close()
		observer = &loggingObserver{log: flog, next: obs}
	}
	q, rs := benchQueue(b, top, queue.Config{Workers: workers, Policy: func() *nat.Policy { return pol }, Observer: observer})

	// Distinct (source address, source port) pairs: every packet is the
	// first of its flow.
	pkts := make([][]byte, b.N)
	for i := range pkts {
		src := netip.AddrFrom4([4]byte{10, 244, 0, byte(2 + i/50000)})
		dst := sandbox.Internet4
		if alternate && i%2 == 1 {
			dst = sandbox.Internal4
		}
		d := netnstest.UDPDatagram(netip.AddrPortFrom(src, uint16(10000+i%50000)), netip.AddrPortFrom(dst, 9), []byte("bench"))
		pkts[i] = append(netnstest.IPv4Header(17, len(d), 5, 0, src, dst), d...)
	}

	cpu0 := cputime.Process()
	b.ResetTimer()
	start := time.Now()
	for sent := 0; sent < len(pkts); {
		n := min(window, len(pkts)-sent)
		obs.target.Store(int64(sent + n))
		if err := rs.send(pkts[sent : sent+n]...); err != nil {
			b.Fatal(err)
		}
		sent += n
		select {
		case <-obs.reached:
		case <-time.After(10 * time.Second):
			b.Fatalf("only %d of %d packets answered: %+v", obs.n.Load(), sent, q.Stats())
		}
	}
	if flog != nil {
		// The records' encoding and writing is part of the cost.
		flog.Close()
	}
	elapsed := time.Since(start)
	b.StopTimer()
	cpu := cputime.Process() - cpu0
	if flog != nil {
		if st := flog.Stats(); st.Written[flowlog.KindDecision] != uint64(b.N) {
			b.Errorf("flow log wrote %d of %d decision records (%+v)", st.Written[flowlog.KindDecision], b.N, st.Dropped)
		}
	}

	st := q.Stats()
	if st.Skipped != 0 || st.Packets != uint64(b.N) {
		b.Errorf("stats %+v after %d flows", st, b.N)
	}
	lat := obs.lat[:min(int(obs.n.Load()), len(obs.lat))]
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "flows/s")
	// CPU time of the whole process (queue, sender, and the kernel work
	// both do in their system calls, forwarding included) per flow: less
	// sensitive than flows/s to whatever else runs on the machine.
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/1000, "cpu-µs/flow")
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	}
}

// BenchmarkKernelFirstPacketRTT measures one new flow at a time: a UDP
// datagram from a fresh pod socket to the remote and its echo, through
// the queue (first packet) and back. Nothing waits in any queue, so the
// difference between dataplanes is what they add to a flow's first packet.
func BenchmarkKernelFirstPacketRTT(b *testing.B) {
	for _, mode := range []struct {
		name     string
		workers  int
		queue    bool
		busyPoll time.Duration
	}{
		{"no-queue", 0, false, 0},
		{"workers=0", 0, true, 0},
		{"workers=0/busy-poll=50us", 0, true, 50 * time.Microsecond},
		{"workers=1", 1, true, 0},
	} {
		b.Run(mode.name, func(b *testing.B) {
			netnstest.Require(b, "iptables-restore")
			top := netnstest.NewTopology(b)
			rules := rulesFor(sandbox.PodCIDR4, queue4)
			if !mode.queue {
				rules = strings.ReplaceAll(rules, "-j NFQUEUE --queue-num 7 --queue-bypass", "-j MARK --set-xmark 0x1000/0x3000")
			}
			restore(b, top.Node, "iptables-restore", rules)
			pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
			if err != nil {
				b.Fatal(err)
			}
			q, err := queue.New(queue.Config{
				QueueNums: []uint16{queue4},
				Workers:   mode.workers,
				BusyPoll:  mode.busyPoll,
				NetNS:     top.Node.FD(),
				Marks:     kernelMarks,
				Policy:    func() *nat.Policy { return pol },
			})
			if err != nil {
				b.Fatal(err)
			}
			stop := startQueue(b, q)
			defer stop()
			sink, err := sandbox.StartSink(top.Remote, []netip.Addr{sandbox.Internet4}, 9600)
			if err != nil {
				b.Fatal(err)
			}
			defer sink.Close()
			dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(sandbox.Internet4, 9600))

			// Dial the sockets up front, inside the pod: creating one is
			// not part of what is measured.
			conns := make([]*net.UDPConn, b.N)
			if err := top.Pod.Do(func() error {
				for i := range conns {
					c, err := net.DialUDP("udp", nil, dst)
					if err != nil {
						return err
					}
					conns[i] = c
				}
				return nil
			}); err != nil {
				b.Fatal(err)
			}
			rtt := make([]time.Duration, b.N)
			buf := make([]byte, 64)
			b.ResetTimer()
			for i, c := range conns {
				start := time.Now()
				if _, err := c.Write([]byte("rtt")); err != nil {
					b.Fatal(err)
				}
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(buf); err != nil {
					b.Fatalf("flow %d: %v", i, err)
				}
				rtt[i] = time.Since(start)
				c.Close()
			}
			b.StopTimer()
			slices.Sort(rtt)
			b.ReportMetric(float64(rtt[len(rtt)/2].Nanoseconds())/1000, "p50-µs")
			b.ReportMetric(float64(rtt[len(rtt)*99/100].Nanoseconds())/1000, "p99-µs")
		})
	}
}

// restoreLayout is the rule layout of ../shared/KERNEL.md, which the
// agent used before its decisions moved to the connmark alone: the
// connmark is restored into every packet's mark in PREROUTING and saved
// back from every marked packet in POSTROUTING.
func restoreLayout(pod netip.Prefix, queueNum int) string {
	return fmt.Sprintf(`*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -j CONNMARK --restore-mark --mask 0x3000
-A FORWARD -s %s -m mark --mark 0/0x3000 -j NFQUEUE --queue-num %d --queue-bypass
-A POSTROUTING -m mark ! --mark 0/0x3000 -j CONNMARK --save-mark --mask 0x3000
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -m mark --mark 0x1000/0x3000 -j MASQUERADE
COMMIT
`, pod, queueNum)
}

// BenchmarkKernelEstablished sends the packets of one established UDP
// flow from the pod through the node (its first packet decided by the
// queue, the rest never queued) and reports the CPU time per packet of
// the process, whose sends carry the node's forwarding: what the rules
// cost a flow's later packets. layout=connmark is the agent's layout,
// layout=restore the one it replaced, layout=kernel-only a node with
// conntrack and one MASQUERADE rule and nothing of ours (ip-masq-agent's
// cost for such a packet).
func BenchmarkKernelEstablished(b *testing.B) {
	for _, layout := range []string{"kernel-only", "restore", "connmark"} {
		b.Run("layout="+layout, func(b *testing.B) {
			netnstest.Require(b, "iptables-restore")
			top := netnstest.NewTopology(b)
			switch layout {
			case "kernel-only":
				restore(b, top.Node, "iptables-restore", fmt.Sprintf("*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s %s -j MASQUERADE\nCOMMIT\n", sandbox.PodCIDR4))
			case "restore":
				restore(b, top.Node, "iptables-restore", restoreLayout(sandbox.PodCIDR4, queue4))
			case "connmark":
				restore(b, top.Node, "iptables-restore", rulesFor(sandbox.PodCIDR4, queue4))
			}
			// The remote drops the flow before conntrack: no replies, no
			// ICMP errors.
			restore(b, top.Remote, "iptables-restore", "*raw\n-A PREROUTING -p udp --dport 9 -j DROP\nCOMMIT\n")
			pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
			if err != nil {
				b.Fatal(err)
			}
			q, rs := benchQueue(b, top, queue.Config{Policy: func() *nat.Policy { return pol }, Observer: &syncObserver{}})
			src := netip.AddrFrom4([4]byte{10, 244, 0, 2})
			d := netnstest.UDPDatagram(netip.AddrPortFrom(src, 4000), netip.AddrPortFrom(sandbox.Internet4, 9), make([]byte, 18))
			pkt := append(netnstest.IPv4Header(17, len(d), 5, 0, src, sandbox.Internet4), d...)
			// The first packet, decided before the clock starts.
			if err := rs.send(pkt); err != nil {
				b.Fatal(err)
			}
			if layout != "kernel-only" {
				deadline := time.Now().Add(5 * time.Second)
				for q.Stats().Verdicts == 0 {
					if time.Now().After(deadline) {
						b.Fatalf("first packet not answered: %+v", q.Stats())
					}
					time.Sleep(time.Millisecond) // polling the counter is the wait
				}
			}
			cpu0 := cputime.Process()
			b.ResetTimer()
			for range b.N {
				if err := rs.send(pkt); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			cpu := cputime.Process() - cpu0
			if st := q.Stats(); layout != "kernel-only" && st.Packets != 1 {
				b.Errorf("%d packets queued, want only the first", st.Packets)
			}
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/packet")
		})
	}
}

// benchQueue binds queue4 in the node with cfg (queue number, namespace
// and marks filled in), runs it until the benchmark ends, and opens a raw
// sender in the pod.
func benchQueue(b *testing.B, top *sandbox.Topology, cfg queue.Config) (*queue.Queue, *rawSender) {
	b.Helper()
	cfg.QueueNums, cfg.NetNS, cfg.Marks = []uint16{queue4}, top.Node.FD(), kernelMarks
	q, err := queue.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	stop := startQueue(b, q)
	b.Cleanup(func() {
		if err := stop(); err != nil {
			b.Error(err)
		}
	})
	rs, err := newRawSender(top)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rs.Close() })
	return q, rs
}

// BenchmarkKernelNewFlowsLoop runs new UDP flows through the kernel queue
// twice in one run: answered by this package's receive loop and by
// go-nfqueue's own (Register, a hook that decodes the packet, asks the
// policy and sends its verdict with the mark), with the same sender, policy and
// windows of 256 unanswered packets. It keeps measurable why the queue
// reads the socket itself. Run with an explicit count, e.g.
// -benchtime=20000x: every flow leaves a conntrack entry for 30 s.
func BenchmarkKernelNewFlowsLoop(b *testing.B) {
	b.Run("loop=nfmasq", func(b *testing.B) { benchLoop(b, false) })
	b.Run("loop=go-nfqueue", func(b *testing.B) { benchLoop(b, true) })
}

func benchLoop(b *testing.B, library bool) {
	netnstest.Require(b, "iptables-restore")
	top := netnstest.NewTopology(b)
	restore(b, top.Node, "iptables-restore", rulesFor(sandbox.PodCIDR4, queue4))
	pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
	if err != nil {
		b.Fatal(err)
	}
	var answered atomic.Int64
	var target atomic.Int64
	reached := make(chan struct{}, 1)
	count := func() {
		if answered.Add(1) == target.Load() {
			reached <- struct{}{}
		}
	}

	if library {
		nfq, err := nfqueue.Open(&nfqueue.Config{NfQueue: queue4, MaxPacketLen: queue.DefaultCopyRange, MaxQueueLen: queue.DefaultMaxQueueLen,
			Copymode: nfqueue.NfQnlCopyPacket, AfFamily: 2, NetNS: top.Node.FD()})
		if err != nil {
			b.Fatal(err)
		}
		defer nfq.Close()
		if err := nfq.Con.SetReadBuffer(queue.DefaultReadBuffer); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var p packet.Parsed
		hook := func(a nfqueue.Attribute) int {
			if a.PacketID == nil || a.Payload == nil {
				return 0
			}
			var m uint32
			if p.Decode(*a.Payload); p.Status.Valid() {
				m = kernelMarksFor(pol.Decide(p.Dst).Action)
			}
			if err := nfq.SetVerdictWithOption(*a.PacketID, nfqueue.NfAccept, nfqueue.WithMark(m)); err != nil {
				b.Error(err)
			}
			count()
			return 0
		}
		if err := nfq.RegisterWithErrorFunc(ctx, hook, func(error) int { return 0 }); err != nil {
			b.Fatal(err)
		}
	} else {
		q, err := queue.New(queue.Config{QueueNums: []uint16{queue4}, NetNS: top.Node.FD(), Marks: mark.Default,
			Policy: func() *nat.Policy { return pol }, Observer: observerFunc(func(*queue.Event) { count() })})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- q.Run(ctx) }()
		defer func() { cancel(); <-done }()
		select {
		case <-q.Ready():
		case err := <-done:
			b.Fatal(err)
		}
	}

	rs, err := newRawSender(top)
	if err != nil {
		b.Fatal(err)
	}
	defer rs.Close()
	// Distinct (source address, source port) pairs: every packet is the
	// first of its flow.
	pkts := make([][]byte, b.N)
	for i := range pkts {
		src := netip.AddrFrom4([4]byte{10, 244, 0, byte(2 + i/50000)})
		d := netnstest.UDPDatagram(netip.AddrPortFrom(src, uint16(10000+i%50000)), netip.AddrPortFrom(sandbox.Internet4, 9), []byte("bench"))
		pkts[i] = append(netnstest.IPv4Header(17, len(d), 5, 0, src, sandbox.Internet4), d...)
	}
	const window = 256
	cpu0 := cputime.Process()
	b.ResetTimer()
	start := time.Now()
	for sent := 0; sent < len(pkts); {
		n := min(window, len(pkts)-sent)
		target.Store(int64(sent + n))
		if err := rs.send(pkts[sent : sent+n]...); err != nil {
			b.Fatal(err)
		}
		sent += n
		select {
		case <-reached:
		case <-time.After(10 * time.Second):
			b.Fatalf("only %d of %d packets answered", answered.Load(), sent)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	cpu := cputime.Process() - cpu0
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "flows/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/1000, "cpu-µs/flow")
}

// kernelMarksFor is the verdict mark of an action in the default layout.
func kernelMarksFor(a nat.Action) uint32 {
	if a == nat.Masquerade {
		return mark.Default.Masquerade
	}
	return mark.Default.Passthrough
}

type observerFunc func(*queue.Event)

func (f observerFunc) Decided(ev *queue.Event) { f(ev) }
