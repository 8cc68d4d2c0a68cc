package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/ipfix"
	"github.com/nfmasq/nfmasq/internal/ipfixtest"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// The agent exports a NAT session create and delete event for every
// masqueraded pod flow, and a real collector decodes, flow by flow, what
// the flow log says: the pod addresses, the translated address and port,
// and on delete the bytes the pod sent. Over UDP to goflow2 (both
// families) and over TCP to a listener whose capture tshark decodes.
func TestAuditIPFIX(t *testing.T) {
	for _, tt := range []struct {
		transport string
		tools     []string
	}{{"udp", []string{"goflow2"}}, {"tcp", []string{"tshark"}}} {
		t.Run(tt.transport, func(t *testing.T) {
			netnstest.Require(t, append([]string{"iptables-restore", "ip6tables-restore", "ss"}, tt.tools...)...)
			top := netnstest.NewTopology(t)
			addSecondPodAddrs(t, top)
			const port = 4739
			collector := netip.AddrPortFrom(sandbox.RemoteAddr4, port).String()
			var events func(n int) []ipfixtest.Event
			switch tt.transport {
			case "udp":
				g := ipfixtest.StartGoflow2(t, top.Remote, collector, filepath.Join(t.TempDir(), "flows.json"))
				ipfixtest.Listening(t, top.Remote, "udp", port)
				events = func(n int) []ipfixtest.Event {
					var got []ipfixtest.Event
					deadline := time.Now().Add(20 * time.Second)
					for got = g.Events(); len(got) < n && time.Now().Before(deadline); got = g.Events() {
						time.Sleep(50 * time.Millisecond)
					}
					if len(got) < n {
						raw, _ := os.ReadFile(g.Out())
						t.Logf("goflow2:\n%s\ndecoded:\n%s", g.Output(), raw)
					}
					return got
				}
			case "tcp":
				ts := ipfixtest.StartTshark(t, top.Remote, sandbox.RemoteAddr4.String(), port)
				events = func(n int) []ipfixtest.Event { return ts.Events(t, port, n) }
			}
			dir := t.TempDir()
			logPath := filepath.Join(dir, "flows.jsonl")
			a := startAgent(t, top, "--config", writeConfig(t, dir, auditConfig), "--flow-log", "file:"+logPath, "--flow-log-nat",
				"--ipfix-collector", collector, "--ipfix-transport", tt.transport, "--ipfix-template-refresh", "1s")
			a.waitMetric("exporter connected", func(v float64) bool { return v == 1 }, "nfmasq_ipfix_connected")

			const dport = 7700
			flows := mixedFlows(22000, dport, 2)
			sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4, internet6, internal6}, dport)
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			if err := sendFlows(top.Pod, flows); err != nil {
				t.Fatal(err)
			}
			waitSeen(t, sink, flows)
			masqueraded := 0
			for _, f := range flows {
				if f.action == "masquerade" {
					masqueraded++
				}
			}
			read := readFileFunc(t, logPath)
			waitFlowLog(t, read, "nat records", func(r []flowRec) bool { return len(ofKind(r, "nat")) >= masqueraded })
			if n := endPodFlows(t, top); n != len(flows) {
				t.Errorf("deleted %d conntrack entries of pod flows, want %d", n, len(flows))
			}
			recs := waitFlowLog(t, read, "end records", func(r []flowRec) bool { return len(ofKind(r, "end")) >= len(flows) })
			a.waitMetric("delete events sent", func(v float64) bool { return v >= float64(masqueraded) }, "nfmasq_ipfix_events_total", "event", "delete")

			wanted := natEvents(recs, func(flowRec) bool { return true })
			if len(wanted) != 2*masqueraded {
				t.Fatalf("the flow log has %d nat and masqueraded end records, want %d", len(wanted), 2*masqueraded)
			}
			got := events(len(wanted))
			ipfixtest.CheckEvents(t, "the collector (against the flow log)", got, ipfixtest.Sort(wanted))
			if v := a.metric("nfmasq_ipfix_dropped_total"); v != 0 {
				t.Errorf("%v events dropped with the collector up", v)
			}
			t.Logf("%d flows, %d masqueraded: %d NAT events decoded over %s, matching the flow log", len(flows), masqueraded, len(got), tt.transport)
		})
	}
}

// natEvents is what the flow log's nat and masqueraded end records of the
// flows keep selects say, as NAT events.
func natEvents(recs []flowRec, keep func(flowRec) bool) []ipfixtest.Event {
	var out []ipfixtest.Event
	for _, r := range recs {
		if (r.Kind != "nat" && r.Kind != "end") || r.XlateSport == nil || !keep(r) {
			continue
		}
		src, dst, xlate := netip.MustParseAddr(r.Src), netip.MustParseAddr(r.Dst), netip.MustParseAddr(r.XlateSrc)
		ev := ipfixtest.Event{Proto: map[string]uint8{"tcp": 6, "udp": 17}[r.Proto],
			Src: netip.AddrPortFrom(src, r.Sport), Dst: netip.AddrPortFrom(dst, r.Dport), Xlate: netip.AddrPortFrom(xlate, *r.XlateSport)}
		v6 := src.Is6()
		switch {
		case r.Kind == "nat" && v6:
			ev.NatEvent = ipfix.EventCreate
		case r.Kind == "nat":
			ev.NatEvent = ipfix.EventNAT44Create
		case v6:
			ev.NatEvent, ev.Bytes = ipfix.EventDelete, *r.BytesOrig
		default:
			ev.NatEvent, ev.Bytes = ipfix.EventNAT44Delete, *r.BytesOrig
		}
		out = append(out, ev)
	}
	return ipfixtest.Sort(out)
}

// A collector restart, with the agent running, loses exactly what was
// sent while the collector was down: the flows of a batch started and
// ended then are missing from both collectors' decoded events; the
// batches before and after are whole, flow by flow against the flow log.
func TestAuditIPFIXCollectorRestart(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "ss", "goflow2")
	top := netnstest.NewTopology(t)
	addSecondPodAddrs(t, top)
	const port, dport = 4739, 7710
	collector := netip.AddrPortFrom(sandbox.RemoteAddr4, port).String()
	outDir := t.TempDir()
	g := ipfixtest.StartGoflow2(t, top.Remote, collector, filepath.Join(outDir, "before.json"))
	ipfixtest.Listening(t, top.Remote, "udp", port)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "flows.jsonl")
	a := startAgent(t, top, "--config", writeConfig(t, dir, auditConfig), "--flow-log", "file:"+logPath, "--flow-log-nat",
		"--ipfix-collector", collector, "--ipfix-template-refresh", "1s")
	a.waitMetric("exporter connected", func(v float64) bool { return v == 1 }, "nfmasq_ipfix_connected")
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4, internet6, internal6}, dport)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	read := readFileFunc(t, logPath)
	handled := func() float64 {
		return a.metric("nfmasq_ipfix_events_total") + a.metric("nfmasq_ipfix_dropped_total")
	}
	// batch sends 8 flows from base (4 masqueraded), ends them, and
	// waits until the exporter has handled their 8 events.
	batch := func(base uint16) {
		t.Helper()
		before := handled()
		flows := mixedFlows(base, dport, 1)
		if err := sendFlows(top.Pod, flows); err != nil {
			t.Fatal(err)
		}
		waitSeen(t, sink, flows)
		endPodFlows(t, top)
		a.waitMetric("the batch's events handled", func(float64) bool { return handled()-before >= 8 }, "nfmasq_ipfix_events_total")
	}
	inBatch := func(base uint16) func(flowRec) bool {
		return func(r flowRec) bool { return r.Sport >= base && r.Sport < base+400 }
	}
	decoded := func(g *ipfixtest.Goflow2, n int) []ipfixtest.Event {
		var got []ipfixtest.Event
		netnstest.Poll(t, 20*time.Second, 50*time.Millisecond, "goflow2 decoded the batch", func() bool {
			got = g.Events()
			return len(got) >= n
		})
		return got
	}

	batch(23000)
	ipfixtest.CheckEvents(t, "goflow2 before the restart", decoded(g, 8), natEvents(waitNATRecords(t, read, 8), inBatch(23000)))
	g.Stop(t)
	batch(24000) // sent while the collector is down
	templates := a.metric("nfmasq_ipfix_template_sends_total")
	g = ipfixtest.StartGoflow2(t, top.Remote, collector, filepath.Join(outDir, "after.json"))
	ipfixtest.Listening(t, top.Remote, "udp", port)
	// The restarted collector decodes nothing before the next template.
	a.waitMetric("templates sent again", func(v float64) bool { return v > templates }, "nfmasq_ipfix_template_sends_total")
	batch(25000)
	recs := waitNATRecords(t, read, 24)
	ipfixtest.CheckEvents(t, "goflow2 after the restart", decoded(g, 8), natEvents(recs, inBatch(25000)))
	if lost := natEvents(recs, inBatch(24000)); len(lost) != 8 {
		t.Errorf("the flow log has %d NAT events of the batch sent while the collector was down, want 8", len(lost))
	}
	t.Logf("exporter: %v events sent, %v dropped (send_error: the collector refused them)", a.metric("nfmasq_ipfix_events_total"), a.metric("nfmasq_ipfix_dropped_total"))
}

// waitNATRecords waits until the flow log holds n nat and masqueraded end records
// in all and returns every record.
func waitNATRecords(t *testing.T, read func() []byte, n int) []flowRec {
	t.Helper()
	return waitFlowLog(t, read, "nat and end records", func(r []flowRec) bool {
		return len(natEvents(r, func(flowRec) bool { return true })) >= n
	})
}
