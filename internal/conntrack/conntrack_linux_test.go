package conntrack

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"

	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

var podCIDRs = []netip.Prefix{sandbox.PodCIDR4, sandbox.PodCIDR6}

// restore loads an iptables-restore payload into ns without flushing.
func restore(t testing.TB, ns *netns.NS, cmd, payload string) {
	t.Helper()
	c := ns.Command(context.Background(), cmd, "--noflush")
	c.Stdin = strings.NewReader(payload)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s\n%s", cmd, err, out, payload)
	}
}

var counterLine = regexp.MustCompile(`^\[(\d+):(\d+)\] .*--comment "?([a-z0-9.:-]+)"?`)

// ruleCounters returns the counters of the commented rules in ns, by comment.
func ruleCounters(t testing.TB, ns *netns.NS) map[string]Counters {
	t.Helper()
	out := map[string]Counters{}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		for line := range strings.Lines(netnstest.Run(t, ns, cmd, "-c", "-t", "filter")) {
			m := counterLine.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			p, _ := strconv.ParseUint(m[1], 10, 64)
			b, _ := strconv.ParseUint(m[2], 10, 64)
			out[m[3]] = Counters{Packets: p, Bytes: b}
		}
	}
	return out
}

// dump lists the conntrack table of ns.
func dump(t testing.TB, netns int) []ct.Flow {
	t.Helper()
	c, err := ct.Dial(&netlink.Config{NetNS: netns})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		t.Fatal(err)
	}
	return flows
}

// collect reads events until n match keep, or fails t at the deadline.
func collect(t testing.TB, l *Listener, n int, keep func(Event) bool) []Event {
	t.Helper()
	var got []Event
	timeout := time.After(10 * time.Second)
	for len(got) < n {
		select {
		case ev, ok := <-l.Events():
			if !ok {
				t.Fatalf("events closed after %d of %d: %v", len(got), n, l.Err())
			}
			if keep(ev) {
				got = append(got, ev)
			}
		case <-timeout:
			t.Fatalf("got %d of %d events; stats %+v", len(got), n, l.Stats())
		}
	}
	return got
}

func listen(t testing.TB, cfg Config) *Listener {
	t.Helper()
	l, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}

// TestFlowEnd sends UDP and TCP flows of both families from the pod
// through the node, some masqueraded, and checks the destroy events
// against what iptables counted and what the remote host saw.
func TestFlowEnd(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save")
	top := netnstest.NewTopology(t)

	type dest struct {
		addr    netip.Addr
		mark    uint32
		masq    bool
		decider mark.Decider
	}
	dests := []dest{
		{sandbox.Internet4, mark.Default.Masquerade, true, mark.AgentMasquerade},
		{sandbox.Internal4, mark.Default.Passthrough, false, mark.AgentPassthrough},
		{sandbox.CGNAT4, mark.Default.Fallback, true, mark.KernelFallback},
		{sandbox.Internet6, mark.Default.Masquerade, true, mark.AgentMasquerade},
		{sandbox.Internal6, mark.Default.Passthrough, false, mark.AgentPassthrough},
	}
	// Stand-ins for the agent's rules: a connmark per destination, kernel
	// MASQUERADE, and one counting rule per flow and direction.
	for _, fam := range []struct {
		cmd string
		pod netip.Addr
		v4  bool
	}{{"iptables-restore", sandbox.PodAddr4, true}, {"ip6tables-restore", sandbox.PodAddr6, false}} {
		var mangle, nat, filter strings.Builder
		for _, d := range dests {
			if d.addr.Is4() != fam.v4 {
				continue
			}
			fmt.Fprintf(&mangle, "-A FORWARD -s %s -d %s -j CONNMARK --set-xmark %#x/%#x\n", fam.pod, d.addr, d.mark, mark.Default.Mask)
			if d.masq {
				fmt.Fprintf(&nat, "-A POSTROUTING -s %s -d %s -j MASQUERADE\n", fam.pod, d.addr)
			}
			for _, proto := range []string{"udp", "tcp"} {
				fmt.Fprintf(&filter, "-A FORWARD -s %s -d %s -p %s -m comment --comment orig-%s-%s\n", fam.pod, d.addr, proto, proto, d.addr)
				fmt.Fprintf(&filter, "-A FORWARD -s %s -d %s -p %s -m comment --comment reply-%s-%s\n", d.addr, fam.pod, proto, proto, d.addr)
			}
		}
		restore(t, top.Node, fam.cmd, "*mangle\n"+mangle.String()+"COMMIT\n*nat\n"+nat.String()+"COMMIT\n*filter\n"+filter.String()+"COMMIT\n")
	}

	changed, err := EnableAccounting(top.Node.FD())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp", "net.netfilter.nf_conntrack_events"}
	if !slices.Equal(changed, want) {
		t.Errorf("EnableAccounting in a fresh namespace changed %v, want %v", changed, want)
	}
	if changed, err := EnableAccounting(top.Node.FD()); err != nil || len(changed) != 0 {
		t.Errorf("second EnableAccounting changed %v, %v", changed, err)
	}

	l := listen(t, Config{NetNS: top.Node.FD(), PodCIDRs: podCIDRs})
	sink, err := sandbox.StartSink(top.Remote, sandbox.Destinations, 9000)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	type sent struct {
		proto   uint8
		local   netip.AddrPort
		dst     netip.AddrPort
		payload int
		dest    dest
	}
	var flows []sent
	start := time.Now()
	for _, d := range dests {
		dst := netip.AddrPortFrom(d.addr, 9000)
		local, ok, err := sandbox.SendUDP(top.Pod, dst, make([]byte, 100), 5*time.Second)
		if err != nil || !ok {
			t.Fatalf("udp to %v: echoed %v, %v", dst, ok, err)
		}
		flows = append(flows, sent{17, local, dst, 100, d})
		local, _, err = sandbox.SendTCP(top.Pod, dst, make([]byte, 1000), 5*time.Second)
		if err != nil {
			t.Fatalf("tcp to %v: %v", dst, err)
		}
		flows = append(flows, sent{6, local, dst, 1000, d})
	}
	// The node's own flow is not a pod's: the listener must ignore it.
	if _, ok, err := sandbox.SendUDP(top.Node, netip.AddrPortFrom(sandbox.Internet4, 9000), []byte("node"), 5*time.Second); err != nil || !ok {
		t.Fatalf("udp from the node: %v, %v", ok, err)
	}
	// Wait until the last ACK of each TCP flow has crossed the node, so that
	// no packet arrives after its entry is deleted.
	netnstest.Poll(t, 10*time.Second, 5*time.Millisecond, "TCP flows in TIME_WAIT", func() bool {
		n := 0
		for _, f := range dump(t, top.Node.FD()) {
			if f.TupleOrig.Proto.Protocol == 6 && f.ProtoInfo.TCP != nil && f.ProtoInfo.TCP.State == 7 {
				n++
			}
		}
		return n == len(dests)
	})
	counted := ruleCounters(t, top.Node)
	if len(counted) != 4*len(dests) {
		t.Fatalf("found %d counting rules, want %d: %v", len(counted), 4*len(dests), counted)
	}

	pod := func(f Flow) bool { return InPrefixes(podCIDRs, f.Orig.Src.Addr()) }
	deleted, err := DeleteStale(context.Background(), top.Node.FD(), pod, []uint8{6, 17})
	if err != nil || deleted != len(flows) {
		t.Fatalf("DeleteStale deleted %d of %d: %v", deleted, len(flows), err)
	}
	events := collect(t, l, len(flows), func(ev Event) bool { return ev.Type == EventDestroy })

	seen := sink.Seen()
	for _, s := range flows {
		proto := map[uint8]string{6: "tcp", 17: "udp"}[s.proto]
		name := fmt.Sprintf("%s %v->%v", proto, s.local, s.dst)
		i := slices.IndexFunc(events, func(ev Event) bool {
			return ev.Flow.Proto == s.proto && ev.Flow.Orig.Src == s.local && ev.Flow.Orig.Dst == s.dst
		})
		if i < 0 {
			t.Errorf("%s: no destroy event", name)
			continue
		}
		f := events[i].Flow
		wantOrig, wantReply := counted["orig-"+proto+"-"+s.dst.Addr().String()], counted["reply-"+proto+"-"+s.dst.Addr().String()]
		t.Logf("%s: %v", name, f)
		if wantOrig.Packets == 0 || !f.Accounted || f.OrigCounters != wantOrig || f.ReplyCounters != wantReply {
			t.Errorf("%s: counters orig %+v reply %+v, iptables counted %+v and %+v", name, f.OrigCounters, f.ReplyCounters, wantOrig, wantReply)
		}
		if s.proto == 17 {
			hdr := uint64(20 + 8)
			if s.dst.Addr().Is6() {
				hdr = 40 + 8
			}
			one := Counters{Packets: 1, Bytes: hdr + uint64(s.payload)}
			if f.OrigCounters != one || f.ReplyCounters != one {
				t.Errorf("%s: counters %+v/%+v, want one %d-byte packet each way", name, f.OrigCounters, f.ReplyCounters, one.Bytes)
			}
		}
		j := slices.IndexFunc(seen, func(v sandbox.Seen) bool { return v.Proto == proto && v.Dst == s.dst })
		if j < 0 {
			t.Errorf("%s: the remote recorded nothing", name)
		} else if got := f.Translated(); got != seen[j].Src {
			t.Errorf("%s: translated source %v, the remote saw %v", name, got, seen[j].Src)
		}
		if f.Masqueraded() != s.dest.masq {
			t.Errorf("%s: Masqueraded() = %v, want %v", name, f.Masqueraded(), s.dest.masq)
		}
		if got := mark.Default.Classify(f.Mark); got != s.dest.decider {
			t.Errorf("%s: mark %#x classified %v, want %v", name, f.Mark, got, s.dest.decider)
		}
		if f.ID == 0 || f.Start.Before(start.Add(-time.Second)) || f.Stop.Before(f.Start) || f.Duration(time.Now()) <= 0 {
			t.Errorf("%s: id %d, start %v, stop %v", name, f.ID, f.Start, f.Stop)
		}
	}

	if _, err := DeleteStale(context.Background(), top.Node.FD(), func(Flow) bool { return true }, []uint8{17}); err != nil {
		t.Fatal(err)
	}
	netnstest.Poll(t, 10*time.Second, 5*time.Millisecond, "the node's own flow to be ignored", func() bool { return l.Stats().Ignored >= 1 })
	if st := l.Stats(); st.Delivered < uint64(len(flows)) || st.Dropped != 0 || st.Overruns != 0 || st.DecodeErrors != 0 {
		t.Errorf("stats %+v", st)
	}
}

// createUDP inserts n UDP entries from the pod address to dst through
// netlink, with the given connmark.
func createUDP(t testing.TB, netns int, dst netip.Addr, firstPort, n int, mark uint32) {
	t.Helper()
	c, err := ct.Dial(&netlink.Config{NetNS: netns})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := sandbox.PodAddr4
	if dst.Is6() {
		src = sandbox.PodAddr6
	}
	for i := range n {
		f := ct.NewFlow(17, 0, src, dst, uint16(firstPort+i), 53, 120, mark)
		if err := c.Create(f); err != nil {
			t.Fatalf("create entry %d: %v", i, err)
		}
	}
}

// TestFlowCreatedBeforeListening is why EnableAccounting sets
// nf_conntrack_events to 1: a flow the kernel fallback decided while the
// agent was down must still produce a destroy event once it is back.
func TestFlowCreatedBeforeListening(t *testing.T) {
	netnstest.Require(t)
	for _, tt := range []struct {
		name   string
		enable bool
	}{{"events=2", false}, {"enabled", true}} {
		t.Run(tt.name, func(t *testing.T) {
			ns := netnstest.New(t, "ctev")
			if err := ns.Sysctl("net.netfilter.nf_conntrack_events", "2"); err != nil {
				t.Fatal(err)
			}
			if tt.enable {
				if _, err := EnableAccounting(ns.FD()); err != nil {
					t.Fatal(err)
				}
			}
			early, late := sandbox.Internet4, sandbox.Internal4
			createUDP(t, ns.FD(), early, 1000, 1, mark.Default.Fallback)
			l := listen(t, Config{NetNS: ns.FD()})
			createUDP(t, ns.FD(), late, 2000, 1, mark.Default.Masquerade)
			// Delete the early flow first: events arrive in order, so the
			// first event tells whether the early flow had one.
			for _, d := range []netip.Addr{early, late} {
				if _, err := DeleteStale(context.Background(), ns.FD(), func(f Flow) bool { return f.Orig.Dst.Addr() == d }, []uint8{17}); err != nil {
					t.Fatal(err)
				}
			}
			first := collect(t, l, 1, func(Event) bool { return true })[0]
			gotEarly := first.Flow.Orig.Dst.Addr() == early
			switch {
			case tt.enable && !gotEarly:
				t.Errorf("with nf_conntrack_events=1 the flow created before listening had no destroy event; first event: %v", first.Flow)
			case tt.enable && mark.Default.Classify(first.Flow.Mark) != mark.KernelFallback:
				t.Errorf("early flow classified %v", mark.Default.Classify(first.Flow.Mark))
			case !tt.enable:
				t.Logf("nf_conntrack_events=2: flow created before listening had a destroy event: %v", gotEarly)
			}
		})
	}
}

// TestOverrun floods a listener with a tiny socket buffer: the kernel drops
// events (ENOBUFS), the listener counts each overrun, reports it, and keeps
// reading.
func TestOverrun(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "ctovr")
	overruns := make(chan struct{}, 1<<16)
	l := listen(t, Config{NetNS: ns.FD(), ReadBuffer: 16384, Buffer: 1 << 14, OnOverrun: func() { overruns <- struct{}{} }})
	const n = 3000
	createUDP(t, ns.FD(), sandbox.Internet4, 1000, n, 0)
	c, err := ct.Dial(&netlink.Config{NetNS: ns.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	// The listener keeps reading after the overruns: a flow destroyed
	// after the flood arrives. Until the reader has emptied the socket the
	// kernel keeps dropping events (under the overrun already reported),
	// so probe until one gets through.
	got := false
	deadline := time.Now().Add(10 * time.Second)
	for port := 5000; !got; port++ {
		if time.Now().After(deadline) {
			t.Fatalf("no event after the flood; stats %+v", l.Stats())
		}
		createUDP(t, ns.FD(), sandbox.Internal4, port, 1, 0)
		if _, err := DeleteStale(context.Background(), ns.FD(), func(f Flow) bool { return f.Orig.Dst.Addr() == sandbox.Internal4 }, []uint8{17}); err != nil {
			t.Fatal(err)
		}
		wait := time.After(200 * time.Millisecond)
	drain:
		for {
			select {
			case ev := <-l.Events():
				if ev.Flow.Orig.Dst.Addr() == sandbox.Internal4 {
					got = true
					break drain
				}
			case <-wait:
				break drain
			}
		}
	}
	st := l.Stats()
	if st.Overruns == 0 {
		t.Fatalf("no overrun with a 16 KiB buffer and %d destroy events: %+v", n, st)
	}
	if got := len(overruns); uint64(got) != st.Overruns {
		t.Errorf("OnOverrun called %d times for %d overruns", got, st.Overruns)
	}
	if st.Received >= n || st.DecodeErrors != 0 {
		t.Errorf("stats %+v after %d events", st, n)
	}
	t.Logf("%d destroy events: %d received, %d overruns", n, st.Received, st.Overruns)
}

// TestReliable floods a listener in reliable mode with the same small
// buffer that loses most events without it: every destroy event arrives.
func TestReliable(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "ctrel")
	const n = 3000
	l := listen(t, Config{NetNS: ns.FD(), ReadBuffer: 16384, Buffer: 2 * n, Reliable: true})
	createUDP(t, ns.FD(), sandbox.Internet4, 1000, n, 0)
	c, err := ct.Dial(&netlink.Config{NetNS: ns.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	netnstest.Poll(t, 10*time.Second, 5*time.Millisecond, "every destroy event", func() bool { return l.Stats().Delivered == n })
	if st := l.Stats(); st.Overruns != 0 || st.Received != n {
		t.Errorf("stats %+v", st)
	}
	t.Logf("%d destroy events through a 16 KiB socket buffer in %v", n, time.Since(start))

	if _, err := Listen(Config{NetNS: ns.FD(), Reliable: true, New: true}); err == nil {
		t.Error("Listen accepted Reliable with New")
	}
}

func TestDeleteStale(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "ctdel")
	createUDP(t, ns.FD(), sandbox.Internet4, 1000, 2, mark.Default.Masquerade)
	createUDP(t, ns.FD(), sandbox.Internal4, 1000, 1, mark.Default.Passthrough)
	createUDP(t, ns.FD(), sandbox.Internet6, 1000, 1, mark.Default.Masquerade)
	c, err := ct.Dial(&netlink.Config{NetNS: ns.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tcp := ct.NewFlow(6, 0, sandbox.PodAddr4, sandbox.Internet4, 40000, 443, 120, mark.Default.Masquerade)
	tcp.ProtoInfo.TCP = &ct.ProtoInfoTCP{State: 3}
	icmp := ct.NewFlow(1, 0, sandbox.PodAddr4, sandbox.Internet4, 0, 0, 30, mark.Default.Masquerade)
	icmp.TupleOrig.Proto.ICMPType, icmp.TupleOrig.Proto.ICMPID = 8, 77
	icmp.TupleReply.Proto.ICMPType, icmp.TupleReply.Proto.ICMPID = 0, 77
	for _, f := range []ct.Flow{tcp, icmp} {
		if err := c.Create(f); err != nil {
			t.Fatalf("create %v: %v", f.TupleOrig, err)
		}
	}

	toInternet := func(f Flow) bool {
		return f.Orig.Dst.Addr() == sandbox.Internet4 || f.Orig.Dst.Addr() == sandbox.Internet6
	}
	var icmpSeen ICMP
	steps := []struct {
		name    string
		pred    func(Flow) bool
		protos  []uint8
		deleted int
		left    int
	}{
		// A reload that changed the decision for the internet: UDP and ICMP
		// are re-decided, TCP keeps its entry.
		{"udp to the internet", toInternet, []uint8{17}, 3, 3},
		{"icmp", func(f Flow) bool { icmpSeen = f.ICMP; return true }, []uint8{1, 58}, 1, 2},
		{"nothing matches", func(Flow) bool { return false }, []uint8{6, 17}, 0, 2},
		// --reconcile-tcp.
		{"tcp when asked", toInternet, []uint8{6}, 1, 1},
	}
	for _, s := range steps {
		n, err := DeleteStale(context.Background(), ns.FD(), s.pred, s.protos)
		if err != nil || n != s.deleted {
			t.Fatalf("%s: deleted %d, %v; want %d", s.name, n, err, s.deleted)
		}
		if left := len(dump(t, ns.FD())); left != s.left {
			t.Fatalf("%s: %d entries left, want %d", s.name, left, s.left)
		}
	}
	if icmpSeen != (ICMP{Type: 8, ID: 77}) {
		t.Errorf("ICMP fields of the flow: %+v", icmpSeen)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := DeleteStale(ctx, ns.FD(), func(Flow) bool { return true }, []uint8{17}); err == nil {
		t.Error("DeleteStale ignored a cancelled context")
	}
	if _, err := DeleteStale(context.Background(), ns.FD(), func(Flow) bool { return true }, nil); err == nil {
		t.Error("DeleteStale accepted an empty protocol list")
	}
}

// TestNewOnly: a NewOnly listener delivers the creation of flows and
// nothing of their destruction, which a listener of its own carries.
func TestNewOnly(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "ctnew")
	news := listen(t, Config{NetNS: ns.FD(), NewOnly: true})
	ends := listen(t, Config{NetNS: ns.FD()})
	createUDP(t, ns.FD(), sandbox.Internet4, 3000, 2, mark.Default.Masquerade)
	if _, err := DeleteStale(context.Background(), ns.FD(), func(Flow) bool { return true }, []uint8{17}); err != nil {
		t.Fatal(err)
	}
	for _, ev := range collect(t, news, 2, func(Event) bool { return true }) {
		if ev.Type != EventNew || ev.Flow.Orig.Dst.Addr() != sandbox.Internet4 || ev.Flow.ID == 0 || ev.Flow.Mark != mark.Default.Masquerade {
			t.Errorf("NewOnly listener delivered %v %v", ev.Type, ev.Flow)
		}
	}
	for _, ev := range collect(t, ends, 2, func(Event) bool { return true }) {
		if ev.Type != EventDestroy {
			t.Errorf("default listener delivered %v %v", ev.Type, ev.Flow)
		}
	}
	// Both destroy events have been read, so a stray one on the NewOnly
	// socket would be there by now.
	select {
	case ev := <-news.Events():
		t.Errorf("NewOnly listener delivered %v %v after the two new flows", ev.Type, ev.Flow)
	default:
	}
	if _, err := Listen(Config{NetNS: ns.FD(), Reliable: true, NewOnly: true}); err == nil {
		t.Error("Reliable with NewOnly accepted")
	}
}
