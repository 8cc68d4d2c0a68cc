package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// The audit trail end to end: the real agent writes the flow log while
// traffic crosses the node namespace, and the tests hold each record
// against what the pod sent and what the remote host saw.

// auditConfig keeps one range of each family unmasqueraded, so that both
// actions occur in both families.
const auditConfig = "nonMasqueradeCIDRs: [10.0.0.0/8, fd00:200::/64]\n"

// Second pod addresses: a flow from each pod address with the same source
// port to the same masqueraded destination forces MASQUERADE to pick
// another port for one of them, so the translated port in end records is
// tested, not just the node address.
var (
	podAddr4b = netip.MustParseAddr("10.244.0.3")
	podAddr6b = netip.MustParseAddr("fd00:10:244::3")
)

// Header bytes conntrack counts per packet besides the payload: its byte
// counters are the IP packet length (skb->len at the IP layer).
const (
	udpHdr4 = 20 + 8
	udpHdr6 = 40 + 8
	tcpHdr4 = 20 + 20 // without options: a lower bound
	tcpHdr6 = 40 + 20
)

// flowRec is one flow log line, decoded per docs/flow-log.md. Pointers
// tell a field left out from a zero.
type flowRec struct {
	V            int                          `json:"v"`
	Kind         string                       `json:"kind"`
	Time         time.Time                    `json:"time"`
	Node         string                       `json:"node"`
	Family       string                       `json:"family"`
	Proto        string                       `json:"proto"`
	Src          string                       `json:"src"`
	Sport        uint16                       `json:"sport"`
	Dst          string                       `json:"dst"`
	Dport        uint16                       `json:"dport"`
	Pod          *string                      `json:"pod"`
	Action       string                       `json:"action"`
	Prefix       string                       `json:"prefix"`
	Source       string                       `json:"source"`
	Origin       string                       `json:"origin"`
	PolicyHash   string                       `json:"policy_hash"`
	PolicyGen    uint64                       `json:"policy_generation"`
	Queue        *int                         `json:"queue"`
	LatencyUS    *float64                     `json:"latency_us"`
	PacketsOrig  *uint64                      `json:"packets_orig"`
	BytesOrig    *uint64                      `json:"bytes_orig"`
	PacketsReply *uint64                      `json:"packets_reply"`
	BytesReply   *uint64                      `json:"bytes_reply"`
	Start        *time.Time                   `json:"start"`
	End          *time.Time                   `json:"end"`
	DurationMS   *float64                     `json:"duration_ms"`
	XlateSrc     string                       `json:"xlate_src"`
	XlateSport   *uint16                      `json:"xlate_sport"`
	ConntrackID  uint32                       `json:"conntrack_id"`
	Dropped      map[string]map[string]uint64 `json:"dropped"`

	line string
}

// flowKey identifies a flow as the pod sent it.
type flowKey struct {
	proto    string
	src, dst netip.AddrPort
}

func (k flowKey) String() string { return fmt.Sprintf("%s %v->%v", k.proto, k.src, k.dst) }

func (r *flowRec) key() flowKey {
	src, _ := netip.ParseAddr(r.Src)
	dst, _ := netip.ParseAddr(r.Dst)
	return flowKey{r.Proto, netip.AddrPortFrom(src, r.Sport), netip.AddrPortFrom(dst, r.Dport)}
}

// parseFlowLog decodes every complete line; a last line without its
// newline is a batch still being written and is left for the next read.
func parseFlowLog(data []byte) ([]flowRec, error) {
	var recs []flowRec
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		line := data[:i]
		data = data[i+1:]
		var r flowRec
		if err := json.Unmarshal(line, &r); err != nil {
			return recs, fmt.Errorf("flow log line %d %q: %w", len(recs)+1, line, err)
		}
		r.line = string(line)
		recs = append(recs, r)
	}
	return recs, nil
}

// ofKind returns the records of one kind.
func ofKind(recs []flowRec, kind string) []flowRec {
	var out []flowRec
	for _, r := range recs {
		if r.Kind == kind {
			out = append(out, r)
		}
	}
	return out
}

// gapDropped sums the dropped counts of every gap record for one reason
// (all reasons when reason is "") over the given kinds (all when none).
func gapDropped(recs []flowRec, reason string, kinds ...string) uint64 {
	var n uint64
	for _, r := range ofKind(recs, "gap") {
		for rs, byKind := range r.Dropped {
			if reason != "" && rs != reason {
				continue
			}
			for k, v := range byKind {
				if len(kinds) == 0 || slices.Contains(kinds, k) {
					n += v
				}
			}
		}
	}
	return n
}

// waitFlowLog re-reads the flow log until done holds for its records, or
// fails after 10 s.
func waitFlowLog(t *testing.T, read func() []byte, what string, done func([]flowRec) bool) []flowRec {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		recs, err := parseFlowLog(read())
		if err != nil {
			t.Fatal(err)
		}
		if done(recs) {
			return recs
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, r := range recs {
				b.WriteString(r.line + "\n")
			}
			t.Fatalf("%s: not reached after 10s; flow log (%d records):\n%s", what, len(recs), b.String())
		}
		time.Sleep(20 * time.Millisecond) // polling a file with a deadline
	}
}

func readFileFunc(t *testing.T, path string) func() []byte {
	return func() []byte {
		b, err := os.ReadFile(path)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		return b
	}
}

// auditFlow is one flow the pod sends and what the trail must say of it.
type auditFlow struct {
	proto     string // "udp" or "tcp"
	src, dst  netip.AddrPort
	datagrams int    // udp: datagrams sent, each echoed by the remote
	size      int    // payload per datagram, or the whole TCP payload
	action    string // "masquerade" or "passthrough"
	prefix    string // the non-masquerade prefix that decides, "" for none
}

func (f auditFlow) key() flowKey { return flowKey{f.proto, f.src, f.dst} }

// auditDst is a destination served by the remote and the decision the
// audit config gives it.
type auditDst struct {
	addr   netip.Addr
	action string
	prefix string
}

var auditDsts = []auditDst{
	{internet4, "masquerade", ""},
	{internal4, "passthrough", "10.0.0.0/8"},
	{internet6, "masquerade", ""},
	{internal6, "passthrough", "fd00:200::/64"},
}

// addSecondPodAddrs gives the pod a second address in each family.
func addSecondPodAddrs(t *testing.T, top *sandbox.Topology) {
	t.Helper()
	netnstest.Run(t, top.Pod, "ip", "addr", "add", netip.PrefixFrom(podAddr4b, 24).String(), "dev", "eth0")
	netnstest.Run(t, top.Pod, "ip", "-6", "addr", "add", netip.PrefixFrom(podAddr6b, 64).String(), "dev", "eth0", "nodad")
}

// sendFlows runs each flow to completion from inside ns: UDP datagrams
// each wait for their echo, TCP connects, sends, half-closes and reads the
// remote's "ok" to the end.
func sendFlows(ns *netns.NS, flows []auditFlow) error {
	return ns.Do(func() error {
		var errs []error
		for _, f := range flows {
			if err := sendFlow(f); err != nil {
				errs = append(errs, fmt.Errorf("%v: %w", f.key(), err))
			}
		}
		return errors.Join(errs...)
	})
}

func sendFlow(f auditFlow) error {
	payload := bytes.Repeat([]byte{'x'}, f.size)
	switch f.proto {
	case "udp":
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(f.src), net.UDPAddrFromAddrPort(f.dst))
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, f.size+1)
		for i := 0; i < f.datagrams; i++ {
			if _, err := c.Write(payload); err != nil {
				return err
			}
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				return fmt.Errorf("echo of datagram %d: %w", i, err)
			}
			if n != f.size {
				return fmt.Errorf("echo of datagram %d has %d bytes, sent %d", i, n, f.size)
			}
		}
		return nil
	case "tcp":
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(f.src), Timeout: 3 * time.Second}
		conn, err := d.Dial("tcp", f.dst.String())
		if err != nil {
			return err
		}
		c := conn.(*net.TCPConn)
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write(payload); err != nil {
			return err
		}
		if err := c.CloseWrite(); err != nil {
			return err
		}
		reply, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		if string(reply) != "ok" {
			return fmt.Errorf("remote answered %q, want \"ok\"", reply)
		}
		return nil
	}
	return fmt.Errorf("unknown protocol %q", f.proto)
}

// seenKey is a flow as the remote host saw it.
type seenKey struct {
	proto    string
	src, dst netip.AddrPort
}

// seenSet counts what the remote recorded, by flow as it saw it.
func seenSet(seen []sandbox.Seen) map[seenKey]int {
	m := map[seenKey]int{}
	for _, s := range seen {
		m[seenKey{s.Proto, s.Src, s.Dst}]++
	}
	return m
}

// waitSeen waits until the remote recorded every datagram and connection
// of flows.
func waitSeen(t *testing.T, sink *sandbox.Sink, flows []auditFlow) []sandbox.Seen {
	t.Helper()
	want := 0
	for _, f := range flows {
		if f.proto == "udp" {
			want += f.datagrams
		} else {
			want++
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	seen, err := sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) >= want })
	if err != nil {
		t.Fatalf("%v: the remote recorded %d of %d datagrams and connections", err, len(seen), want)
	}
	return seen
}

// waitTCPClosed waits until every TCP conntrack entry from the pod CIDRs
// in the node is in TIME_WAIT or CLOSE: the connection's last ACK has
// crossed the node. Deleting an entry earlier would let a late ACK create
// a new entry (nf_conntrack_tcp_loose), a flow the test never sent.
func waitTCPClosed(t *testing.T, top *sandbox.Topology) {
	t.Helper()
	const tcpTimeWait, tcpClose = 7, 8 // enum tcp_conntrack
	c, err := ct.Dial(&netlink.Config{NetNS: top.Node.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		flows, err := c.Dump(nil)
		if err != nil {
			t.Fatal(err)
		}
		var open []string
		for _, f := range flows {
			src := f.TupleOrig.IP.SourceAddress.Unmap()
			if f.TupleOrig.Proto.Protocol != syscall.IPPROTO_TCP || !conntrack.InPrefixes([]netip.Prefix{sandbox.PodCIDR4, sandbox.PodCIDR6}, src) {
				continue
			}
			if f.ProtoInfo.TCP == nil || (f.ProtoInfo.TCP.State != tcpTimeWait && f.ProtoInfo.TCP.State != tcpClose) {
				open = append(open, fmt.Sprintf("%v:%d->%v:%d %+v", src, f.TupleOrig.Proto.SourcePort,
					f.TupleOrig.IP.DestinationAddress, f.TupleOrig.Proto.DestinationPort, f.ProtoInfo.TCP))
			}
		}
		if len(open) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("TCP conntrack entries not closed after 5s: %v", open)
		}
		time.Sleep(10 * time.Millisecond) // polling conntrack with a deadline
	}
}

// endPodFlows deletes the node's conntrack entries of pod TCP and UDP
// flows, so their destroy events come now rather than at the timeouts.
func endPodFlows(t *testing.T, top *sandbox.Topology) int {
	t.Helper()
	waitTCPClosed(t, top)
	n, err := conntrack.DeleteStale(context.Background(), top.Node.FD(), func(f conntrack.Flow) bool {
		return conntrack.InPrefixes([]netip.Prefix{sandbox.PodCIDR4, sandbox.PodCIDR6}, f.Orig.Src.Addr())
	}, []uint8{syscall.IPPROTO_TCP, syscall.IPPROTO_UDP})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// mixedFlows builds flows over every audit destination, both protocols,
// count per (destination, protocol). Every second flow of a group comes
// from the second pod address with the first flow's source port.
func mixedFlows(basePort uint16, dport uint16, count int) []auditFlow {
	var flows []auditFlow
	for i, d := range auditDsts {
		for j, proto := range []string{"udp", "tcp"} {
			for k := 0; k < count; k++ {
				src := podAddr(d.addr)
				if k%2 == 1 {
					src = podAddr4b
					if d.addr.Is6() {
						src = podAddr6b
					}
				}
				n := len(flows)
				flows = append(flows, auditFlow{
					proto:     proto,
					src:       netip.AddrPortFrom(src, basePort+uint16(i*100+j*10+k/2)),
					dst:       netip.AddrPortFrom(d.addr, dport),
					datagrams: 1 + n%3,
					size:      40 + 7*n,
					action:    d.action,
					prefix:    d.prefix,
				})
			}
		}
	}
	return flows
}

// policyHash is the hash of the policy in force, from the agent's metrics.
func policyHash(a *agentProc) string {
	a.t.Helper()
	if mf, ok := a.metrics()["nfmasq_policy_info"]; ok {
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetName() == "hash" && l.GetValue() != "" {
					return l.GetValue()
				}
			}
		}
	}
	a.t.Fatal("no nfmasq_policy_info{hash} metric")
	return ""
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "ipv4"
	}
	return "ipv6"
}

// checkCounters holds an end or fallback record's counters against what
// the flow sent: exact for UDP (one datagram and one echo per packet),
// bounds for TCP (handshake, FIN and ACKs vary).
func checkCounters(t *testing.T, f auditFlow, r *flowRec) {
	t.Helper()
	if r.PacketsOrig == nil || r.BytesOrig == nil || r.PacketsReply == nil || r.BytesReply == nil {
		t.Errorf("%v: %s record without counters: %s", f.key(), r.Kind, r.line)
		return
	}
	po, bo, pr, br := *r.PacketsOrig, *r.BytesOrig, *r.PacketsReply, *r.BytesReply
	switch f.proto {
	case "udp":
		hdr := uint64(udpHdr4)
		if f.src.Addr().Is6() {
			hdr = udpHdr6
		}
		n, want := uint64(f.datagrams), uint64(f.datagrams)*(uint64(f.size)+hdr)
		if po != n || bo != want || pr != n || br != want {
			t.Errorf("%v: counters orig %d/%dB reply %d/%dB, want %d/%dB both ways (%d datagrams of %d+%d bytes): %s",
				f.key(), po, bo, pr, br, n, want, f.datagrams, f.size, hdr, r.line)
		}
	case "tcp":
		hdr := uint64(tcpHdr4)
		if f.src.Addr().Is6() {
			hdr = tcpHdr6
		}
		// Orig: SYN, ACK, data, FIN at least; reply: SYN-ACK and the
		// "ok" with its FIN at least.
		if po < 3 || bo < po*hdr+uint64(f.size) || pr < 2 || br < pr*hdr+2 {
			t.Errorf("%v: counters orig %d/%dB reply %d/%dB, want >= 3 packets and >= %d header bytes each plus %d payload bytes out, >= 2 packets plus 2 bytes back: %s",
				f.key(), po, bo, pr, br, hdr, f.size, r.line)
		}
	}
}

// checkXlate holds an end or fallback record's translated source against
// what the remote recorded, and consumes that entry so that two records
// cannot claim the same remote flow.
func checkXlate(t *testing.T, f auditFlow, r *flowRec, seen map[seenKey]int) (translatedPort bool) {
	t.Helper()
	if r.Action != f.action {
		t.Errorf("%v: %s record says %q, want %q: %s", f.key(), r.Kind, r.Action, f.action, r.line)
	}
	var from netip.AddrPort
	if f.action == "masquerade" {
		xs, err := netip.ParseAddr(r.XlateSrc)
		if err != nil || r.XlateSport == nil {
			t.Errorf("%v: masqueraded %s record without a translated source: %s", f.key(), r.Kind, r.line)
			return false
		}
		if xs != nodeAddr(f.dst.Addr()) {
			t.Errorf("%v: xlate_src %v, want the node address %v", f.key(), xs, nodeAddr(f.dst.Addr()))
		}
		from = netip.AddrPortFrom(xs, *r.XlateSport)
		translatedPort = *r.XlateSport != f.src.Port()
	} else {
		if r.XlateSrc != "" || r.XlateSport != nil {
			t.Errorf("%v: passthrough %s record has a translated source: %s", f.key(), r.Kind, r.line)
		}
		from = f.src
	}
	k := seenKey{f.proto, from, f.dst}
	if seen[k] == 0 {
		t.Errorf("%v: the %s record says the remote saw %v, but the remote recorded no such flow (seen: %v)", f.key(), r.Kind, from, seen)
		return translatedPort
	}
	delete(seen, k)
	return translatedPort
}

// Every flow gives exactly one decision record and, once conntrack drops
// it, exactly one end record whose counters are what was sent and whose
// translated source is what the remote saw.
func TestAuditDecisionAndEndRecords(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	addSecondPodAddrs(t, top)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, auditConfig)
	logPath := filepath.Join(dir, "flows.jsonl")
	a := startAgent(t, top, "--config", cfg, "--flow-log", "file:"+logPath, "--flow-log-node", "audit-node", "--flow-log-nat")
	read := readFileFunc(t, logPath)

	const dport = 7500
	flows := mixedFlows(20000, dport, 3) // 4 destinations x 2 protocols x 3 = 24
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4, internet6, internal6}, dport)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	if err := sendFlows(top.Pod, flows); err != nil {
		t.Fatal(err)
	}
	seen := seenSet(waitSeen(t, sink, flows))
	// The remote itself must have seen the pod or the node address as
	// the policy says, or the records below would be checked against a
	// wrong dataplane.
	for k := range seen {
		if k.src.Addr() != podAddr(k.dst.Addr()) && k.src.Addr() != podAddr4b && k.src.Addr() != podAddr6b && k.src.Addr() != nodeAddr(k.dst.Addr()) {
			t.Errorf("remote saw %s from unexpected %v", k.dst, k.src)
		}
	}

	a.waitMetric("decisions", func(v float64) bool { return v >= float64(len(flows)) }, "nfmasq_decisions_total")
	recs := waitFlowLog(t, read, "decision records", func(r []flowRec) bool { return len(ofKind(r, "decision")) >= len(flows) })
	if got := a.metric("nfmasq_decisions_total"); got != float64(len(flows)) {
		t.Errorf("agent decided %v flows, sent %d", got, len(flows))
	}
	hash := policyHash(a)
	decisions := map[flowKey]flowRec{}
	for _, r := range ofKind(recs, "decision") {
		if _, dup := decisions[r.key()]; dup {
			t.Errorf("two decision records for %v", r.key())
		}
		decisions[r.key()] = r
	}
	if len(ofKind(recs, "decision")) != len(flows) {
		t.Errorf("%d decision records for %d flows", len(ofKind(recs, "decision")), len(flows))
	}
	for _, f := range flows {
		r, ok := decisions[f.key()]
		if !ok {
			t.Errorf("%v: no decision record", f.key())
			continue
		}
		switch {
		case r.V != 1, r.Node != "audit-node", r.Family != family(f.dst.Addr()):
			t.Errorf("%v: v/node/family wrong: %s", f.key(), r.line)
		case r.Action != f.action || r.Prefix != f.prefix:
			t.Errorf("%v: decided %q by %q, want %q by %q: %s", f.key(), r.Action, r.Prefix, f.action, f.prefix, r.line)
		case f.prefix != "" && r.Source != "config":
			t.Errorf("%v: source %q, want config: %s", f.key(), r.Source, r.line)
		case f.prefix == "" && r.Source != "none" && r.Source != "":
			// No rule matched: nat names that "none"; leaving the
			// field out would also be true to the schema.
			t.Errorf("%v: source %q with no deciding prefix: %s", f.key(), r.Source, r.line)
		case r.PolicyHash != hash || r.PolicyGen != 1:
			t.Errorf("%v: policy hash/generation missing: %s", f.key(), r.line)
		case r.Queue == nil || *r.Queue != int(rules.DefaultQueueNum) || r.LatencyUS == nil || *r.LatencyUS <= 0:
			t.Errorf("%v: queue or latency missing: %s", f.key(), r.line)
		case r.Pod != nil:
			t.Errorf("%v: pod set without a pod informer: %s", f.key(), r.line)
		case r.PacketsOrig != nil || r.Start != nil || r.XlateSrc != "":
			t.Errorf("%v: decision record carries end fields: %s", f.key(), r.line)
		}
	}

	// While the flows are open, each masqueraded one has a nat record
	// with the translation the remote saw.
	masqueraded := 0
	for _, f := range flows {
		if f.action == "masquerade" {
			masqueraded++
		}
	}
	recs = waitFlowLog(t, read, "nat records", func(r []flowRec) bool { return len(ofKind(r, "nat")) >= masqueraded })
	nats := map[flowKey]flowRec{}
	seenByNat := maps.Clone(seen)
	for _, r := range ofKind(recs, "nat") {
		if _, dup := nats[r.key()]; dup {
			t.Errorf("two nat records for %v", r.key())
		}
		nats[r.key()] = r
	}
	for _, f := range flows {
		r, ok := nats[f.key()]
		switch {
		case f.action != "masquerade" && ok:
			t.Errorf("%v: nat record for a flow that kept its source: %s", f.key(), r.line)
		case f.action != "masquerade":
		case !ok:
			t.Errorf("%v: masqueraded flow without a nat record", f.key())
		case r.ConntrackID == 0 || r.Node != "audit-node" || r.Source != "" || r.Time.Before(decisions[f.key()].Time.Add(-time.Second)):
			t.Errorf("%v: nat record without conntrack id or node, with a source, or long before the decision at %v: %s", f.key(), decisions[f.key()].Time, r.line)
		default:
			checkXlate(t, f, &r, seenByNat)
		}
	}

	if n := endPodFlows(t, top); n != len(flows) {
		t.Errorf("deleted %d conntrack entries of pod flows, want %d", n, len(flows))
	}
	recs = waitFlowLog(t, read, "end records", func(r []flowRec) bool { return len(ofKind(r, "end")) >= len(flows) })
	a.waitMetric("end records written", func(v float64) bool { return v >= float64(len(flows)) }, "nfmasq_flowlog_records_total", "kind", "end")
	if got := a.metric("nfmasq_conntrack_flows_ignored_total"); got != 0 {
		t.Errorf("%v destroyed pod flows ignored as undecided; every one was decided", got)
	}
	if got := len(ofKind(recs, "end")); got != len(flows) {
		t.Errorf("%d end records for %d flows", got, len(flows))
	}
	for _, kind := range []string{"fallback", "gap"} {
		if got := ofKind(recs, kind); len(got) != 0 {
			t.Errorf("%d %s records with every flow decided and nothing lost: %s", len(got), kind, got[0].line)
		}
	}
	ends := map[flowKey]flowRec{}
	for _, r := range ofKind(recs, "end") {
		if _, dup := ends[r.key()]; dup {
			t.Errorf("two end records for %v", r.key())
		}
		ends[r.key()] = r
	}
	translated := 0
	for _, f := range flows {
		r, ok := ends[f.key()]
		if !ok {
			t.Errorf("%v: no end record", f.key())
			continue
		}
		if r.V != 1 || r.Node != "audit-node" || r.Family != family(f.dst.Addr()) || r.ConntrackID == 0 {
			t.Errorf("%v: v/node/family/conntrack_id wrong: %s", f.key(), r.line)
		}
		if r.Start == nil || r.DurationMS == nil || *r.DurationMS < 0 || r.Time.Before(*r.Start) ||
			r.Time.Before(decisions[f.key()].Time) {
			t.Errorf("%v: start/duration/time inconsistent with the decision at %v: %s", f.key(), decisions[f.key()].Time, r.line)
		}
		checkCounters(t, f, &r)
		if n, ok := nats[f.key()]; ok && (n.ConntrackID != r.ConntrackID || n.XlateSrc != r.XlateSrc || *n.XlateSport != *r.XlateSport) {
			t.Errorf("%v: nat and end records disagree on the conntrack id or translation:\n%s\n%s", f.key(), n.line, r.line)
		}
		if checkXlate(t, f, &r, seen) {
			translated++
		}
	}
	// Two pod addresses used the same source port to each masqueraded
	// destination: MASQUERADE had to translate the port of one of them
	// (with --random-fully, the default, it translates every port).
	if translated == 0 {
		t.Errorf("no masqueraded end record shows a translated port; the xlate_sport check proved nothing")
	}
	// nfmasq who names each masqueraded flow's pod address from the
	// translated source the remote saw, in the middle of the flow.
	for _, f := range flows {
		e := ends[f.key()]
		if f.action != "masquerade" || e.XlateSport == nil || e.Start == nil {
			continue
		}
		xlate := netip.AddrPortFrom(netip.MustParseAddr(e.XlateSrc), *e.XlateSport)
		at := e.Start.Add(e.Time.Sub(*e.Start) / 2).Format(time.RFC3339Nano)
		stdout, stderr, code := nfmasq(t, "who", "--translated", xlate.String(), "--at", at, "--proto", f.proto, "--tolerance", "0s", logPath)
		var got []flowRec
		if code == 0 {
			var err error
			if got, err = parseFlowLog([]byte(stdout)); err != nil {
				t.Fatal(err)
			}
		}
		if len(got) != 1 || got[0].Src != f.src.Addr().String() || got[0].Sport != f.src.Port() || got[0].ConntrackID != e.ConntrackID || got[0].Prefix != f.prefix {
			t.Errorf("%v: nfmasq who --translated %v --at %s: exit %d, %s %s", f.key(), xlate, at, code, stdout, stderr)
		}
	}
	t.Logf("%d flows: %d decision, %d nat and %d end records; %d masqueraded flows had their source port translated", len(flows), len(decisions), len(nats), len(ends), translated)
}

// Flows the kernel fallback decided while the agent was dead are in the
// trail after a restart, as fallback records, or counted in a gap record.
func TestAuditKilledAgentFallbackRecords(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	addSecondPodAddrs(t, top)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, auditConfig)
	logPath := filepath.Join(dir, "flows.jsonl")
	args := []string{"--config", cfg, "--flow-log", "file:" + logPath}
	a := startAgent(t, top, args...)
	a.stop(syscall.SIGKILL)

	const dport = 7600
	flows := mixedFlows(21000, dport, 2) // 16 flows, decided by the fallback chain
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4, internet6, internal6}, dport)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	if err := sendFlows(top.Pod, flows); err != nil {
		t.Fatal(err)
	}
	seen := seenSet(waitSeen(t, sink, flows))

	b := startAgent(t, top, args...)
	if n := endPodFlows(t, top); n != len(flows) {
		t.Errorf("deleted %d conntrack entries of pod flows, want %d", n, len(flows))
	}
	read := readFileFunc(t, logPath)
	recs := waitFlowLog(t, read, "fallback records or gaps for every flow", func(r []flowRec) bool {
		return uint64(len(ofKind(r, "fallback")))+gapDropped(r, "", "end", "fallback") >= uint64(len(flows))
	})
	hash := policyHash(b)
	fallbacks := map[flowKey]flowRec{}
	for _, r := range ofKind(recs, "fallback") {
		if _, dup := fallbacks[r.key()]; dup {
			t.Errorf("two fallback records for %v", r.key())
		}
		fallbacks[r.key()] = r
	}
	for _, r := range recs {
		if (r.Kind == "decision" || r.Kind == "end") && r.Dport == dport {
			t.Errorf("the dead agent cannot have decided %v: %s", r.key(), r.line)
		}
	}
	missing := 0
	for _, f := range flows {
		r, ok := fallbacks[f.key()]
		if !ok {
			missing++
			continue
		}
		if r.Source != "kernel-fallback" || r.Prefix != f.prefix || r.PolicyHash != hash || r.ConntrackID == 0 {
			t.Errorf("%v: fallback record wants source kernel-fallback, prefix %q, the policy hash and the conntrack id: %s", f.key(), f.prefix, r.line)
		}
		checkCounters(t, f, &r)
		checkXlate(t, f, &r, seen)
	}
	if lost := gapDropped(recs, "", "end", "fallback"); uint64(missing) > lost {
		t.Errorf("%d flows have neither a fallback record nor a count in a gap record (gaps count %d)", missing, lost)
	} else if missing > 0 {
		t.Logf("%d flows only counted in gap records", missing)
	}
	if got := b.metric("nfmasq_decisions_total"); got != 0 {
		t.Errorf("restarted agent decided %v flows; none were sent after the restart", got)
	}
	t.Logf("%d flows while the agent was down: %d fallback records, %d in gaps", len(flows), len(fallbacks), missing)
}

// startAgentStdout is startAgent with the agent's standard output (the
// flow log's stdout sink) going to stdout and its log to the test buffer.
func startAgentStdout(t *testing.T, top *sandbox.Topology, stdout *os.File, args ...string) *agentProc {
	t.Helper()
	a := launchAgentTo(t, top, stdout, args...)
	a.waitReady()
	return a
}

// udpWaves sends total new UDP flows (one datagram and its echo each),
// alternating between dsts, in waves of wave flows: every socket of a wave
// sends before any echo is read, so the queue sees bursts of new flows,
// and the remote's socket buffer never overflows. It returns each flow's
// local address and destination, and how long the waves took.
func udpWaves(t *testing.T, ns *netns.NS, dsts []netip.AddrPort, total, wave int) ([][2]netip.AddrPort, time.Duration) {
	t.Helper()
	var flows [][2]netip.AddrPort
	start := time.Now()
	for sent := 0; sent < total; sent += wave {
		n := min(wave, total-sent)
		conns := make([]*net.UDPConn, 0, n)
		err := ns.Do(func() error {
			for i := 0; i < n; i++ {
				c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dsts[(sent+i)%len(dsts)]))
				if err != nil {
					return err
				}
				conns = append(conns, c)
			}
			return nil
		})
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range conns {
			if _, err := c.Write([]byte("stall")); err != nil {
				t.Fatal(err)
			}
		}
		buf := make([]byte, 16)
		for i, c := range conns {
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := c.Read(buf); err != nil {
				t.Fatalf("flow %d: no echo: %v", sent+i, err)
			}
			flows = append(flows, [2]netip.AddrPort{unmap(c.LocalAddr().(*net.UDPAddr).AddrPort()), dsts[(sent+i)%len(dsts)]})
		}
	}
	return flows, time.Since(start)
}

func unmap(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) }

// A flow log nobody reads costs records, never verdicts: every flow is
// decided and NATed right, the loss is counted, and once the reader comes
// back a gap record reports exactly the counted loss.
func TestAuditStalledSink(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	cfg := writeConfig(t, t.TempDir(), auditConfig)

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	// One page: the writer stalls after a dozen records.
	if _, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 4096); err != nil {
		t.Fatal(err)
	}
	var out netnstest.Buffer
	var drain sync.Once
	drained := make(chan struct{})
	startDrain := func() {
		drain.Do(func() {
			go func() {
				defer close(drained)
				_, _ = io.Copy(&out, r)
			}()
		})
	}
	t.Cleanup(func() {
		w.Close()    // in case the agent never started; EOF needs every write end closed
		startDrain() // unblocks the agent should a failure come before the drain
		<-drained    // EOF: the agent exited
		r.Close()
	})
	a := startAgentStdout(t, top, w, "--config", cfg, "--flow-log", "stdout", "--flow-log-buffer", "64")
	w.Close()             // the agent holds the only write end: its exit gives EOF
	t.Cleanup(startDrain) // runs before the agent's stop

	const port, flows, wave = 7700, 400, 50
	dsts := []netip.AddrPort{netip.AddrPortFrom(internet4, port), netip.AddrPortFrom(internal4, port)}
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	checkSources := func(phase string, sent [][2]netip.AddrPort) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		seen, err := sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) >= len(sent) })
		if err != nil {
			t.Fatal(err)
		}
		// Masqueraded flows arrive from the node; each passthrough flow
		// arrives from its own pod socket.
		bySrc := seenSet(seen)
		masq := 0
		for _, s := range seen {
			if s.Dst.Addr() == internet4 {
				if s.Src.Addr() != sandbox.NodeAddr4 {
					t.Errorf("%s: flow to %v arrived from %v, want the node address", phase, s.Dst, s.Src)
				}
				masq++
			}
		}
		for _, f := range sent {
			if f[1].Addr() == internal4 && bySrc[seenKey{"udp", f[0], f[1]}] != 1 {
				t.Errorf("%s: passthrough flow %v->%v not seen from the pod address", phase, f[0], f[1])
			}
		}
		if want := len(sent) / 2; masq != want {
			t.Errorf("%s: %d masqueraded flows arrived, want %d", phase, masq, want)
		}
	}

	// Stalled: nobody reads the pipe.
	lat0 := latency(a)
	sent, took := udpWaves(t, top.Pod, dsts, flows, wave)
	checkSources("stalled sink", sent)
	// The counters move after the verdict, so an echo can beat them.
	a.waitMetric("stalled sink: every flow decided", func(v float64) bool { return v >= flows }, "nfmasq_decisions_total")
	if got := a.metric("nfmasq_decisions_total"); got != flows {
		t.Errorf("stalled sink: %v flows decided by the agent, want exactly %d", got, flows)
	}
	if got := a.metric("nfmasq_undecided_total"); got != 0 {
		t.Errorf("stalled sink: %v flows left undecided", got)
	}
	stalledLat := latency(a).since(lat0)
	overflow := a.metric("nfmasq_flowlog_dropped_total", "reason", "overflow")
	if overflow == 0 {
		t.Fatalf("%d flows into a stalled 64-record buffer dropped nothing", flows)
	}
	stalledRate := float64(flows) / took.Seconds()
	sink.Close()

	// The reader comes back: the writer finishes its batch and reports
	// the loss. No traffic is left, so the gap records must come to the
	// counted loss, and written plus lost decisions to all of them.
	startDrain()
	read := func() []byte { return []byte(out.String()) }
	var final float64
	recs := waitFlowLog(t, read, "gap records equal to the overflow metric", func(r []flowRec) bool {
		final = a.metric("nfmasq_flowlog_dropped_total", "reason", "overflow")
		return float64(gapDropped(r, "overflow")) == final
	})
	if final < overflow {
		t.Errorf("overflow metric went down from %v to %v", overflow, final)
	}
	if lost := gapDropped(recs, ""); lost != gapDropped(recs, "overflow") {
		t.Errorf("gap records report %d losses, %d of them overflow; no other loss was possible", lost, gapDropped(recs, "overflow"))
	}
	recs = waitFlowLog(t, read, "every decision written or reported lost", func(r []flowRec) bool {
		return uint64(len(ofKind(r, "decision")))+gapDropped(r, "", "decision") >= flows
	})
	if got := uint64(len(ofKind(recs, "decision"))) + gapDropped(recs, "", "decision"); got != flows {
		t.Errorf("%d decision records plus %d reported lost for %d decisions", len(ofKind(recs, "decision")), gapDropped(recs, "", "decision"), flows)
	}
	gaps := ofKind(recs, "gap")
	for _, g := range gaps {
		if g.Start == nil || g.End == nil || g.End.Before(*g.Start) {
			t.Errorf("gap record without a sane interval: %s", g.line)
		}
	}

	// The same load with the reader keeping up, for the rate figure.
	sink2, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, port+1)
	if err != nil {
		t.Fatal(err)
	}
	defer sink2.Close()
	dsts = []netip.AddrPort{netip.AddrPortFrom(internet4, port+1), netip.AddrPortFrom(internal4, port+1)}
	lat1 := latency(a)
	_, tookFree := udpWaves(t, top.Pod, dsts, flows, wave)
	a.waitMetric("drained sink: every flow decided", func(v float64) bool { return v >= 2*flows }, "nfmasq_decisions_total")
	freeLat := latency(a).since(lat1)
	freeRate := float64(flows) / tookFree.Seconds()
	t.Logf("stalled sink: %d flows in %v (%.0f flows/s, mean decision latency %v), %v records dropped (overflow), %d gap records",
		flows, took.Round(time.Millisecond), stalledRate, stalledLat, final, len(gaps))
	t.Logf("reader keeping up: %d flows in %v (%.0f flows/s, mean decision latency %v); stalled/free rate %.2f; overflow since: %v",
		flows, tookFree.Round(time.Millisecond), freeRate, freeLat, stalledRate/freeRate,
		a.metric("nfmasq_flowlog_dropped_total", "reason", "overflow")-final)
}

// latencySample is the decision latency histogram's sum and count.
type latencySample struct {
	sum   float64
	count uint64
}

func latency(a *agentProc) latencySample {
	a.t.Helper()
	mf, ok := a.metrics()["nfmasq_decision_latency_seconds"]
	if !ok || len(mf.Metric) == 0 || mf.Metric[0].Histogram == nil {
		a.t.Fatal("no nfmasq_decision_latency_seconds histogram")
	}
	h := mf.Metric[0].Histogram
	return latencySample{h.GetSampleSum(), h.GetSampleCount()}
}

// since is the mean latency of the observations after prev.
func (s latencySample) since(prev latencySample) time.Duration {
	if s.count <= prev.count {
		return 0
	}
	return time.Duration((s.sum - prev.sum) / float64(s.count-prev.count) * float64(time.Second)).Round(time.Microsecond)
}
