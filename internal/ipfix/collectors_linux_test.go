package ipfix

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/ipfixtest"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// Collectors nobody here wrote decode what the exporter sends: nfdump's
// nfcapd and pmacct's nfacctd (IPv4 NAT events over UDP; neither decodes
// IE 281 nor listens on TCP), goflow2 with a mapping of the NAT elements (both families,
// UDP), and tshark decoding a capture of the TCP stream.

// testFlows are masqueraded flows of both families.
func testFlows(first uint16, n int, v6 bool) []conntrack.Flow {
	var out []conntrack.Flow
	for i := range n {
		src, dst, node := netip.MustParseAddr("10.244.0.2"), netip.MustParseAddr("11.0.0.10"), netip.MustParseAddr("192.168.77.1")
		if v6 && i%2 == 1 {
			src, dst, node = netip.MustParseAddr("fd00:10:244::2"), netip.MustParseAddr("2001:db8:100::10"), netip.MustParseAddr("fd00:77::1")
		}
		proto := uint8(6)
		if i%3 == 2 {
			proto = 17
		}
		port := first + uint16(i)
		start := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
		out = append(out, conntrack.Flow{ID: uint32(port), Proto: proto,
			Orig:         conntrack.Tuple{Src: netip.AddrPortFrom(src, port), Dst: netip.AddrPortFrom(dst, 443)},
			Reply:        conntrack.Tuple{Src: netip.AddrPortFrom(dst, 443), Dst: netip.AddrPortFrom(node, 20000+port)},
			OrigCounters: conntrack.Counters{Packets: 3, Bytes: uint64(100 + i)}, ReplyCounters: conntrack.Counters{Packets: 2, Bytes: 80},
			Accounted: true, Start: start, Stop: start.Add(time.Minute)})
	}
	return out
}

// want lists the events the flows must give: a create and a delete each.
func want(flows []conntrack.Flow) []ipfixtest.Event {
	var out []ipfixtest.Event
	for _, f := range flows {
		create, del := EventNAT44Create, EventNAT44Delete
		if f.Orig.Src.Addr().Is6() {
			create, del = EventCreate, EventDelete
		}
		e := ipfixtest.Event{Proto: f.Proto, Src: f.Orig.Src, Dst: f.Orig.Dst, Xlate: f.Reply.Dst}
		c, d := e, e
		c.NatEvent, d.NatEvent, d.Bytes = create, del, f.OrigCounters.Bytes
		out = append(out, c, d)
	}
	return ipfixtest.Sort(out)
}

// export hands the exporter a create and a delete event for each flow and
// waits until it has sent or dropped them.
func export(t *testing.T, e *Exporter, flows []conntrack.Flow) {
	t.Helper()
	before := e.Stats()
	for i := range flows {
		e.Created(&flows[i])
	}
	for i := range flows {
		e.Deleted(&flows[i])
	}
	handled := func(s Stats) uint64 { return s.Created + s.Deleted + s.Down + s.SendError + s.Overflow }
	netnstest.Poll(t, 10*time.Second, time.Millisecond, "events sent or dropped", func() bool {
		return handled(e.Stats())-handled(before) >= 2*uint64(len(flows))
	})
}

func startExporter(t *testing.T, ns *netns.NS, collector, transport string) *Exporter {
	t.Helper()
	e, err := New(Config{Collector: collector, Transport: transport, NetNS: ns.FD(), Node: "node-a", TemplateRefresh: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	netnstest.Poll(t, 10*time.Second, time.Millisecond, "exporter connected", func() bool { return e.Stats().Connects > 0 })
	return e
}

func TestNfcapd(t *testing.T) {
	netnstest.Require(t, "nfcapd", "nfdump", "ss")
	ns := netnstest.New(t, "nfcapd")
	n := ipfixtest.StartNfcapd(t, ns, "127.0.0.1", 4739)
	e := startExporter(t, ns, "127.0.0.1:4739", "udp")
	flows := testFlows(30000, 12, false)
	export(t, e, flows)
	ipfixtest.CheckEvents(t, "nfcapd", n.Events(t, 4739), want(flows))
}

func TestNfacctd(t *testing.T) {
	netnstest.Require(t, "nfacctd", "pmacct", "ss")
	ns := netnstest.New(t, "nfacctd")
	n := ipfixtest.StartNfacctd(t, ns, "127.0.0.1", 4739)
	e := startExporter(t, ns, "127.0.0.1:4739", "udp")
	flows := testFlows(31000, 12, false)
	export(t, e, flows)
	wanted := want(flows)
	for i := range wanted {
		wanted[i].Bytes = 0 // not in nfacctd's aggregates
	}
	var got []ipfixtest.Event
	netnstest.Poll(t, 20*time.Second, 100*time.Millisecond, "nfacctd holds every event", func() bool {
		got = n.Events(t)
		return len(got) >= len(wanted)
	})
	ipfixtest.CheckEvents(t, "nfacctd", got, ipfixtest.Sort(wanted))
}

func TestGoflow2(t *testing.T) {
	netnstest.Require(t, "goflow2", "ss")
	ns := netnstest.New(t, "goflow2")
	g := ipfixtest.StartGoflow2(t, ns, "127.0.0.1:4739", filepath.Join(t.TempDir(), "flows.json"))
	ipfixtest.Listening(t, ns, "udp", 4739)
	e := startExporter(t, ns, "127.0.0.1:4739", "udp")
	flows := testFlows(32000, 12, true)
	export(t, e, flows)
	wanted := want(flows)
	var got []ipfixtest.Event
	netnstest.Poll(t, 20*time.Second, 50*time.Millisecond, "goflow2 wrote every event", func() bool {
		got = g.Events()
		return len(got) >= len(wanted)
	})
	ipfixtest.CheckEvents(t, "goflow2", got, wanted)
}

// A collector restart loses only the events sent while it was down: after
// it is back, the next template refresh lets it decode everything again.
func TestCollectorRestart(t *testing.T) {
	netnstest.Require(t, "goflow2", "ss")
	ns := netnstest.New(t, "ipfixrst")
	out := filepath.Join(t.TempDir(), "flows.json")
	g := ipfixtest.StartGoflow2(t, ns, "127.0.0.1:4739", out)
	ipfixtest.Listening(t, ns, "udp", 4739)
	e := startExporter(t, ns, "127.0.0.1:4739", "udp")

	before, during, after := testFlows(33000, 8, true), testFlows(34000, 8, true), testFlows(35000, 8, true)
	export(t, e, before)
	netnstest.Poll(t, 20*time.Second, 50*time.Millisecond, "events before the restart decoded", func() bool { return len(g.Events()) >= 2*len(before) })
	g.Stop(t)
	export(t, e, during)
	g = ipfixtest.StartGoflow2(t, ns, "127.0.0.1:4739", out)
	ipfixtest.Listening(t, ns, "udp", 4739)
	// The restarted collector knows no template until the next refresh.
	tmpl := e.Stats().Templates
	netnstest.Poll(t, 10*time.Second, 10*time.Millisecond, "a template refresh after the restart", func() bool { return e.Stats().Templates > tmpl })
	export(t, e, after)
	wanted := ipfixtest.Sort(append(want(before), want(after)...))
	var got []ipfixtest.Event
	netnstest.Poll(t, 20*time.Second, 50*time.Millisecond, "events after the restart decoded", func() bool {
		got = g.Events()
		return len(got) >= len(wanted)
	})
	ipfixtest.CheckEvents(t, "goflow2 across a restart", got, wanted)
	t.Logf("exporter: %+v", e.Stats())
}

// TCP: tshark decodes a capture of the stream.
func TestTsharkTCP(t *testing.T) {
	netnstest.Require(t, "tshark", "ss")
	ns := netnstest.New(t, "tshark")
	ts := ipfixtest.StartTshark(t, ns, "127.0.0.1", 4739)
	e := startExporter(t, ns, "127.0.0.1:4739", "tcp")
	flows := testFlows(36000, 12, true)
	export(t, e, flows)
	e.Close()
	ipfixtest.CheckEvents(t, "tshark", ts.Events(t, 4739, 2*len(flows)), want(flows))
}

// A collector that is not there costs events, counted, and never blocks
// the callers; over TCP the exporter keeps trying and, once the collector
// is up, sends what comes next.
func TestCollectorDownTCP(t *testing.T) {
	netnstest.Require(t, "ss")
	ns := netnstest.New(t, "ipfixdown")
	e, err := New(Config{Collector: "127.0.0.1:4740", Transport: "tcp", NetNS: ns.FD(), Node: "n", Buffer: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	flows := testFlows(37000, 100, false)
	start := time.Now()
	for i := range flows {
		e.Created(&flows[i])
	}
	if took := time.Since(start); took > 100*time.Millisecond {
		t.Errorf("100 events took %v to hand over with no collector", took)
	}
	netnstest.Poll(t, 10*time.Second, time.Millisecond, "every event counted", func() bool {
		s := e.Stats()
		return s.Down+s.Overflow == uint64(len(flows))
	})
	if s := e.Stats(); s.Connected || s.Created != 0 || s.Overflow == 0 {
		t.Errorf("stats with no collector: %+v (want overflow of the 16-event buffer, the rest down)", s)
	}
	// The collector comes up: the next events get through.
	ipfixtest.DiscardTCP(t, ns, "127.0.0.1:4740")
	netnstest.Poll(t, 2*retryMax, 10*time.Millisecond, "reconnected", func() bool { return e.Stats().Connected })
	e.Created(&flows[0])
	netnstest.Poll(t, 10*time.Second, time.Millisecond, "event sent after the outage", func() bool { return e.Stats().Created == 1 })
}
