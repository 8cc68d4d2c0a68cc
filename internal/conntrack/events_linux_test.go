package conntrack

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/cputime"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/nl"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

var updateCorpus = flag.Bool("update-corpus", false, "write the kernel events TestKernelEvents captures to testdata/fuzz/FuzzDecodeEvent")

// captured is one datagram read from an event socket.
type captured struct {
	dgram     []byte
	truncated bool
}

// capture subscribes a raw socket in netns to every conntrack entry event
// and returns a function that reads what has arrived.
func capture(t testing.TB, netns int) func() []captured {
	t.Helper()
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.SetReadBuffer(DefaultReadBuffer); err != nil {
		t.Fatal(err)
	}
	for _, g := range netfilter.GroupsCT {
		if err := conn.JoinGroup(uint32(g)); err != nil {
			t.Fatal(err)
		}
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rx := nl.NewReceiver(rc, 64, 64<<10)
	return func() []captured {
		var out []captured
		for {
			n, err := rx.Read(false)
			if err != nil {
				t.Fatalf("capture: %v", err)
			}
			if n == 0 {
				return out
			}
			for i := range n {
				out = append(out, captured{slices.Clone(rx.Datagram(i)), rx.Truncated(i)})
			}
		}
	}
}

// TestKernelEvents captures the events of real flows (UDP and TCP, both
// families, masqueraded or not) and of entries made over netlink (ICMP,
// ICMPv6 in a zone), and checks that decodeEvent reads each as ti-mo does.
// With -update-corpus it writes one of each kind to the fuzz corpus.
func TestKernelEvents(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	for _, fam := range []struct {
		cmd           string
		pod, internet netip.Addr
	}{{"iptables-restore", sandbox.PodAddr4, sandbox.Internet4}, {"ip6tables-restore", sandbox.PodAddr6, sandbox.Internet6}} {
		restore(t, top.Node, fam.cmd, fmt.Sprintf("*mangle\n-A FORWARD -s %s -j CONNMARK --set-xmark %#x/%#x\nCOMMIT\n*nat\n-A POSTROUTING -s %s -d %s -j MASQUERADE\nCOMMIT\n",
			fam.pod, mark.Default.Masquerade, mark.Default.Mask, fam.pod, fam.internet))
	}
	if _, err := EnableAccounting(top.Node.FD()); err != nil {
		t.Fatal(err)
	}
	read := capture(t, top.Node.FD())
	sink, err := sandbox.StartSink(top.Remote, sandbox.Destinations, 9000)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	for _, d := range []netip.Addr{sandbox.Internet4, sandbox.Internal4, sandbox.Internet6, sandbox.Internal6} {
		dst := netip.AddrPortFrom(d, 9000)
		if _, ok, err := sandbox.SendUDP(top.Pod, dst, make([]byte, 100), 5*time.Second); err != nil || !ok {
			t.Fatalf("udp to %v: echoed %v, %v", dst, ok, err)
		}
		if _, _, err := sandbox.SendTCP(top.Pod, dst, make([]byte, 1000), 5*time.Second); err != nil {
			t.Fatalf("tcp to %v: %v", dst, err)
		}
	}
	c, err := ct.Dial(&netlink.Config{NetNS: top.Node.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	icmp := ct.NewFlow(1, 0, sandbox.PodAddr4, sandbox.Internet4, 0, 0, 30, mark.Default.Fallback)
	icmp.TupleOrig.Proto.ICMPType, icmp.TupleOrig.Proto.ICMPID = 8, 77
	icmp.TupleReply.Proto.ICMPType, icmp.TupleReply.Proto.ICMPID = 0, 77
	icmp6 := ct.NewFlow(58, 0, sandbox.PodAddr6, sandbox.Internet6, 0, 0, 30, 0)
	icmp6.Zone = 7
	icmp6.TupleOrig.Proto.ICMPType, icmp6.TupleOrig.Proto.ICMPID = 128, 78
	icmp6.TupleReply.Proto.ICMPType, icmp6.TupleReply.Proto.ICMPID = 129, 78
	for _, f := range []ct.Flow{icmp, icmp6} {
		if err := c.Create(f); err != nil {
			t.Fatalf("create %v: %v", f.TupleOrig, err)
		}
	}
	entries := len(dump(t, top.Node.FD()))
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}

	var got []captured
	destroyed := 0
	netnstest.Poll(t, 10*time.Second, 5*time.Millisecond, fmt.Sprintf("%d destroy events", entries), func() bool {
		for _, c := range read() {
			got = append(got, c)
			if nl.MessageType(c.dgram)&0xff == msgCTDelete {
				destroyed++
			}
		}
		return destroyed >= entries
	})

	seeds := map[string][]byte{}
	largest := 0
	for _, c := range got {
		largest = max(largest, len(c.dgram))
		if c.truncated {
			t.Fatalf("event of %d bytes truncated", len(c.dgram))
		}
		msg, rest, ok := nl.NextMessage(c.dgram)
		if !ok || len(rest) != 0 {
			t.Fatalf("datagram is not one message: %x", c.dgram)
		}
		ev := checkDecode(t, msg)
		seeds[seedName(ev)] = msg
	}
	t.Logf("%d events from %d entries, %d kinds; largest datagram %d bytes", len(got), entries, len(seeds), largest)
	if largest > eventSlotSize/2 {
		t.Errorf("an event of %d bytes leaves less than half of the %d-byte receive slot spare", largest, eventSlotSize)
	}
	if *updateCorpus {
		dir := filepath.Join("testdata", "fuzz", "FuzzDecodeEvent")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, msg := range seeds {
			body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(msg)) + ")\n"
			if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestTruncatedEvent reads with receive slots shorter than an event: the
// event is counted as a decode error, and reading goes on.
func TestTruncatedEvent(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "cttrunc")
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: ns.FD()})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{NetNS: ns.FD(), Buffer: 8}
	if _, err := setUp(conn, cfg); err != nil {
		t.Fatal(err)
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	l := &Listener{cfg: cfg, events: make(chan Event, cfg.Buffer), done: make(chan struct{}),
		sys: listenerSys{conn: conn, rx: nl.NewReceiver(rc, 4, 64)}}
	go l.run()
	t.Cleanup(func() { l.Close() })

	for i, want := range []uint64{1, 2} {
		createUDP(t, ns.FD(), sandbox.Internet4, 1000+i, 1, 0)
		if _, err := DeleteStale(context.Background(), ns.FD(), func(Flow) bool { return true }, []uint8{17}); err != nil {
			t.Fatal(err)
		}
		netnstest.Poll(t, 10*time.Second, 5*time.Millisecond, fmt.Sprintf("decode error %d", want), func() bool { return l.Stats().DecodeErrors == want })
	}
	if st := l.Stats(); st.Received != 0 || l.Err() != nil {
		t.Errorf("stats %+v, err %v", st, l.Err())
	}
}

// seedName names a captured event by what it is, so that a new capture
// replaces the seed of the same kind.
func seedName(ev Event) string {
	kind := map[EventType]string{0: "update", EventNew: "new", EventDestroy: "destroy"}[ev.Type]
	proto := map[uint8]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmp"}[ev.Flow.Proto]
	if proto == "" {
		proto = strconv.Itoa(int(ev.Flow.Proto))
	}
	fam := "4"
	if ev.Flow.Orig.Src.Addr().Is6() {
		fam = "6"
	}
	name := "kernel-" + kind + "-" + proto + fam
	if ev.Flow.Masqueraded() {
		name += "-nat"
	}
	return name
}

// runOld is the listener's reader as it was before decodeEvent: one
// datagram per mdlayher/netlink Receive (which peeks, then reads into
// fresh memory, and copies every message), ti-mo's Unmarshal, fromCT.
// It is kept to measure the new reader against.
func (l *Listener) runOld() {
	defer close(l.done)
	defer close(l.events)
	for {
		msgs, err := l.sys.conn.Receive()
		if err != nil {
			if l.closing.Load() {
				return
			}
			if errors.Is(err, unix.ENOBUFS) {
				l.overrun()
				continue
			}
			l.err = fmt.Errorf("receive conntrack events: %w", err)
			return
		}
		for _, m := range msgs {
			var ev ct.Event
			if err := ev.Unmarshal(m); err != nil || ev.Flow == nil {
				l.decodeErrors.Add(1)
				continue
			}
			var typ EventType
			switch ev.Type {
			case ct.EventNew:
				typ = EventNew
			case ct.EventDestroy:
				typ = EventDestroy
			default:
				continue
			}
			l.deliver(Event{Type: typ, Flow: fromCT(ev.Flow)})
		}
	}
}

// listenOld is Listen with the old reader.
func listenOld(tb testing.TB, cfg Config) *Listener {
	tb.Helper()
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: cfg.NetNS})
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := setUp(conn, cfg); err != nil {
		conn.Close()
		tb.Fatal(err)
	}
	l := &Listener{cfg: cfg, events: make(chan Event, cfg.Buffer), done: make(chan struct{}), sys: listenerSys{conn: conn}}
	go l.runOld()
	tb.Cleanup(func() { l.Close() })
	return l
}

// BenchmarkKernelDestroy measures the CPU the whole process spends per
// destroy event while a listener reads a flush of kernelEntries UDP
// entries: the old reader (mdlayher Receive, ti-mo, fromCT) against the
// new one (recvmmsg, decodeEvent). The flush runs in a conntrack(8)
// process, so the kernel's work of destroying the entries and queueing
// the events is not counted; reading, decoding and delivering them is,
// and so is the benchmark's own draining of Events, the same in both.
func BenchmarkKernelDestroy(b *testing.B) {
	netnstest.Require(b, "conntrack")
	const kernelEntries = 20000
	ns := netnstest.New(b, "ctbench")
	for _, impl := range []struct {
		name   string
		listen func(testing.TB, Config) *Listener
	}{{"old", listenOld}, {"new", listen}} {
		b.Run(impl.name, func(b *testing.B) {
			// A buffer that holds the whole flush: an overrun would
			// make the two readers' work differ.
			l := impl.listen(b, Config{NetNS: ns.FD(), Buffer: kernelEntries, ReadBuffer: 512 << 20})
			var cpu, wall time.Duration
			rounds := 0
			for b.Loop() {
				rounds++
				b.StopTimer()
				createUDP(b, ns.FD(), sandbox.Internet4, 1000, kernelEntries, 0)
				// The flush waits for a line on its standard input:
				// starting a process costs this one CPU too.
				flush := ns.Command(context.Background(), "sh", "-c", "read go && exec conntrack -F")
				flush.Stderr = io.Discard
				in, err := flush.StdinPipe()
				if err != nil {
					b.Fatal(err)
				}
				if err := flush.Start(); err != nil {
					b.Fatal(err)
				}
				// Collect the creation's garbage now, not while measuring.
				runtime.GC()
				b.StartTimer()
				start, startCPU := time.Now(), cputime.Process()
				if _, err := io.WriteString(in, "go\n"); err != nil {
					b.Fatal(err)
				}
				timeout := time.After(30 * time.Second)
				for range kernelEntries {
					select {
					case <-l.Events():
					case <-timeout:
						b.Fatalf("flush: stats %+v", l.Stats())
					}
				}
				cpu += cputime.Process() - startCPU
				wall += time.Since(start)
				b.StopTimer()
				if err := flush.Wait(); err != nil {
					b.Fatalf("conntrack -F: %v", err)
				}
				b.StartTimer()
			}
			if st := l.Stats(); st.Overruns != 0 || st.DecodeErrors != 0 || st.Dropped != 0 {
				b.Fatalf("stats %+v", st)
			}
			events := float64(rounds * kernelEntries)
			b.ReportMetric(float64(cpu.Nanoseconds())/events, "cpu-ns/event")
			b.ReportMetric(events/wall.Seconds(), "events/s")
		})
	}
}
