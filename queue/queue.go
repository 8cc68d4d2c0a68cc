package queue

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// Defaults for the zero values of Config.
const (
	// DefaultCopyRange covers the largest IPv4 header (60 bytes) and the
	// first 20 bytes of TCP with room for IPv6 extension headers. The
	// kernel copies no more than this into each message.
	DefaultCopyRange = 128
	// DefaultMaxQueueLen is how many packets may wait for a verdict
	// before the kernel fails open for the next ones.
	DefaultMaxQueueLen = 8192
	// DefaultReadBuffer is the netlink socket's receive buffer. The
	// kernel default (208 KiB) overflowed at 20k new flows/s.
	DefaultReadBuffer = 32 << 20
	// DefaultDrainTimeout bounds how long Run waits for packets already
	// queued when it stops.
	DefaultDrainTimeout = 2 * time.Second
)

// Config configures a Queue. Marks and Policy are required.
type Config struct {
	// QueueNums are the NFQUEUE numbers to bind, one socket each (use
	// several with --queue-balance on many-core nodes). Default: [0].
	QueueNums []uint16
	// Workers is how many goroutines decide the packets of each queue.
	// 0 (the default) decides inline on the queue's receive goroutine; no
	// pool measured better on the 2-core build machine (see the package
	// documentation). n > 0 hands packets to n workers through a channel.
	Workers int
	// NetNS is a network namespace file descriptor to bind in; 0 is the
	// namespace of the calling thread.
	NetNS int
	// Marks are the verdict marks.
	Marks mark.Layout
	// Policy returns the policy in force. It is called for every packet,
	// so it should be an atomic load (a reload swaps the pointer). A nil
	// policy leaves packets undecided (accepted unmarked).
	Policy func() *nat.Policy
	// Workloads returns the per-pod MasqueradePolicy decisions in force;
	// nil (or a nil func) for none. Like Policy it is called for every
	// packet.
	Workloads func() *nat.Workloads
	// IdentityWait is how long a packet from an address of the node's pod
	// ranges that no known pod has waits for its identity, while
	// MasqueradePolicies exist (Workloads.Unknown); after it, the node
	// policy decides and the Event says the identity was unknown. 0 never
	// waits. Other packets keep flowing while some wait.
	IdentityWait time.Duration
	// MaxHeld bounds the packets waiting at once (default
	// DefaultMaxHeld); beyond it they are decided at once, as unknown.
	MaxHeld int
	// Observer receives every packet's outcome; nil for none.
	Observer Observer
	// Logger receives rate-limited reports of panics and netlink errors;
	// nil discards them.
	Logger *slog.Logger

	// CopyRange is how many bytes of each packet the kernel copies
	// (default DefaultCopyRange).
	CopyRange uint32
	// MaxQueueLen is the kernel queue's length (default
	// DefaultMaxQueueLen).
	MaxQueueLen uint32
	// ReadBuffer is the socket receive buffer in bytes (default
	// DefaultReadBuffer).
	ReadBuffer int
	// DrainTimeout bounds the drain on stop (default DefaultDrainTimeout).
	DrainTimeout time.Duration
	// BusyPoll is the longest a queue's reader keeps polling for packets
	// before it sleeps; the window adapts to the traffic (see busyPoll).
	// 0 turns polling off: every packet after a quiet spell then pays
	// for waking the reader.
	BusyPoll time.Duration
}

// Observer receives the outcome of every queued packet.
type Observer interface {
	// Decided is called after the verdict was sent, on the goroutine that
	// sent it. It must not block, and must not retain ev, which is reused
	// for the next packet: copy what it needs.
	Decided(ev *Event)
}

// Outcome says whether a packet was decided and, if not, why.
type Outcome uint8

const (
	// Decided: the verdict carried a masquerade or passthrough mark.
	Decided Outcome = iota
	// Malformed: the packet did not decode (see Event.Packet.Status); it
	// was accepted unmarked.
	Malformed
	// NoPolicy: Config.Policy returned nil; accepted unmarked.
	NoPolicy
	// NoPayload: the kernel's message carried no packet bytes; accepted
	// unmarked.
	NoPayload
	// UnknownAction: the policy returned an action with no mark;
	// accepted unmarked.
	UnknownAction
	// Panicked: deciding panicked; the packet was accepted unmarked.
	Panicked

	// NumOutcomes is the number of Outcome values, for arrays.
	NumOutcomes
)

var outcomeNames = [NumOutcomes]string{
	Decided:       "decided",
	Malformed:     "malformed",
	NoPolicy:      "no_policy",
	NoPayload:     "no_payload",
	UnknownAction: "unknown_action",
	Panicked:      "panicked",
}

// String returns a snake_case name suitable as a metric label.
func (o Outcome) String() string {
	if o < NumOutcomes {
		return outcomeNames[o]
	}
	return fmt.Sprintf("outcome_%d", uint8(o))
}

// Event is one packet's outcome, handed to the Observer.
type Event struct {
	// Time is when the packet was received from the kernel.
	Time time.Time
	// Latency runs from receipt to the verdict being sent.
	Latency time.Duration
	// Queue is the queue number the packet came from.
	Queue uint16
	// PacketID is the kernel's id for the packet within its queue.
	PacketID uint32
	// Packet is the decoded packet (its Status explains Malformed).
	Packet packet.Parsed
	// Outcome says whether the packet was decided.
	Outcome Outcome
	// Decision is the policy's decision; the zero Decision unless
	// Outcome is Decided.
	Decision nat.Decision
	// Policy is the policy that made Decision (nil when none was asked).
	// A reload may put another in force before the observer runs: this
	// is the one that decided.
	Policy *nat.Policy
	// Mark is the packet mark the verdict set; meaningful only when
	// Outcome is Decided (an unmarked verdict leaves the mark alone).
	Mark uint32
	// VerdictErr is non-nil when the verdict could not be sent; the
	// packet then waits in the kernel until the queue is unbound.
	VerdictErr error
	// Held is how long the packet waited for its pod's identity (0: it
	// did not wait).
	Held time.Duration
	// IdentityUnknown says the packet's source was an unknown pod
	// address while MasqueradePolicies exist, and it was decided without
	// one (the wait ran out, the hold was full, or the queue stopped):
	// the node policy decided.
	IdentityUnknown bool
}

// Stats is a snapshot of a Queue's counters since New. Once no packet is
// being handled, Packets = Masquerade + Passthrough + the sum of
// Undecided + Holding; a snapshot taken while one is may lag by that
// packet.
type Stats struct {
	// Packets received from the kernel.
	Packets uint64
	// Verdicts sent successfully.
	Verdicts uint64
	// Masquerade and Passthrough count decisions by action.
	Masquerade, Passthrough uint64
	// Undecided counts packets accepted without a mark, by Outcome
	// (Undecided[Decided] is always 0).
	Undecided [NumOutcomes]uint64
	// Malformed counts Malformed packets by decode status.
	Malformed [packet.NumStatus]uint64
	// Panics recovered while handling a packet (including in the
	// Observer, after the verdict was sent).
	Panics uint64
	// VerdictErrors counts verdicts that could not be sent.
	VerdictErrors uint64
	// Skipped counts packet ids that never reached us: the kernel
	// assigned them but could not deliver the message (socket buffer
	// full), so with fail-open it accepted the packet unmarked. A gap is
	// seen when the next packet arrives. Overflow of the queue length
	// itself (MaxQueueLen) consumes no id and is not visible here, nor in
	// the kernel's counters: only the fallback chain's rule counters see
	// those packets.
	Skipped uint64
	// Netlink receive errors: ENOBUFS (socket overflow reported despite
	// NETLINK_NO_ENOBUFS), ENOENT (a verdict for an id the kernel no
	// longer holds), and anything else.
	NetlinkENOBUFS, NetlinkENOENT, NetlinkOther uint64
	// Held counts packets that waited for their pod's identity;
	// HeldExpired those of them decided without it; HeldOverflow the
	// packets decided at once, as unknown, because the hold was full.
	// Holding is how many wait now.
	Held, HeldExpired, HeldOverflow uint64
	Holding                         int64
}

// counters belong to one handler; Stats sums them. Keeping them per
// handler avoids one cache line bouncing between every worker.
type counters struct {
	packets       atomic.Uint64
	verdicts      atomic.Uint64
	masquerade    atomic.Uint64
	passthrough   atomic.Uint64
	panics        atomic.Uint64
	verdictErrors atomic.Uint64
	undecided     [NumOutcomes]atomic.Uint64
	malformed     [packet.NumStatus]atomic.Uint64
	_             [64]byte
}

// socketCounters belong to one queue's receive goroutine.
type socketCounters struct {
	skipped atomic.Uint64
	enobufs atomic.Uint64
	enoent  atomic.Uint64
	other   atomic.Uint64
	_       [64]byte
}

// Queue binds NFQUEUE numbers and answers every packet queued to them.
// Create it with New, start it with Run.
type Queue struct {
	cfg      Config
	counters []counters       // one per handler: len(QueueNums) * max(1, Workers)
	sockets  []socketCounters // one per queue number
	ready    chan struct{}
	logLimit rateLimit
	started  atomic.Bool
	epoch    time.Time

	procMu sync.Mutex
	proc   *os.File // nfnetlink_queue stats of the bound namespace, while running

	hold *holder // nil when packets never wait for an identity
}

// ErrUnsupported is returned by Run where NFQUEUE does not exist.
var ErrUnsupported = errors.New("queue: NFQUEUE is only available on Linux")

// New validates cfg, fills its defaults and returns a Queue ready to Run.
func New(cfg Config) (*Queue, error) {
	if err := cfg.Marks.Validate(); err != nil {
		return nil, fmt.Errorf("queue config: %w", err)
	}
	if cfg.Policy == nil {
		return nil, errors.New("queue config: no Policy function")
	}
	if cfg.Workers < 0 {
		return nil, fmt.Errorf("queue config: %d workers", cfg.Workers)
	}
	if cfg.IdentityWait < 0 || cfg.MaxHeld < 0 {
		return nil, fmt.Errorf("queue config: identity wait %v, %d held packets", cfg.IdentityWait, cfg.MaxHeld)
	}
	if cfg.MaxHeld == 0 {
		cfg.MaxHeld = DefaultMaxHeld
	}
	if len(cfg.QueueNums) == 0 {
		cfg.QueueNums = []uint16{0}
	}
	seen := make(map[uint16]bool, len(cfg.QueueNums))
	for _, n := range cfg.QueueNums {
		if seen[n] {
			return nil, fmt.Errorf("queue config: queue %d listed twice", n)
		}
		seen[n] = true
	}
	if cfg.CopyRange == 0 {
		cfg.CopyRange = DefaultCopyRange
	}
	if cfg.MaxQueueLen == 0 {
		cfg.MaxQueueLen = DefaultMaxQueueLen
	}
	if cfg.ReadBuffer == 0 {
		cfg.ReadBuffer = DefaultReadBuffer
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.QueueNums = append([]uint16(nil), cfg.QueueNums...)
	q := &Queue{
		cfg: cfg,
		// One per handler, and one per queue for the packets the holder
		// releases.
		counters: make([]counters, len(cfg.QueueNums)*(max(1, cfg.Workers)+1)),
		sockets:  make([]socketCounters, len(cfg.QueueNums)),
		ready:    make(chan struct{}),
		epoch:    time.Now(),
	}
	if cfg.IdentityWait > 0 && cfg.Workloads != nil {
		q.hold = newHolder(q, cfg.IdentityWait, cfg.MaxHeld)
	}
	return q, nil
}

// WorkloadsChanged tells the queue that Config.Workloads returns a new
// snapshot: the packets waiting for an identity are looked at again.
func (q *Queue) WorkloadsChanged() {
	if q.hold != nil {
		q.hold.poke()
	}
}

// workloads is Config.Workloads' snapshot, nil without one.
func (q *Queue) workloads() *nat.Workloads {
	if f := q.cfg.Workloads; f != nil {
		return f()
	}
	return nil
}

// now is the monotonic time since q.epoch.
func (q *Queue) now() time.Duration { return time.Since(q.epoch) }

// Ready is closed once Run has bound every queue: from then on, packets
// sent to them are answered.
func (q *Queue) Ready() <-chan struct{} { return q.ready }

// Stats returns a snapshot of the counters. It is safe to call at any
// time from any goroutine.
func (q *Queue) Stats() Stats {
	var s Stats
	for i := range q.counters {
		c := &q.counters[i]
		s.Packets += c.packets.Load()
		s.Verdicts += c.verdicts.Load()
		s.Masquerade += c.masquerade.Load()
		s.Passthrough += c.passthrough.Load()
		s.Panics += c.panics.Load()
		s.VerdictErrors += c.verdictErrors.Load()
		for j := range c.undecided {
			s.Undecided[j] += c.undecided[j].Load()
		}
		for j := range c.malformed {
			s.Malformed[j] += c.malformed[j].Load()
		}
	}
	for i := range q.sockets {
		c := &q.sockets[i]
		s.Skipped += c.skipped.Load()
		s.NetlinkENOBUFS += c.enobufs.Load()
		s.NetlinkENOENT += c.enoent.Load()
		s.NetlinkOther += c.other.Load()
	}
	if h := q.hold; h != nil {
		s.Held, s.HeldExpired, s.HeldOverflow = h.heldTotal.Load(), h.expired.Load(), h.overflow.Load()
		s.Holding = h.n.Load()
	}
	return s
}

// inbound is one packet as the receive side hands it over.
type inbound struct {
	// received is when the packet was read, as an offset from the
	// Queue's epoch: time.Since on a monotonic base reads one clock,
	// where time.Now reads two, and on this path clock reads cost more
	// than deciding.
	received time.Duration
	payload  []byte
	id       uint32
	mark     uint32
	hwProto  uint16
	// hasPayload is false when the message had no payload attribute (a
	// zero-length payload attribute is a different thing: not IP).
	hasPayload bool
}

// verdicter sends one verdict: NF_ACCEPT, with mark when setMark.
type verdicter interface {
	verdict(id, mark uint32, setMark bool) error
}

// verdictBatch collects the verdicts of a batch of packets and sends them
// in one write: the kernel processes every netlink message of a write in
// turn, so n verdicts cost one system call instead of n. A run of
// consecutive packets with the same verdict and mark becomes one
// NFQNL_MSG_VERDICT_BATCH message, which applies to every packet of the
// queue up to the run's last id. That is exactly the run: packets are
// received in id order, the batches before were answered before this one
// was read, and the runs before it in this write are processed first.
// (The kernel queues a packet only once its message is on our socket, so
// no unseen packet hides below the id.) One message per run instead of
// per packet spares the kernel a message parse, a queue lookup and a
// lock round per packet.
type verdictBatch struct {
	num   uint16
	buf   []byte
	write func([]byte) error

	// The open run: n packets ending at lastID.
	n       int
	lastID  uint32
	mark    uint32
	setMark bool
}

// With single, the packet gets a verdict message of its own: while a
// packet waits for its identity, a batch message would answer it too.
func (vb *verdictBatch) add(id, mark uint32, setMark, single bool) {
	if single {
		vb.closeRun()
		vb.buf = appendVerdict(vb.buf, vb.num, id, mark, setMark)
		return
	}
	if vb.n > 0 && mark == vb.mark && setMark == vb.setMark {
		vb.n++
		vb.lastID = id
		return
	}
	vb.closeRun()
	vb.n, vb.lastID, vb.mark, vb.setMark = 1, id, mark, setMark
}

// closeRun appends the open run's message.
func (vb *verdictBatch) closeRun() {
	switch {
	case vb.n == 1:
		vb.buf = appendVerdict(vb.buf, vb.num, vb.lastID, vb.mark, vb.setMark)
	case vb.n > 1:
		vb.buf = appendBatchVerdict(vb.buf, vb.num, vb.lastID, vb.mark, vb.setMark)
	}
	vb.n = 0
}

// flush sends the collected verdicts and empties the batch.
func (vb *verdictBatch) flush() error {
	vb.closeRun()
	if len(vb.buf) == 0 {
		return nil
	}
	err := vb.write(vb.buf)
	vb.buf = vb.buf[:0]
	return err
}

// errVerdictPanicked stands for a verdict whose send panicked twice: it
// was not sent.
var errVerdictPanicked = errors.New("sending the verdict panicked")

// handler decides the packets of one queue on one goroutine. Its scratch
// space (decoded packets, Event) is reused, so it must not be shared.
type handler struct {
	q     *Queue
	num   uint16
	send  verdicter
	c     *counters
	ev    Event
	marks mark.Layout
	one   pending
	batch []pending
	// holdOut answers the packets of this queue the holder releases; nil
	// where packets cannot be held.
	holdOut *handler
}

// pending is a packet decided and answered but not yet counted and
// observed.
type pending struct {
	p       packet.Parsed
	d       nat.Decision
	pol     *nat.Policy // the policy that decided; nil before decide asks one
	outcome Outcome
	mark    uint32 // the packet's mark after the verdict
	setMark bool
	held    bool          // handed to the holder: no verdict yet
	heldFor time.Duration // how long it waited for its identity
	unknown bool          // decided without its pod's identity
}

func (q *Queue) newHandler(queueIndex, worker int, send verdicter) *handler {
	return &handler{
		q:     q,
		num:   q.cfg.QueueNums[queueIndex],
		send:  send,
		c:     &q.counters[queueIndex*max(1, q.cfg.Workers)+worker],
		marks: q.cfg.Marks,
	}
}

// newHoldHandler returns the handler that answers a queue's released
// packets, with a verdicter (and counters) of its own: it runs on the
// holder goroutine.
func (q *Queue) newHoldHandler(queueIndex int, send verdicter) *handler {
	return &handler{
		q:     q,
		num:   q.cfg.QueueNums[queueIndex],
		send:  send,
		c:     &q.counters[len(q.cfg.QueueNums)*max(1, q.cfg.Workers)+queueIndex],
		marks: q.cfg.Marks,
	}
}

// handle answers one packet with its own write. Whatever happens, the
// packet gets exactly one verdict: a panic before the verdict is answered
// unmarked (the kernel fallback chain then decides), a panic after it is
// only counted.
func (h *handler) handle(in *inbound) {
	pd := &h.one
	h.prepare(in, pd)
	if pd.held {
		return
	}
	err := h.answer(in, pd)
	h.complete(in, pd, err, h.q.now())
}

// handleBatch answers packets with one write: each is decided and its
// verdict added to vb, the batch is sent, then each is counted and
// observed. The verdicts leave together, after the last decision; a
// decision takes well under a microsecond, a write several.
func (h *handler) handleBatch(ins []inbound, vb *verdictBatch) {
	if cap(h.batch) < len(ins) {
		h.batch = make([]pending, len(ins))
	}
	pend := h.batch[:len(ins)]
	for i := range ins {
		h.prepare(&ins[i], &pend[i])
		if !pend[i].held {
			vb.add(ins[i].id, pend[i].mark, pend[i].setMark, h.q.hold.holding())
		}
	}
	err := vb.flush()
	done := h.q.now()
	for i := range ins {
		if !pend[i].held {
			h.complete(&ins[i], &pend[i], err, done)
		}
	}
}

// prepare decides a packet and works out its verdict. A panic makes the
// verdict an unmarked accept.
func (h *handler) prepare(in *inbound, pd *pending) {
	defer func() {
		if r := recover(); r != nil {
			h.panicked(in, r)
			pd.outcome, pd.mark, pd.setMark = Panicked, in.mark, false
		}
	}()
	h.c.packets.Add(1)
	pd.held, pd.heldFor, pd.unknown, pd.pol, pd.d = false, 0, false, nil, nat.Decision{}
	if pd.outcome = h.decode(in, &pd.p); pd.outcome != Decided {
		pd.mark, pd.setMark = in.mark, false
		return
	}
	pol, wl := h.q.cfg.Policy(), h.q.workloads()
	set, known := wl.Pod(pd.p.Src)
	if !known && pol != nil && wl.Waits(pd.p.Src) {
		if h.holdOut != nil && h.q.hold != nil && h.q.hold.hold(in, pd, h.holdOut) {
			pd.held = true
			return
		}
		pd.unknown = true
	}
	h.finish(in, pd, pol, set)
}

// finish decides a decoded packet with its pod's MasqueradePolicies (set,
// nil for none) and pol, and works out its verdict.
func (h *handler) finish(in *inbound, pd *pending, pol *nat.Policy, set *nat.PolicySet) {
	if pol == nil {
		pd.outcome, pd.mark, pd.setMark = NoPolicy, in.mark, false
		return
	}
	pd.d = set.DecideOr(pol, pd.p.Dst)
	pd.pol = pol
	if pd.d.Action != nat.Masquerade && pd.d.Action != nat.Passthrough {
		pd.outcome, pd.mark, pd.setMark = UnknownAction, in.mark, false
		return
	}
	pd.outcome = Decided
	v := h.marks.Passthrough
	if pd.d.Action == nat.Masquerade {
		v = h.marks.Masquerade
	}
	pd.mark, pd.setMark = h.marks.Apply(in.mark, v), true
}

// answer sends one packet's verdict. If the send panics, the packet is
// answered unmarked instead.
func (h *handler) answer(in *inbound, pd *pending) (err error) {
	defer func() {
		if r := recover(); r != nil {
			h.panicked(in, r)
			pd.outcome, pd.mark, pd.setMark = Panicked, in.mark, false
			err = h.sendUnmarked(in)
		}
	}()
	return h.send.verdict(in.id, pd.mark, pd.setMark)
}

// sendUnmarked is the last resort after a panic: an unmarked accept,
// itself protected, since a packet must not wait forever.
func (h *handler) sendUnmarked(in *inbound) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = errVerdictPanicked
		}
	}()
	return h.send.verdict(in.id, 0, false)
}

// complete counts an answered packet and reports it to the Observer. A
// panic here is only counted: the verdict is already sent.
func (h *handler) complete(in *inbound, pd *pending, err error, done time.Duration) {
	defer func() {
		if r := recover(); r != nil {
			h.panicked(in, r)
		}
	}()
	c := h.c
	if err != nil {
		c.verdictErrors.Add(1)
		h.q.logf("nfqueue verdict failed", "queue", h.num, "id", in.id, "err", err)
	} else {
		c.verdicts.Add(1)
	}
	switch {
	case pd.outcome != Decided:
		c.undecided[pd.outcome].Add(1)
		if pd.outcome == Malformed {
			c.malformed[pd.p.Status].Add(1)
		}
		if pd.outcome == Panicked {
			return
		}
	case pd.d.Action == nat.Masquerade:
		c.masquerade.Add(1)
	default:
		c.passthrough.Add(1)
	}

	if obs := h.q.cfg.Observer; obs != nil {
		ev := &h.ev
		ev.Time = h.q.epoch.Add(in.received)
		ev.Latency = done - in.received
		ev.Queue = h.num
		ev.PacketID = in.id
		ev.Packet = pd.p
		ev.Outcome = pd.outcome
		ev.Decision = pd.d
		ev.Policy = pd.pol
		ev.Mark = pd.mark
		ev.VerdictErr = err
		ev.Held = pd.heldFor
		ev.IdentityUnknown = pd.unknown
		obs.Decided(ev)
	}
}

// decode decodes the packet into p: Decided when it can be decided.
func (h *handler) decode(in *inbound, p *packet.Parsed) Outcome {
	if !in.hasPayload {
		*p = packet.Parsed{Status: packet.NotIP}
		return NoPayload
	}
	switch in.hwProto {
	case 0x0800:
		p.DecodeVersion(in.payload, 4)
	case 0x86dd:
		p.DecodeVersion(in.payload, 6)
	default:
		p.Decode(in.payload)
	}
	if !p.Status.Valid() {
		return Malformed
	}
	return Decided
}

// panicked counts and logs (rate-limited) a recovered panic.
func (h *handler) panicked(in *inbound, r any) {
	h.c.panics.Add(1)
	if h.q.logLimit.allow() {
		h.q.cfg.Logger.Error("panic while handling a queued packet",
			"queue", h.num, "id", in.id, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	}
}

// busyPoll is the adaptive busy-polling window, after KVM's halt polling:
// once the loop runs out of packets it keeps reading, without sleeping,
// for up to window, because waking a sleeping thread costs tens of
// microseconds on a virtual machine (the first-packet latency a sleeping
// agent adds). The window doubles, up to max, after a sleep short enough
// that a longer poll would probably have caught the packet (under twice
// max: part of a sleep is the wake-up itself), and halves after a longer
// one, so sparse traffic soon stops costing poll time. max 0 disables it.
type busyPoll struct {
	max, window time.Duration
}

// DefaultBusyPoll is the agent's --busy-poll default: a window short
// enough to cost nothing measurable while flows are further apart than
// that (the window then shrinks to nothing), and long enough to catch the
// packets of a busy queue without the reader sleeping and being woken for
// each run of them. Measured with bench/live (11 CIDRs, paired runs): new
// flows sustained at 0.82-0.86 of the ipset dataplane against 0.76-0.82
// without polling; agent CPU at 1k, 10k, 50k, 75k and 100k evenly spaced
// new flows/s the same as without polling within noise, about 0.1 core
// more at 150k.
const DefaultBusyPoll = 10 * time.Microsecond

// busyPollStart is the first window after a short sleep.
const busyPollStart = 5 * time.Microsecond

func (p *busyPoll) slept(d time.Duration) {
	switch {
	case p.max <= 0:
	case d < 2*p.max:
		p.window = min(p.max, max(busyPollStart, 2*p.window))
	default:
		if p.window /= 2; p.window < busyPollStart {
			p.window = 0
		}
	}
}

// logf logs at warning level, at most once per second per Queue, so a
// storm of errors costs an atomic load each, not a formatted line.
func (q *Queue) logf(msg string, args ...any) {
	if q.logLimit.allow() {
		q.cfg.Logger.Warn(msg, args...)
	}
}

// rateLimit allows one event per second.
type rateLimit struct{ next atomic.Int64 }

func (r *rateLimit) allow() bool {
	now := time.Now().UnixNano()
	next := r.next.Load()
	return now >= next && r.next.CompareAndSwap(next, now+int64(time.Second))
}

// idGap returns how many ids lie strictly between last and id: packets
// the kernel numbered but never delivered. A fresh queue instance starts
// numbering at 1, so last is 0 before the first packet. Ids wrap at 2^32;
// an id that does not move forward (which the kernel never sends) counts
// nothing rather than four billion.
func idGap(last, id uint32) uint32 {
	gap := id - last - 1
	if gap >= 1<<31 {
		return 0
	}
	return gap
}
