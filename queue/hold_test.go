package queue

import (
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/nfmasq/nfmasq/nat"
)

// recordingVerdicter keeps the verdicts it is asked to send.
type recordingVerdicter struct {
	mu  sync.Mutex
	ids []uint32
}

func (r *recordingVerdicter) verdict(id, _ uint32, _ bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids = append(r.ids, id)
	return nil
}

// eventLog keeps a copy of every observed Event.
type eventLog struct {
	mu  sync.Mutex
	evs []Event
	n   atomic.Int64
}

func (l *eventLog) Decided(ev *Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evs = append(l.evs, *ev)
	l.n.Add(1)
}

func (l *eventLog) byID(id uint32) (Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ev := range l.evs {
		if ev.PacketID == id {
			return ev, true
		}
	}
	return Event{}, false
}

// udpFrom is udpPacket with an IPv4 source of choice.
func udpFrom(src, dst netip.Addr) []byte {
	b := udpPacket(dst)
	copy(b[12:16], src.AsSlice())
	return b
}

var (
	knownPod   = netip.MustParseAddr("10.244.0.2")
	unknownPod = netip.MustParseAddr("10.244.0.9")
	partner    = netip.MustParseAddr("203.0.113.7") // masqueraded by the node policy
	podRange   = netip.MustParsePrefix("10.244.0.0/24")
)

// keepForPartner is a PolicySet keeping the pod address for partner.
func keepForPartner(t testing.TB) *nat.PolicySet {
	t.Helper()
	ps, errs := nat.ParseMasqueradePolicies([]byte(`apiVersion: nfmasq.io/v1alpha1
kind: MasqueradePolicy
metadata: {name: keep}
spec: {action: NoSNAT, podSelector: {matchLabels: {app: billing}}, destinations: [{cidr: 203.0.113.0/24}]}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	all, err := nat.NewMasqueradePolicies(ps, nil)
	if err != nil {
		t.Fatal(err)
	}
	set, err := all.For(nat.Workload{Labels: labels.Set{"app": "billing"}})
	if err != nil || set == nil {
		t.Fatalf("set %v, %v", set, err)
	}
	return set
}

type holdHarness struct {
	q       *Queue
	h       *handler
	vb      verdictBatch
	written [][]byte
	release *recordingVerdicter
	events  *eventLog
	wl      atomic.Pointer[nat.Workloads]
	stop    chan struct{}
}

func newHoldHarness(t *testing.T, wait time.Duration, maxHeld int, wl *nat.Workloads) *holdHarness {
	hh := &holdHarness{release: &recordingVerdicter{}, events: &eventLog{}, stop: make(chan struct{})}
	hh.wl.Store(wl)
	pol := testPolicy(t, true)
	hh.q = newTestQueue(t, Config{
		Policy:       func() *nat.Policy { return pol },
		Workloads:    hh.wl.Load,
		IdentityWait: wait,
		MaxHeld:      maxHeld,
		Observer:     hh.events,
	})
	hh.h = hh.q.newHandler(0, 0, nopVerdicter{})
	hh.h.holdOut = hh.q.newHoldHandler(0, hh.release)
	hh.vb = verdictBatch{num: 0, write: func(b []byte) error {
		hh.written = append(hh.written, append([]byte(nil), b...))
		return nil
	}}
	go hh.q.hold.run(hh.stop)
	t.Cleanup(func() {
		close(hh.stop)
		<-hh.q.hold.done
		hh.q.hold.close()
	})
	return hh
}

func (hh *holdHarness) batch(t *testing.T, pkts ...inbound) []sentMsg {
	hh.written = nil
	hh.h.handleBatch(pkts, &hh.vb)
	var out []sentMsg
	for _, w := range hh.written {
		out = append(out, decodeVerdicts(t, w)...)
	}
	return out
}

func pkt(id uint32, src, dst netip.Addr) inbound {
	return inbound{id: id, payload: udpFrom(src, dst), hasPayload: true, hwProto: 0x0800}
}

func waitEvent(t *testing.T, l *eventLog, id uint32) Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if ev, ok := l.byID(id); ok {
			return ev
		}
		if time.Now().After(deadline) {
			t.Fatalf("packet %d was never answered", id)
		}
		time.Sleep(time.Millisecond) // polling the observer with a deadline
	}
}

// A packet from an unknown pod address waits without a verdict, no batch
// verdict is sent while it waits (it would answer it), the packets around
// it are answered at once, and it is decided with its pod's
// MasqueradePolicy as soon as the pod is known.
func TestHoldUntilKnown(t *testing.T) {
	set := keepForPartner(t)
	hh := newHoldHarness(t, time.Minute, 0, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{knownPod: nil}, []netip.Prefix{podRange}))

	got := hh.batch(t, pkt(1, knownPod, partner), pkt(2, knownPod, partner), pkt(3, unknownPod, partner), pkt(4, knownPod, partner), pkt(5, knownPod, partner))
	want := []sentMsg{
		{batch: true, id: 2, mark: testMarks.Masquerade, setMark: true}, // the run before the held packet
		{id: 4, mark: testMarks.Masquerade, setMark: true},
		{id: 5, mark: testMarks.Masquerade, setMark: true},
	}
	if len(got) != len(want) {
		t.Fatalf("verdicts %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("verdict %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if s := hh.q.Stats(); s.Holding != 1 || s.Held != 1 {
		t.Fatalf("holding %d, held %d; want 1, 1", s.Holding, s.Held)
	}
	// Still waiting: the next batch is answered packet by packet.
	if got := hh.batch(t, pkt(6, knownPod, partner), pkt(7, knownPod, partner)); len(got) != 2 || got[0].batch || got[1].batch {
		t.Errorf("while a packet waits, verdicts %+v; want two single ones", got)
	}

	hh.wl.Store(nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{knownPod: nil, unknownPod: set}, []netip.Prefix{podRange}))
	hh.q.WorkloadsChanged()
	ev := waitEvent(t, hh.events, 3)
	if ev.Decision.Action != nat.Passthrough || ev.Decision.Origin != "keep" || ev.IdentityUnknown || ev.Held <= 0 {
		t.Errorf("released packet: %+v, held %v, unknown %v; want NoSNAT by keep, identity known", ev.Decision, ev.Held, ev.IdentityUnknown)
	}
	if ev.Mark != testMarks.Passthrough {
		t.Errorf("released with mark %#x, want passthrough %#x", ev.Mark, testMarks.Passthrough)
	}
	hh.release.mu.Lock()
	ids := hh.release.ids
	hh.release.mu.Unlock()
	if len(ids) != 1 || ids[0] != 3 {
		t.Errorf("holder verdicts %v, want [3]", ids)
	}
	if s := hh.q.Stats(); s.Holding != 0 || s.HeldExpired != 0 || s.Verdicts != s.Packets {
		t.Errorf("stats %+v: want nothing held, nothing expired, every packet answered", s)
	}
	// Nothing waits: batches again.
	if got := hh.batch(t, pkt(8, knownPod, partner), pkt(9, knownPod, partner)); len(got) != 1 || !got[0].batch {
		t.Errorf("with nothing held, verdicts %+v; want one batch", got)
	}
}

// A packet whose pod stays unknown is decided by the node policy when its
// wait runs out, and says so.
func TestHoldExpires(t *testing.T) {
	hh := newHoldHarness(t, 20*time.Millisecond, 0, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{}, []netip.Prefix{podRange}))
	hh.batch(t, pkt(1, unknownPod, partner))
	ev := waitEvent(t, hh.events, 1)
	if !ev.IdentityUnknown || ev.Held < 20*time.Millisecond || ev.Decision.Action != nat.Masquerade || ev.Decision.Source != nat.SourceNone {
		t.Errorf("expired packet: %+v, held %v, unknown %v; want the node policy's masquerade after 20ms", ev.Decision, ev.Held, ev.IdentityUnknown)
	}
	if s := hh.q.Stats(); s.HeldExpired != 1 || s.Holding != 0 {
		t.Errorf("expired %d, holding %d; want 1, 0", s.HeldExpired, s.Holding)
	}
}

// Nothing waits while no MasqueradePolicy exists, nor outside the pod
// ranges; beyond MaxHeld packets are decided at once, as unknown.
func TestHoldBounds(t *testing.T) {
	t.Run("no policies", func(t *testing.T) {
		hh := newHoldHarness(t, time.Minute, 0, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{}, nil))
		if got := hh.batch(t, pkt(1, unknownPod, partner)); len(got) != 1 {
			t.Errorf("verdicts %+v, want one at once", got)
		}
		if ev, _ := hh.events.byID(1); ev.IdentityUnknown {
			t.Error("identity reported unknown with no policy in force")
		}
	})
	t.Run("outside the pod ranges", func(t *testing.T) {
		hh := newHoldHarness(t, time.Minute, 0, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{}, []netip.Prefix{podRange}))
		if got := hh.batch(t, pkt(1, netip.MustParseAddr("10.9.0.1"), partner)); len(got) != 1 {
			t.Errorf("verdicts %+v, want one at once", got)
		}
	})
	t.Run("full", func(t *testing.T) {
		hh := newHoldHarness(t, time.Minute, 1, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{}, []netip.Prefix{podRange}))
		got := hh.batch(t, pkt(1, unknownPod, partner), pkt(2, unknownPod, partner))
		if len(got) != 1 || got[0].id != 2 {
			t.Fatalf("verdicts %+v, want packet 2 answered at once", got)
		}
		if ev, _ := hh.events.byID(2); !ev.IdentityUnknown {
			t.Error("the packet over the bound was not reported as unknown")
		}
		if s := hh.q.Stats(); s.HeldOverflow != 1 || s.Holding != 1 {
			t.Errorf("overflow %d, holding %d; want 1, 1", s.HeldOverflow, s.Holding)
		}
	})
}

// Stopping answers every waiting packet at once.
func TestHoldCloseAnswersAll(t *testing.T) {
	hh := newHoldHarness(t, time.Hour, 0, nat.NewWorkloads(map[netip.Addr]*nat.PolicySet{}, []netip.Prefix{podRange}))
	hh.batch(t, pkt(1, unknownPod, partner), pkt(2, unknownPod, partner))
	close(hh.stop)
	<-hh.q.hold.done
	hh.q.hold.close()
	hh.stop = make(chan struct{})
	hh.q.hold.done = make(chan struct{})
	go hh.q.hold.run(hh.stop)
	if s := hh.q.Stats(); s.Holding != 0 || s.HeldExpired != 2 || s.Verdicts != 2 {
		t.Errorf("after close: %+v; want both answered, as unknown", s)
	}
	// Closed: new unknown packets are decided at once.
	if got := hh.batch(t, pkt(3, unknownPod, partner)); len(got) != 1 {
		t.Errorf("after close, verdicts %+v; want one at once", got)
	}
}

// BenchmarkHandleMasqueradePolicies is BenchmarkHandle with 1,000
// MasqueradePolicies and 250 pods on the node, every pod selected by a
// handful of them: the per-packet cost of a source lookup and the pod's
// compiled set. The baseline, BenchmarkHandle's handler with no policies,
// runs beside it in alternating blocks, so both see the same machine; it
// reports both costs and their ratio (the bound is 1.5).
func BenchmarkHandleMasqueradePolicies(b *testing.B) {
	all, pods := benchWorkloads(b, 1000, 250)
	pol := testPolicy(b, true)
	withPolicies := newTestQueue(b, Config{Policy: func() *nat.Policy { return pol }, Workloads: func() *nat.Workloads { return all }, IdentityWait: time.Second})
	baseline := newTestQueue(b, Config{Policy: func() *nat.Policy { return pol }})
	hp, hb := withPolicies.newHandler(0, 0, nopVerdicter{}), baseline.newHandler(0, 0, nopVerdicter{})
	in := inbound{id: 1, payload: udpFrom(pods[137], netip.MustParseAddr("11.0.0.10")), hasPayload: true, hwProto: 0x0800}
	const block = 4096
	var tp, tb time.Duration
	var n int
	b.ReportAllocs()
	for b.Loop() {
		start := time.Now()
		for range block {
			in.received = withPolicies.now()
			hp.handle(&in)
		}
		mid := time.Now()
		for range block {
			in.received = baseline.now()
			hb.handle(&in)
		}
		tp += mid.Sub(start)
		tb += time.Since(mid)
		n += block
	}
	if s := withPolicies.Stats(); s.Held != 0 || s.Masquerade+s.Passthrough != s.Packets {
		b.Fatalf("stats %+v", s)
	}
	b.ReportMetric(float64(tp.Nanoseconds())/float64(n), "ns/pkt-policies")
	b.ReportMetric(float64(tb.Nanoseconds())/float64(n), "ns/pkt-baseline")
	b.ReportMetric(float64(tp)/float64(tb), "ratio")
}

// benchWorkloads returns nPods pod addresses in 10.244.0.0/16, each
// labelled app=<i%50>, and 1,000 policies each selecting one app with ten
// destinations in 11.0.0.0/8 (the benchmark's destination).
func benchWorkloads(b *testing.B, nPolicies, nPods int) (*nat.Workloads, []netip.Addr) {
	var ps []nat.MasqueradePolicy
	for i := range nPolicies {
		p := nat.MasqueradePolicy{
			Name:              "p" + itoa(i),
			NamespaceSelector: labels.Everything(),
			PodSelector:       labels.SelectorFromSet(labels.Set{"app": itoa(i % 50)}),
			Action:            nat.Action(1 + i%2),
		}
		for j := range 10 {
			a := netip.AddrFrom4([4]byte{11, byte(i % 256), byte(j * 16), 0})
			p.Destinations = append(p.Destinations, nat.MasqueradeDestination{CIDR: netip.PrefixFrom(a, 20)})
		}
		ps = append(ps, p)
	}
	all, err := nat.NewMasqueradePolicies(ps, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")})
	if err != nil {
		b.Fatal(err)
	}
	pods := map[netip.Addr]*nat.PolicySet{}
	var addrs []netip.Addr
	for i := range nPods {
		a := netip.AddrFrom4([4]byte{10, 244, byte(i / 200), byte(2 + i%200)})
		set, err := all.For(nat.Workload{Labels: labels.Set{"app": itoa(i % 50)}})
		if err != nil {
			b.Fatal(err)
		}
		pods[a] = set
		addrs = append(addrs, a)
	}
	return nat.NewWorkloads(pods, []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}), addrs
}

func itoa(i int) string { return strconv.Itoa(i) }
