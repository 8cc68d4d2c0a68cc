//go:build linux

package queue_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// The kernel tests build pod -> node -> remote namespaces, install by hand
// in the node the agent's minimal rule layout (queue pod packets of flows
// without a decision in their connmark, save the verdict's mark in the
// connmark, masquerade by connmark), bind the queue in the node namespace
// and look at what the remote receives.

var kernelMarks = mark.Default

const (
	queue4 = 7 // IPv4 packets go to this queue,
	queue6 = 8 // IPv6 packets to this one: two bindings in every test.
)

func rulesFor(pod netip.Prefix, queueNum int) string {
	return fmt.Sprintf(`*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A FORWARD -s %s -m connmark --mark 0/0x3000 -j NFQUEUE --queue-num %d --queue-bypass
-A POSTROUTING -m mark ! --mark 0/0x3000 -j CONNMARK --save-mark --mask 0x3000
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -m connmark --mark 0x1000/0x3000 -j MASQUERADE
COMMIT
`, pod, queueNum)
}

func restore(t testing.TB, ns *netns.NS, tool, payload string) {
	t.Helper()
	cmd := ns.Command(context.Background(), tool)
	cmd.Stdin = strings.NewReader(payload)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s in %s: %v: %s", tool, ns.Name, err, out)
	}
}

// kernelEnv is one topology with rules and a running Queue.
type kernelEnv struct {
	top    *sandbox.Topology
	q      *queue.Queue
	policy *nat.Policy
	obs    *syncObserver
	cancel context.CancelFunc
	done   chan error
}

type syncObserver struct {
	mu     sync.Mutex
	events []queue.Event
	// gate, when set, stalls every call until the channel is closed, so
	// that packets pile up in the kernel queue.
	gate atomic.Pointer[chan struct{}]
}

func (o *syncObserver) Decided(ev *queue.Event) {
	if g := o.gate.Load(); g != nil {
		<-*g
	}
	o.mu.Lock()
	o.events = append(o.events, *ev)
	o.mu.Unlock()
}

func (o *syncObserver) snapshot() []queue.Event {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]queue.Event(nil), o.events...)
}

func newKernelEnv(t *testing.T, workers int, tune ...func(*queue.Config)) *kernelEnv {
	t.Helper()
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	restore(t, top.Node, "iptables-restore", rulesFor(sandbox.PodCIDR4, queue4))
	restore(t, top.Node, "ip6tables-restore", rulesFor(sandbox.PodCIDR6, queue6))

	pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false), EnableIPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	env := &kernelEnv{top: top, policy: pol, obs: &syncObserver{}, done: make(chan error, 1)}
	cfg := queue.Config{
		QueueNums: []uint16{queue4, queue6},
		Workers:   workers,
		NetNS:     top.Node.FD(),
		Marks:     kernelMarks,
		Policy:    func() *nat.Policy { return pol },
		Observer:  env.obs,
	}
	for _, f := range tune {
		f(&cfg)
	}
	env.q, err = queue.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	env.cancel = cancel
	go func() { env.done <- env.q.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-env.done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-env.q.Ready():
	case err := <-env.done:
		env.done <- err
		t.Fatalf("Run returned before binding: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("queues not bound after 10s")
	}
	return env
}

// startQueue runs q until the returned stop is called, after it is bound
// (failing tb if Run returns first or binding takes over 10 s). stop
// cancels Run and returns its error.
func startQueue(tb testing.TB, q *queue.Queue) (stop func() error) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()
	select {
	case <-q.Ready():
	case err := <-done:
		cancel()
		tb.Fatalf("Run returned before binding: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		tb.Fatal("queues not bound after 10s")
	}
	return func() error {
		cancel()
		return <-done
	}
}

// procStats reads the node's nfnetlink_queue counters, from the test's
// side rather than through the Queue.
func procStats(t *testing.T, ns *netns.NS) map[uint16]queue.ProcStats {
	t.Helper()
	stats, err := queue.ProcStatsIn(ns.FD())
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[uint16]queue.ProcStats, len(stats))
	for _, s := range stats {
		m[s.QueueNum] = s
	}
	return m
}

// sendFlow sends n datagrams on one UDP socket from the pod, each after
// the previous one's echo, so that conntrack has seen the reply before
// the next packet.
func sendFlow(t *testing.T, pod *netns.NS, dst netip.AddrPort, n int) {
	t.Helper()
	var c *net.UDPConn
	if err := pod.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for i := range n {
		if _, err := c.Write([]byte(fmt.Sprintf("packet %d", i))); err != nil {
			t.Fatalf("flow to %v: %v", dst, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("flow to %v, packet %d: no echo: %v", dst, i, err)
		}
	}
}

func expectedSource(pol *nat.Policy, dst netip.Addr) netip.Addr {
	masq := pol.Decide(dst).Action == nat.Masquerade
	switch {
	case dst.Is4() && masq:
		return sandbox.NodeAddr4
	case dst.Is4():
		return sandbox.PodAddr4
	case masq:
		return sandbox.NodeAddr6
	}
	return sandbox.PodAddr6
}

// TestKernelFirstPacketOnly sends three-packet UDP flows to every remote
// destination, both families, and checks the far end and the counters:
// each flow shows the source the policy asks for, and only its first
// packet went through the queue.
func TestKernelFirstPacketOnly(t *testing.T) {
	for _, workers := range []int{0, 2} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			env := newKernelEnv(t, workers)
			const port = 9000
			sink, err := sandbox.StartSink(env.top.Remote, sandbox.Destinations, port)
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()

			const perFlow = 3
			wantMasq := 0
			for _, dst := range sandbox.Destinations {
				sendFlow(t, env.top.Pod, netip.AddrPortFrom(dst, port), perFlow)
				if env.policy.Decide(dst).Action == nat.Masquerade {
					wantMasq++
				}
			}
			for _, s := range sink.Seen() {
				if want := expectedSource(env.policy, s.Dst.Addr()); s.Src.Addr() != want {
					t.Errorf("remote %v saw source %v, want %v", s.Dst, s.Src, want)
				}
			}
			if wantMasq == 0 || wantMasq == len(sandbox.Destinations) {
				t.Fatalf("destinations do not exercise both actions (%d masqueraded)", wantMasq)
			}

			flows := uint64(len(sandbox.Destinations))
			// The echo can overtake the handler's bookkeeping after
			// its verdict; wait for the last event.
			netnstest.Poll(t, 5*time.Second, 2*time.Millisecond, "every event", func() bool { return len(env.obs.snapshot()) == int(flows) })
			st := env.q.Stats()
			if st.Packets != flows || st.Verdicts != flows || st.Masquerade != uint64(wantMasq) || st.Passthrough != flows-uint64(wantMasq) {
				t.Errorf("stats %+v: want %d packets (one per flow), %d masqueraded", st, flows, wantMasq)
			}
			if st.Skipped != 0 || st.Panics != 0 || st.VerdictErrors != 0 {
				t.Errorf("stats %+v: want no skipped ids, panics or verdict errors", st)
			}
			proc := procStats(t, env.top.Node)
			if got := uint64(proc[queue4].IDSequence + proc[queue6].IDSequence); got != flows {
				t.Errorf("kernel queued %d packets for %d flows of %d packets: %+v", got, flows, perFlow, proc)
			}
			for _, num := range []uint16{queue4, queue6} {
				if p := proc[num]; p.QueueTotal != 0 || p.CopyRange != queue.DefaultCopyRange || p.CopyMode != 2 {
					t.Errorf("queue %d: %+v", num, p)
				}
			}
			for _, ev := range env.obs.snapshot() {
				want := kernelMarks.Passthrough
				if ev.Decision.Action == nat.Masquerade {
					want = kernelMarks.Masquerade
				}
				if ev.Outcome != queue.Decided || ev.Mark != want || ev.Latency <= 0 || ev.Packet.Proto != packet.UDP {
					t.Errorf("event %+v", ev)
				}
				wantQueue := uint16(queue4)
				if ev.Packet.IPVersion == 6 {
					wantQueue = queue6
				}
				if ev.Queue != wantQueue {
					t.Errorf("IPv%d packet reported on queue %d", ev.Packet.IPVersion, ev.Queue)
				}
			}
		})
	}
}

// crafted is a hand-made packet sent with a raw socket from the pod.
type crafted struct {
	name string
	pkt  []byte
	// more are sent right after pkt (the rest of a fragmented datagram).
	more [][]byte
	// queued says whether the packet reaches the queue: the node's IP
	// stack and defragmentation drop or hold some packets before FORWARD,
	// and the queue rule takes only packets with a conntrack entry (a
	// flow whose connmark holds no decision yet), so those conntrack
	// calls invalid pass untouched, as they would with no agent: without
	// an entry they could be neither marked nor masqueraded. wantStatus
	// is how a queued packet decodes.
	queued     bool
	wantStatus packet.Status
}

func put16At(b []byte, i int, v uint16) []byte {
	binary.BigEndian.PutUint16(b[i:], v)
	return b
}

func withByte(b []byte, i int, v byte) []byte {
	b[i] = v
	return b
}

func craftedPackets() []crafted {
	pod4, pod6 := sandbox.PodAddr4, sandbox.PodAddr6
	dst4, dst6 := sandbox.Internet4, sandbox.Internet6
	// Every datagram gets a source port of its own: packets of one
	// 5-tuple after the first carry the saved mark and skip the queue.
	port := uint16(40000)
	datagram := func(src, dst netip.Addr) []byte {
		port++
		return netnstest.UDPDatagram(netip.AddrPortFrom(src, port), netip.AddrPortFrom(dst, 9100), []byte("crafted"))
	}
	udp4 := func() []byte { return datagram(pod4, dst4) }
	udp6 := func() []byte { return datagram(pod6, dst6) }
	// v4 wraps a UDP datagram in an IPv4 header of ihl words.
	v4 := func(ihl int, d []byte) []byte {
		return append(netnstest.IPv4Header(17, len(d), ihl, 0, pod4, dst4), d...)
	}
	// v6 builds an IPv6 packet with a correct payload length.
	v6 := func(nh byte, parts ...[]byte) []byte { return netnstest.IPv6Packet(nh, pod6, dst6, parts...) }

	big4 := netnstest.UDPDatagram(netip.AddrPortFrom(pod4, 39001), netip.AddrPortFrom(dst4, 9100), make([]byte, 40))
	big6 := netnstest.UDPDatagram(netip.AddrPortFrom(pod6, 39001), netip.AddrPortFrom(dst6, 9100), make([]byte, 40))
	icmpQuote := append(netnstest.IPv4Header(17, 8, 5, 0, dst4, pod4), netnstest.UDPDatagram(netip.AddrPortFrom(dst4, 9100), netip.AddrPortFrom(pod4, 39002), nil)...)
	icmpErr := append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, icmpQuote...)
	binary.BigEndian.PutUint16(icmpErr[2:], netnstest.Checksum(0, icmpErr))
	echo := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1}
	binary.BigEndian.PutUint16(echo[2:], netnstest.Checksum(0, echo))

	chain := make([][]byte, 0, packet.MaxExtHeaders+2)
	for range packet.MaxExtHeaders + 1 {
		chain = append(chain, netnstest.IPv6Options(60, 1))
	}
	chain[len(chain)-1][0] = 17
	chain = append(chain, udp6())

	rh0 := []byte{17, 0, 0, 0, 0, 0, 0, 0} // routing type 0, segments left 0

	// A datagram in two fragments, which the node reassembles before
	// FORWARD: the queue sees it once, whole.
	whole4 := netnstest.UDPDatagram(netip.AddrPortFrom(pod4, 39003), netip.AddrPortFrom(dst4, 9100), make([]byte, 40))
	whole6 := netnstest.UDPDatagram(netip.AddrPortFrom(pod6, 39003), netip.AddrPortFrom(dst6, 9100), make([]byte, 40))
	frag4a := append(netnstest.IPv4Header(17, 16, 5, 0x2000, pod4, dst4), whole4[:16]...)
	frag4b := append(netnstest.IPv4Header(17, len(whole4)-16, 5, 16/8, pod4, dst4), whole4[16:]...)
	binary.BigEndian.PutUint16(frag4b[4:], binary.BigEndian.Uint16(frag4a[4:]))
	binary.BigEndian.PutUint16(frag4b[10:], 0)
	binary.BigEndian.PutUint16(frag4b[10:], netnstest.Checksum(0, frag4b[:20]))
	frag6a := v6(44, []byte{17, 0, 0, 1, 0, 0, 0, 10}, whole6[:16])
	frag6b := v6(44, []byte{17, 0, 0, 16, 0, 0, 0, 10}, whole6[16:])

	return []crafted{
		{name: "ipv4 udp header cut by total length", pkt: v4(5, udp4()[:4]), queued: false},                                                          // conntrack: invalid
		{name: "ipv4 tcp header cut by total length", pkt: append(netnstest.IPv4Header(6, 10, 5, 0, pod4, dst4), make([]byte, 10)...), queued: false}, // conntrack: invalid
		{name: "ipv4 ihl 4", pkt: withByte(v4(5, udp4()), 0, 0x44), queued: false},
		{name: "ipv4 total length below header length", pkt: put16At(v4(5, udp4()), 2, 12), queued: false},
		{name: "ipv4 total length beyond the frame", pkt: put16At(v4(5, udp4()), 2, 400), queued: false},
		{name: "version 5 as ipv4", pkt: withByte(v4(5, udp4()), 0, 0x55), queued: false},
		{name: "non-IP bytes as ipv4", pkt: []byte("this is not an IP packet at all, just bytes"), queued: false},
		{name: "ipv4 options", pkt: v4(7, udp4()), queued: true, wantStatus: packet.OK},
		{name: "ipv4 unknown protocol", pkt: append(netnstest.IPv4Header(253, 16, 5, 0, pod4, dst4), []byte("not a transport!")...), queued: true, wantStatus: packet.OK},
		{name: "ipv4 datagram in two fragments", pkt: frag4a, more: [][]byte{frag4b}, queued: true, wantStatus: packet.OK},
		{name: "ipv4 lone first fragment", pkt: append(netnstest.IPv4Header(17, 16, 5, 0x2000, pod4, dst4), big4[:16]...), queued: false},
		{name: "ipv4 lone later fragment", pkt: append(netnstest.IPv4Header(17, 16, 5, 0x0004, pod4, dst4), big4[32:48]...), queued: false},
		{name: "ipv4 icmp error quoting a pod flow", pkt: append(netnstest.IPv4Header(1, len(icmpErr), 5, 0, pod4, dst4), icmpErr...), queued: false}, // conntrack: no such flow, invalid
		{name: "ipv4 icmp echo", pkt: append(netnstest.IPv4Header(1, len(echo), 5, 0, pod4, dst4), echo...), queued: true, wantStatus: packet.OK},
		{name: "ipv6 hop-by-hop and destination options", pkt: v6(0, netnstest.IPv6Options(60, 1), netnstest.IPv6Options(17, 2), udp6()), queued: true, wantStatus: packet.OK},
		{name: "ipv6 routing header type 0, no segments left", pkt: v6(43, rh0, udp6()), queued: true, wantStatus: packet.OK},
		{name: "ipv6 extension chain over the bound", pkt: v6(60, chain...), queued: true, wantStatus: packet.BadExtHeader},
		{name: "ipv6 udp header cut by payload length", pkt: v6(17, udp6()[:4]), queued: false}, // conntrack: invalid
		{name: "ipv6 no next header", pkt: v6(59, make([]byte, 8)), queued: false},              // conntrack: invalid
		{name: "ipv6 payload length beyond the packet", pkt: put16At(v6(17, udp6()), 4, 200), queued: false},
		{name: "ipv6 header with version 0", pkt: withByte(v6(17, udp6()), 0, 0x00), queued: false},
		{name: "ipv6 datagram in two fragments", pkt: frag6a, more: [][]byte{frag6b}, queued: true, wantStatus: packet.OK},
		{name: "ipv6 lone first fragment", pkt: v6(44, []byte{17, 0, 0, 1, 0, 0, 0, 9}, big6[:16]), queued: false},
	}
}

// sendRaw sends IP packets from the pod as Ethernet frames to the node
// (a packet socket, so that nothing in the pod's own stack checks or
// fixes them: bad header lengths and versions reach the node as written).
func sendRaw(t *testing.T, top *sandbox.Topology, pkts ...[]byte) {
	t.Helper()
	if err := trySendRaw(top, pkts...); err != nil {
		t.Fatal(err)
	}
}

func trySendRaw(top *sandbox.Topology, pkts ...[]byte) error {
	rs, err := newRawSender(top)
	if err != nil {
		return err
	}
	defer rs.Close()
	return rs.send(pkts...)
}

// rawSender is a packet socket in the pod, addressed to the node's end of
// the pod link. The socket belongs to the pod namespace whichever thread
// uses it.
type rawSender struct {
	fd       int
	ifindex  int
	gw       net.HardwareAddr
	sa4, sa6 unix.SockaddrLinklayer
}

func newRawSender(top *sandbox.Topology) (*rawSender, error) {
	rs := &rawSender{fd: -1}
	if err := top.Node.Do(func() error {
		ifi, err := net.InterfaceByName("pod0")
		if err == nil {
			rs.gw = ifi.HardwareAddr
		}
		return err
	}); err != nil {
		return nil, err
	}
	if err := top.Pod.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		rs.ifindex = ifi.Index
		rs.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		return nil, err
	}
	for _, x := range []struct {
		sa    *unix.SockaddrLinklayer
		proto uint16
	}{{&rs.sa4, 0x0800}, {&rs.sa6, 0x86dd}} {
		*x.sa = unix.SockaddrLinklayer{Ifindex: rs.ifindex, Protocol: htons(x.proto), Halen: 6}
		copy(x.sa.Addr[:], rs.gw)
	}
	return rs, nil
}

func (rs *rawSender) send(pkts ...[]byte) error {
	for _, p := range pkts {
		sa := &rs.sa4
		if len(p) > 0 && p[0]>>4 == 6 {
			sa = &rs.sa6
		}
		if err := unix.Sendto(rs.fd, p, 0, sa); err != nil {
			return fmt.Errorf("sending % x: %w", p[:min(len(p), 24)], err)
		}
	}
	return nil
}

func (rs *rawSender) Close() error { return unix.Close(rs.fd) }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestKernelCraftedPackets sends hostile and unusual packets through the
// live queue, one at a time: each one that reaches the queue gets a
// verdict (the kernel holds nothing afterwards), decodes to the expected
// status, and nothing panics; a normal flow still works afterwards.
func TestKernelCraftedPackets(t *testing.T) {
	env := newKernelEnv(t, 0)
	sentinels, err := sandbox.StartSink(env.top.Remote, []netip.Addr{sandbox.Internal4, sandbox.Internal6}, 9200)
	if err != nil {
		t.Fatal(err)
	}
	defer sentinels.Close()
	for _, c := range craftedPackets() {
		before := procStats(t, env.top.Node)
		events := len(env.obs.snapshot())
		sendRaw(t, env.top, append([][]byte{c.pkt}, c.more...)...)
		num := uint16(queue4)
		if c.pkt[0]>>4 == 6 || c.pkt[0] == 0 {
			num = queue6
		}
		if c.queued {
			netnstest.Poll(t, 5*time.Second, 2*time.Millisecond, c.name+" to be answered", func() bool {
				p := procStats(t, env.top.Node)[num]
				return p.IDSequence == before[num].IDSequence+1 && p.QueueTotal == 0 && len(env.obs.snapshot()) == events+1
			})
			ev := env.obs.snapshot()[events]
			if c.more != nil && (ev.Packet.Frag != packet.NotFragment || !ev.Packet.HasPorts()) {
				t.Errorf("%s: queued as %v, want the reassembled datagram", c.name, ev.Packet.String())
			}
			if ev.Packet.Status != c.wantStatus {
				t.Errorf("%s: decoded as %v, want status %v", c.name, ev.Packet.String(), c.wantStatus)
			}
			wantOutcome := queue.Decided
			if !c.wantStatus.Valid() {
				wantOutcome = queue.Malformed
			}
			if ev.Outcome != wantOutcome || ev.VerdictErr != nil {
				t.Errorf("%s: outcome %v (verdict error %v), want %v", c.name, ev.Outcome, ev.VerdictErr, wantOutcome)
			}
			continue
		}
		// A packet the node does not forward must not reach the queue;
		// a sentinel flow sent after it shows the path has been flushed.
		sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internal4, 9200), 1)
		sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internal6, 9200), 1)
		after := procStats(t, env.top.Node)
		if got := after[num].IDSequence - before[num].IDSequence; got != 1 {
			t.Errorf("%s: %d packets queued on queue %d, want only the sentinel flow's", c.name, got, num)
		}
	}
	// A packet leaves the kernel when its verdict is written, and is
	// counted as answered just after: wait for the counters to catch up.
	netnstest.Poll(t, 5*time.Second, 2*time.Millisecond, "every packet counted as answered", func() bool {
		st := env.q.Stats()
		return st.Packets == st.Verdicts+st.VerdictErrors
	})
	st := env.q.Stats()
	if st.Panics != 0 || st.VerdictErrors != 0 || st.Packets != st.Verdicts {
		t.Errorf("stats after crafted packets: %+v", st)
	}
	t.Logf("undecided by outcome %v, malformed by status %v", st.Undecided, st.Malformed)
	// The queue still decides ordinary traffic correctly.
	sink, err := sandbox.StartSink(env.top.Remote, []netip.Addr{sandbox.Internet4, sandbox.Internet6}, 9300)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internet4, 9300), 2)
	sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internet6, 9300), 2)
	for _, s := range sink.Seen() {
		if want := expectedSource(env.policy, s.Dst.Addr()); s.Src.Addr() != want {
			t.Errorf("after crafted packets, remote %v saw %v, want %v", s.Dst, s.Src, want)
		}
	}
}

// TestKernelStopAnswersEverything stops the queue while packets are piled
// up in it: the observer blocks on a gate, so the receive goroutine stalls
// after its first batch of verdicts and the kernel queue fills. After cancel, new
// flows must pass at once (queue length 0 with fail-open) although the
// queue is still stalled; once the gate opens, Run answers the piled-up
// packets and returns, every packet sent reaches the remote, and the
// queues are gone from the kernel.
func TestKernelStopAnswersEverything(t *testing.T) {
	// The drain deadline runs from cancel, and the gate stays shut for a
	// while after it: give it room on a loaded machine.
	const drainTimeout = 30 * time.Second
	env := newKernelEnv(t, 0, func(c *queue.Config) { c.DrainTimeout = drainTimeout })
	const port, perBatch = 9400, 200
	sink, err := sandbox.StartSink(env.top.Remote, []netip.Addr{sandbox.Internet4}, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	arrived := func() int { return len(sink.Seen()) }

	src := uint16(20000)
	newFlows := func(n int) [][]byte {
		pkts := make([][]byte, n)
		for i := range pkts {
			src++
			d := netnstest.UDPDatagram(netip.AddrPortFrom(sandbox.PodAddr4, src), netip.AddrPortFrom(sandbox.Internet4, port), []byte("stop test"))
			pkts[i] = append(netnstest.IPv4Header(17, len(d), 5, 0, sandbox.PodAddr4, sandbox.Internet4), d...)
		}
		return pkts
	}

	gate := make(chan struct{})
	env.obs.gate.Store(&gate)
	sendRaw(t, env.top, newFlows(perBatch)...)
	sent := perBatch
	// The first read's batch is answered before the observer stalls; the
	// rest waits in the kernel.
	var piled int
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "the queue to pile up", func() bool {
		piled = int(procStats(t, env.top.Node)[queue4].QueueTotal)
		return piled > 0 && piled+arrived() == perBatch
	})

	env.cancel()
	// Probe with new flows until one gets through: from then on the
	// kernel no longer queues.
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "new flows to bypass the stopping queue", func() bool {
		sendRaw(t, env.top, newFlows(1)...)
		sent++
		return arrived() > 1
	})
	before := arrived()
	sendRaw(t, env.top, newFlows(perBatch)...)
	sent += perBatch
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "flows sent after stop to arrive while the queue is stalled", func() bool {
		return arrived() >= before+perBatch
	})
	select {
	case err := <-env.done:
		t.Fatalf("Run returned (%v) with %d packets unanswered", err, procStats(t, env.top.Node)[queue4].QueueTotal)
	default:
	}

	start := time.Now()
	close(gate)
	err = <-env.done
	env.done <- nil // for the cleanup
	stopped := time.Since(start)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	t.Logf("drained %d piled-up packets in %v after the gate opened", piled, stopped)
	if stopped > 2*time.Second {
		t.Errorf("Run took %v to drain %d packets", stopped, piled)
	}
	if proc := procStats(t, env.top.Node); len(proc) != 0 {
		t.Errorf("queues still bound after Run returned: %+v", proc)
	}
	st := env.q.Stats()
	if st.Packets != st.Verdicts || st.Skipped != 0 || st.VerdictErrors != 0 {
		t.Errorf("stats after stop: %+v", st)
	}
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "every packet at the remote", func() bool { return arrived() == sent })
}

// TestKernelBindConflict: a queue number held by another listener is an
// error from Run, not a silent success.
func TestKernelBindConflict(t *testing.T) {
	env := newKernelEnv(t, 0)
	q, err := queue.New(queue.Config{
		QueueNums: []uint16{queue6 + 1, queue4},
		NetNS:     env.top.Node.FD(),
		Marks:     kernelMarks,
		Policy:    func() *nat.Policy { return env.policy },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := q.Run(ctx); err == nil || !strings.Contains(err.Error(), fmt.Sprint(queue4)) {
		t.Fatalf("Run on a taken queue: %v, want an error naming queue %d", err, queue4)
	}
	// The queue bound before the failure was released again.
	if _, ok := procStats(t, env.top.Node)[queue6+1]; ok {
		t.Error("queue bound before the failure is still bound")
	}
	// The first Queue is unaffected.
	sink, err := sandbox.StartSink(env.top.Remote, []netip.Addr{sandbox.Internet4}, 9500)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internet4, 9500), 1)
	netnstest.Poll(t, 5*time.Second, 2*time.Millisecond, "the flow's decision", func() bool { return env.q.Stats().Masquerade == 1 })
}

// TestKernelSocketOverflowCounted stalls the queue with a tiny socket
// buffer so that the kernel cannot deliver most packets: with fail-open
// they pass unmarked, and Skipped accounts for every id the kernel handed
// out but could not deliver.
func TestKernelSocketOverflowCounted(t *testing.T) {
	env := newKernelEnv(t, 0, func(c *queue.Config) {
		c.ReadBuffer = 4096
		c.MaxQueueLen = 10000
	})
	const port, flows = 9700, 300
	sink, err := sandbox.StartSink(env.top.Remote, []netip.Addr{sandbox.Internet4}, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	gate := make(chan struct{})
	env.obs.gate.Store(&gate)

	pkts := make([][]byte, flows)
	for i := range pkts {
		d := netnstest.UDPDatagram(netip.AddrPortFrom(sandbox.PodAddr4, uint16(30000+i)), netip.AddrPortFrom(sandbox.Internet4, port), []byte("overflow"))
		pkts[i] = append(netnstest.IPv4Header(17, len(d), 5, 0, sandbox.PodAddr4, sandbox.Internet4), d...)
	}
	sendRaw(t, env.top, pkts...)
	close(gate)
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "the queue to drain", func() bool {
		return procStats(t, env.top.Node)[queue4].QueueTotal == 0
	})
	// A gap shows when the next packet arrives: send one more flow.
	sendFlow(t, env.top.Pod, netip.AddrPortFrom(sandbox.Internet4, port), 1)
	netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "every id accounted for", func() bool {
		p := procStats(t, env.top.Node)[queue4]
		st := env.q.Stats()
		// More than flows+1 ids: the pod answers the remote's echoes
		// to its closed ports with ICMP errors, which are queued too.
		return p.IDSequence >= flows+1 && p.QueueTotal == 0 && st.Packets+st.Skipped == uint64(p.IDSequence) && st.Verdicts == st.Packets
	})
	st := env.q.Stats()
	t.Logf("%d of %d first packets delivered to the queue, %d skipped (failed open)", st.Packets, flows, st.Skipped)
	if st.Skipped == 0 {
		t.Errorf("a %d-byte socket buffer held all %d packets: the test proves nothing", 4096, flows)
	}
	// Arrival at the remote is not checked here: the burst that overflows
	// our socket overflows the remote's UDP socket too.
}

// TestKernelStartStopCycles binds and stops a queue repeatedly: every
// cycle binds (the previous one released the queue), and nothing leaks:
// goroutines and file descriptors return to where they started.
func TestKernelStartStopCycles(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "cycles")
	pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
	if err != nil {
		t.Fatal(err)
	}
	openFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	cycle := func() {
		q, err := queue.New(queue.Config{
			QueueNums: []uint16{1, 2},
			Workers:   1,
			NetNS:     ns.FD(),
			Marks:     kernelMarks,
			Policy:    func() *nat.Policy { return pol },
		})
		if err != nil {
			t.Fatal(err)
		}
		stop := startQueue(t, q)
		if p, err := q.ProcStats(); err != nil || len(p) != 2 {
			t.Fatalf("ProcStats while running: %+v, %v", p, err)
		}
		if err := stop(); err != nil {
			t.Fatalf("Run: %v", err)
		}
	}
	cycle() // warm up: the runtime's own threads and pollers
	goroutines, fds := runtime.NumGoroutine(), openFDs()
	const cycles = 20
	for range cycles {
		cycle()
	}
	netnstest.Poll(t, 5*time.Second, 2*time.Millisecond, "goroutines to finish", func() bool { return runtime.NumGoroutine() <= goroutines })
	if got := openFDs(); got > fds {
		t.Errorf("%d file descriptors open after %d cycles, %d before", got, cycles, fds)
	}
	if p := procStats(t, ns); len(p) != 0 {
		t.Errorf("queues bound after the last stop: %+v", p)
	}
}

// TestKernelBindUnderLoad binds the queue while new flows already stream
// into its rule: packets arrive between the bind command and the
// configuration that follows it, interleaved with the kernel's
// acknowledgements. Every bind must succeed and answer packets. (With
// go-nfqueue's bind the interleaving failed it: "mismatched sequence in
// netlink reply".)
func TestKernelBindUnderLoad(t *testing.T) {
	netnstest.Require(t, "iptables-restore")
	top := netnstest.NewTopology(t)
	restore(t, top.Node, "iptables-restore", rulesFor(sandbox.PodCIDR4, queue4))
	pol, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false)})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := newRawSender(top)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()

	// A bounded stream of new flows (the rule has --queue-bypass: while
	// no queue is bound they pass undecided).
	stop := make(chan struct{})
	sent := make(chan error, 1)
	go func() {
		const maxFlows, maxTime = 400000, 30 * time.Second
		deadline := time.Now().Add(maxTime)
		pkts := make([][]byte, 64)
		for i := 0; i < maxFlows && time.Now().Before(deadline); i += len(pkts) {
			select {
			case <-stop:
				sent <- nil
				return
			default:
			}
			for j := range pkts {
				n := i + j
				src := netip.AddrFrom4([4]byte{10, 244, 0, byte(2 + n/60000)})
				d := netnstest.UDPDatagram(netip.AddrPortFrom(src, uint16(1024+n%60000)), netip.AddrPortFrom(sandbox.Internet4, 9), []byte("bind"))
				pkts[j] = append(netnstest.IPv4Header(17, len(d), 5, 0, src, sandbox.Internet4), d...)
			}
			if err := rs.send(pkts...); err != nil && !errors.Is(err, unix.ENOBUFS) {
				sent <- err
				return
			}
		}
		sent <- errors.New("the load ended before the binds did")
	}()

	for cycle := range 5 {
		q, err := queue.New(queue.Config{
			QueueNums: []uint16{queue4},
			NetNS:     top.Node.FD(),
			Marks:     kernelMarks,
			Policy:    func() *nat.Policy { return pol },
		})
		if err != nil {
			t.Fatal(err)
		}
		stop := startQueue(t, q) // fails the test if the bind under load fails
		netnstest.Poll(t, 10*time.Second, 2*time.Millisecond, "packets answered", func() bool { return q.Stats().Masquerade > 100 })
		if err := stop(); err != nil {
			t.Fatalf("cycle %d: Run: %v", cycle, err)
		}
		if st := q.Stats(); st.VerdictErrors != 0 || st.NetlinkOther != 0 {
			t.Errorf("cycle %d: stats %+v", cycle, st)
		}
	}
	close(stop)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
}
