package queue

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue/packet"
)

var testMarks = mark.Default

func testPolicy(t testing.TB, enableIPv6 bool) *nat.Policy {
	t.Helper()
	p, err := nat.Compile(nat.Input{Config: nat.DefaultConfig(false), EnableIPv6: enableIPv6})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// udpPacket builds an IPv4 or IPv6 UDP packet from a pod to dst.
func udpPacket(dst netip.Addr) []byte {
	l4 := []byte{0x9c, 0x40, 0, 53, 0, 8, 0, 0}
	if dst.Is4() {
		b := make([]byte, 20, 28)
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:], 28)
		b[8], b[9] = 64, 17
		copy(b[12:], []byte{10, 244, 0, 2})
		copy(b[16:], dst.AsSlice())
		return append(b, l4...)
	}
	b := make([]byte, 40, 48)
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], 8)
	b[6], b[7] = 17, 64
	copy(b[8:], netip.MustParseAddr("fd00:10:244::2").AsSlice())
	copy(b[24:], dst.AsSlice())
	return append(b, l4...)
}

type sentVerdict struct {
	id      uint32
	mark    uint32
	setMark bool
}

// fakeVerdicter records verdicts; failN makes the next N sends fail and
// panicN makes the next N sends panic.
type fakeVerdicter struct {
	sent   []sentVerdict
	failN  int
	panicN int
}

func (f *fakeVerdicter) verdict(id, mark uint32, setMark bool) error {
	if f.panicN > 0 {
		f.panicN--
		panic("verdicter exploded")
	}
	if f.failN > 0 {
		f.failN--
		return errors.New("send failed")
	}
	f.sent = append(f.sent, sentVerdict{id, mark, setMark})
	return nil
}

// recordingObserver keeps copies of the events.
type recordingObserver struct {
	events []Event
	panic  bool
}

func (o *recordingObserver) Decided(ev *Event) {
	o.events = append(o.events, *ev)
	if o.panic {
		panic("observer exploded")
	}
}

func newTestQueue(t testing.TB, cfg Config) *Queue {
	t.Helper()
	if cfg.Marks == (mark.Layout{}) {
		cfg.Marks = testMarks
	}
	q, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func TestNewValidates(t *testing.T) {
	pol := func() *nat.Policy { return nil }
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no policy", Config{Marks: testMarks}, "no Policy"},
		{"bad marks", Config{Policy: pol}, "fewer than 2 bits"},
		{"negative workers", Config{Marks: testMarks, Policy: pol, Workers: -1}, "workers"},
		{"duplicate queue", Config{Marks: testMarks, Policy: pol, QueueNums: []uint16{3, 3}}, "twice"},
	}
	for _, tt := range tests {
		_, err := New(tt.cfg)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
	q, err := New(Config{Marks: testMarks, Policy: pol})
	if err != nil {
		t.Fatal(err)
	}
	if got := q.cfg.QueueNums; len(got) != 1 || got[0] != 0 {
		t.Errorf("default queue numbers %v, want [0]", got)
	}
	if q.cfg.CopyRange != DefaultCopyRange || q.cfg.ReadBuffer != DefaultReadBuffer || q.cfg.MaxQueueLen != DefaultMaxQueueLen {
		t.Errorf("defaults not filled: %+v", q.cfg)
	}
}

func TestHandle(t *testing.T) {
	pol4 := testPolicy(t, false)
	pol6 := testPolicy(t, true)
	internet := netip.MustParseAddr("11.0.0.10")
	internal := netip.MustParseAddr("10.200.0.10")
	internet6 := netip.MustParseAddr("2001:db8:100::10")

	tests := []struct {
		name        string
		in          inbound
		policy      *nat.Policy
		wantVerdict sentVerdict
		wantOutcome Outcome
		wantAction  nat.Action
		wantStatus  packet.Status
	}{
		{
			name:        "internet is masqueraded",
			in:          inbound{id: 1, payload: udpPacket(internet), hasPayload: true, hwProto: 0x0800},
			policy:      pol4,
			wantVerdict: sentVerdict{1, 0x1000, true},
			wantAction:  nat.Masquerade,
		},
		{
			name:        "rfc1918 keeps the pod address",
			in:          inbound{id: 2, payload: udpPacket(internal), hasPayload: true, hwProto: 0x0800},
			policy:      pol4,
			wantVerdict: sentVerdict{2, 0x2000, true},
			wantAction:  nat.Passthrough,
		},
		{
			name:        "kube-proxy and calico bits survive, stale bits of ours do not",
			in:          inbound{id: 3, payload: udpPacket(internet), hasPayload: true, mark: 0xffff4000 | 0x2000},
			policy:      pol4,
			wantVerdict: sentVerdict{3, 0xffff4000 | 0x1000, true},
			wantAction:  nat.Masquerade,
		},
		{
			name:        "ipv6 masqueraded when enabled",
			in:          inbound{id: 4, payload: udpPacket(internet6), hasPayload: true, hwProto: 0x86dd},
			policy:      pol6,
			wantVerdict: sentVerdict{4, 0x1000, true},
			wantAction:  nat.Masquerade,
		},
		{
			name:        "ipv6 passes through when disabled",
			in:          inbound{id: 5, payload: udpPacket(internet6), hasPayload: true, hwProto: 0x86dd},
			policy:      pol4,
			wantVerdict: sentVerdict{5, 0x2000, true},
			wantAction:  nat.Passthrough,
		},
		{
			name:        "truncated header is accepted unmarked",
			in:          inbound{id: 6, payload: udpPacket(internet)[:12], hasPayload: true, hwProto: 0x0800},
			policy:      pol4,
			wantVerdict: sentVerdict{6, 0, false},
			wantOutcome: Malformed,
			wantStatus:  packet.Truncated,
		},
		{
			name:        "family mismatch is accepted unmarked",
			in:          inbound{id: 7, payload: udpPacket(internet), hasPayload: true, hwProto: 0x86dd},
			policy:      pol4,
			wantVerdict: sentVerdict{7, 0, false},
			wantOutcome: Malformed,
			wantStatus:  packet.BadVersion,
		},
		{
			name:        "non-IP payload is accepted unmarked",
			in:          inbound{id: 8, payload: []byte{0, 1, 8, 0}, hasPayload: true},
			policy:      pol4,
			wantVerdict: sentVerdict{8, 0, false},
			wantOutcome: Malformed,
			wantStatus:  packet.NotIP,
		},
		{
			name:        "no payload",
			in:          inbound{id: 9},
			policy:      pol4,
			wantVerdict: sentVerdict{9, 0, false},
			wantOutcome: NoPayload,
			wantStatus:  packet.NotIP,
		},
		{
			name:        "no policy",
			in:          inbound{id: 10, payload: udpPacket(internet), hasPayload: true},
			wantVerdict: sentVerdict{10, 0, false},
			wantOutcome: NoPolicy,
		},
		{
			name:        "snapped packet is still decided on its destination",
			in:          inbound{id: 11, payload: udpPacket(internet)[:22], hasPayload: true},
			policy:      pol4,
			wantVerdict: sentVerdict{11, 0x1000, true},
			wantAction:  nat.Masquerade,
			wantStatus:  packet.Snapped,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obs := &recordingObserver{}
			q := newTestQueue(t, Config{Policy: func() *nat.Policy { return tt.policy }, Observer: obs})
			fv := &fakeVerdicter{}
			h := q.newHandler(0, 0, fv)
			tt.in.received = q.now()
			h.handle(&tt.in)

			if len(fv.sent) != 1 || fv.sent[0] != tt.wantVerdict {
				t.Fatalf("verdicts %+v, want [%+v]", fv.sent, tt.wantVerdict)
			}
			if len(obs.events) != 1 {
				t.Fatalf("observer saw %d events", len(obs.events))
			}
			ev := obs.events[0]
			if ev.Outcome != tt.wantOutcome || ev.Decision.Action != tt.wantAction || ev.Packet.Status != tt.wantStatus {
				t.Errorf("event outcome %v action %v status %v, want %v %v %v",
					ev.Outcome, ev.Decision.Action, ev.Packet.Status, tt.wantOutcome, tt.wantAction, tt.wantStatus)
			}
			if ev.PacketID != tt.in.id || ev.Latency < 0 || !ev.Time.Equal(q.epoch.Add(tt.in.received)) || ev.VerdictErr != nil {
				t.Errorf("event bookkeeping wrong: %+v", ev)
			}
			if tt.wantVerdict.setMark && ev.Mark != tt.wantVerdict.mark {
				t.Errorf("event mark %#x, want %#x", ev.Mark, tt.wantVerdict.mark)
			}

			s := q.Stats()
			want := Stats{Packets: 1, Verdicts: 1}
			switch {
			case tt.wantOutcome != Decided:
				want.Undecided[tt.wantOutcome] = 1
				if tt.wantOutcome == Malformed {
					want.Malformed[tt.wantStatus] = 1
				}
			case tt.wantAction == nat.Masquerade:
				want.Masquerade = 1
			default:
				want.Passthrough = 1
			}
			if s != want {
				t.Errorf("stats\n got %+v\nwant %+v", s, want)
			}
		})
	}
}

func TestHandleNeverLosesAVerdict(t *testing.T) {
	pol := testPolicy(t, false)
	pkt := udpPacket(netip.MustParseAddr("11.0.0.10"))
	tests := []struct {
		name         string
		policy       func() *nat.Policy
		observer     *recordingObserver
		verdicter    *fakeVerdicter
		wantVerdicts []sentVerdict
		want         Stats
	}{
		{
			name:         "policy panics: unmarked verdict",
			policy:       func() *nat.Policy { panic("policy exploded") },
			verdicter:    &fakeVerdicter{},
			wantVerdicts: []sentVerdict{{1, 0, false}},
			want:         Stats{Packets: 1, Verdicts: 1, Panics: 1, Undecided: [NumOutcomes]uint64{Panicked: 1}},
		},
		{
			name:         "observer panics after the verdict: no second verdict",
			policy:       func() *nat.Policy { return pol },
			observer:     &recordingObserver{panic: true},
			verdicter:    &fakeVerdicter{},
			wantVerdicts: []sentVerdict{{1, 0x1000, true}},
			want:         Stats{Packets: 1, Verdicts: 1, Masquerade: 1, Panics: 1},
		},
		{
			name:         "verdict send panics: retried unmarked",
			policy:       func() *nat.Policy { return pol },
			verdicter:    &fakeVerdicter{panicN: 1},
			wantVerdicts: []sentVerdict{{1, 0, false}},
			want:         Stats{Packets: 1, Verdicts: 1, Panics: 1, Undecided: [NumOutcomes]uint64{Panicked: 1}},
		},
		{
			name:         "verdict send panics twice: contained and counted",
			policy:       func() *nat.Policy { return pol },
			verdicter:    &fakeVerdicter{panicN: 2},
			wantVerdicts: nil,
			want:         Stats{Packets: 1, Panics: 1, VerdictErrors: 1, Undecided: [NumOutcomes]uint64{Panicked: 1}},
		},
		{
			name:         "verdict send fails: counted",
			policy:       func() *nat.Policy { return pol },
			verdicter:    &fakeVerdicter{failN: 1},
			wantVerdicts: nil,
			want:         Stats{Packets: 1, VerdictErrors: 1, Masquerade: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{Policy: tt.policy}
			if tt.observer != nil {
				cfg.Observer = tt.observer
			}
			q := newTestQueue(t, cfg)
			h := q.newHandler(0, 0, tt.verdicter)
			h.handle(&inbound{id: 1, payload: pkt, hasPayload: true, received: q.now()})
			if len(tt.verdicter.sent) != len(tt.wantVerdicts) {
				t.Fatalf("verdicts %+v, want %+v", tt.verdicter.sent, tt.wantVerdicts)
			}
			for i := range tt.wantVerdicts {
				if tt.verdicter.sent[i] != tt.wantVerdicts[i] {
					t.Errorf("verdict %d: %+v, want %+v", i, tt.verdicter.sent[i], tt.wantVerdicts[i])
				}
			}
			if s := q.Stats(); s != tt.want {
				t.Errorf("stats\n got %+v\nwant %+v", s, tt.want)
			}
		})
	}
}

func TestStatsSumAcrossHandlers(t *testing.T) {
	pol := testPolicy(t, false)
	q := newTestQueue(t, Config{Policy: func() *nat.Policy { return pol }, QueueNums: []uint16{1, 2}, Workers: 3})
	pkt := udpPacket(netip.MustParseAddr("11.0.0.10"))
	n := 0
	for qi := range 2 {
		for w := range 3 {
			h := q.newHandler(qi, w, &fakeVerdicter{})
			if h.num != uint16(qi+1) {
				t.Errorf("handler for queue index %d has number %d", qi, h.num)
			}
			h.handle(&inbound{id: 1, payload: pkt, hasPayload: true})
			n++
		}
	}
	q.sockets[1].skipped.Add(4)
	s := q.Stats()
	if s.Packets != uint64(n) || s.Masquerade != uint64(n) || s.Skipped != 4 {
		t.Errorf("stats %+v, want %d packets and 4 skipped", s, n)
	}
}

func TestIDGap(t *testing.T) {
	tests := []struct {
		last, id, want uint32
	}{
		{0, 1, 0},
		{0, 5, 4},
		{1, 2, 0},
		{10, 20, 9},
		{0xffffffff, 0, 0},
		{0xfffffffe, 1, 2},
		{20, 10, 0},
		{5, 5, 0},
	}
	for _, tt := range tests {
		if got := idGap(tt.last, tt.id); got != tt.want {
			t.Errorf("idGap(%d, %d) = %d, want %d", tt.last, tt.id, got, tt.want)
		}
	}
}

func TestOutcomeStrings(t *testing.T) {
	for o := range NumOutcomes {
		if s := o.String(); s == "" || strings.HasPrefix(s, "outcome_") {
			t.Errorf("Outcome %d has no name", o)
		}
	}
}

func TestRateLimit(t *testing.T) {
	var r rateLimit
	if !r.allow() {
		t.Fatal("first event refused")
	}
	if r.allow() {
		t.Fatal("second event within a second allowed")
	}
}

// TestHandleAllocs pins the hot path (decode, decide, mark, count, observe)
// at zero allocations; only the verdict send itself may allocate.
func TestHandleAllocs(t *testing.T) {
	pol := testPolicy(t, true)
	var seen atomic.Int64
	q := newTestQueue(t, Config{Policy: func() *nat.Policy { return pol }, Observer: countingObserver{&seen}})
	h := q.newHandler(0, 0, nopVerdicter{})
	pkts := []inbound{
		{id: 1, payload: udpPacket(netip.MustParseAddr("11.0.0.10")), hasPayload: true, hwProto: 0x0800},
		{id: 2, payload: udpPacket(netip.MustParseAddr("10.0.0.10")), hasPayload: true, hwProto: 0x0800},
		{id: 3, payload: udpPacket(netip.MustParseAddr("2001:db8::1")), hasPayload: true, hwProto: 0x86dd},
		{id: 4, payload: []byte{0x45}, hasPayload: true},
	}
	allocs := testing.AllocsPerRun(1000, func() {
		for i := range pkts {
			h.handle(&pkts[i])
		}
	})
	if allocs != 0 {
		t.Errorf("handle allocated %v times per run, want 0", allocs)
	}
	if seen.Load() == 0 {
		t.Error("observer never called")
	}
}

type nopVerdicter struct{}

func (nopVerdicter) verdict(uint32, uint32, bool) error { return nil }

type countingObserver struct{ n *atomic.Int64 }

func (o countingObserver) Decided(*Event) { o.n.Add(1) }

// BenchmarkHandle is the userspace cost per packet without the netlink
// send: decode, policy lookup, mark, counters, clock reads.
func BenchmarkHandle(b *testing.B) {
	pol := testPolicy(b, true)
	q := newTestQueue(b, Config{Policy: func() *nat.Policy { return pol }})
	h := q.newHandler(0, 0, nopVerdicter{})
	in := inbound{id: 1, payload: udpPacket(netip.MustParseAddr("11.0.0.10")), hasPayload: true, hwProto: 0x0800}
	b.ReportAllocs()
	for b.Loop() {
		in.received = q.now()
		h.handle(&in)
	}
}
