package queue

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/nfmasq/nfmasq/nat"
)

// DefaultMaxHeld bounds the packets waiting for their pod's identity. A
// new pod sends a handful of first packets (DNS, a connect) before the
// agent learns its address; a thousand covers a node's burst of starting
// pods and leaves most of the kernel queue (DefaultMaxQueueLen) to the
// packets that are decided at once.
const DefaultMaxHeld = 1024

// holder keeps the packets from pod addresses no known pod has while
// MasqueradePolicies exist: they get no verdict until the pod is known or
// their wait runs out. Packets are held one by one; releasing them is the
// holder goroutine's job.
//
// NFQNL_MSG_VERDICT_BATCH answers every queued packet up to an id, held
// ones included, so while any packet is held (n > 0) the receive loops
// send one verdict per packet. n is raised before the packet leaves the
// receive loop and lowered only after its verdict was sent, so a batch is
// never written while a packet below its last id waits.
type holder struct {
	q    *Queue
	wait time.Duration
	max  int64

	n    atomic.Int64 // held packets: the batching receive loops read it per packet
	wake chan struct{}
	done chan struct{}

	mu      sync.Mutex
	held    []heldPacket // in arrival order, so in deadline order
	closing bool

	heldTotal, expired, overflow atomic.Uint64
}

// heldPacket is a packet waiting for its identity; its payload is not kept
// (the decoded packet is enough to decide it).
type heldPacket struct {
	in  inbound
	pd  pending
	out *handler // the queue's hold handler: answers, counts and observes it
}

func newHolder(q *Queue, wait time.Duration, maxHeld int) *holder {
	return &holder{q: q, wait: wait, max: int64(maxHeld), wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// holding reports whether any packet waits: batch verdicts are off then.
func (h *holder) holding() bool { return h != nil && h.n.Load() > 0 }

// hold takes the packet, which the receive side will not answer, and
// reports true; it reports false, and the packet must be decided at once,
// when the hold is full or stopping.
func (h *holder) hold(in *inbound, pd *pending, out *handler) bool {
	if h.n.Add(1) > h.max {
		h.n.Add(-1)
		h.overflow.Add(1)
		return false
	}
	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		h.n.Add(-1)
		return false
	}
	cp := *in
	cp.payload = nil
	h.held = append(h.held, heldPacket{in: cp, pd: *pd, out: out})
	first := len(h.held) == 1
	h.mu.Unlock()
	h.heldTotal.Add(1)
	if first {
		h.poke()
	}
	return true
}

// poke wakes the holder goroutine: a packet arrived, or identities changed.
func (h *holder) poke() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// run releases held packets as their pods become known or their wait runs
// out, until stop.
func (h *holder) run(stop <-chan struct{}) {
	defer close(h.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-stop:
			return
		case <-h.wake:
		case <-timer.C:
		}
		if next, ok := h.release(false); ok {
			timer.Reset(next)
		} else {
			timer.Stop()
		}
	}
}

// close stops holding and answers every packet still held (after run has
// returned): with the identities known by now, the rest as unknown.
func (h *holder) close() {
	h.mu.Lock()
	h.closing = true
	h.mu.Unlock()
	h.release(true)
}

// release answers the packets whose pod is known now, and those whose wait
// ran out (all of them when final), and returns how long until the next
// deadline, false when nothing is held.
func (h *holder) release(final bool) (time.Duration, bool) {
	now := h.q.now()
	wl := h.workloads()
	h.mu.Lock()
	var out []heldPacket
	kept := h.held[:0]
	for _, hp := range h.held {
		if !wl.Unknown(hp.pd.p.Src) || final || now-hp.in.received >= h.wait {
			out = append(out, hp)
		} else {
			kept = append(kept, hp)
		}
	}
	clear(h.held[len(kept):])
	h.held = kept
	var next time.Duration
	pending := len(kept) > 0
	if pending {
		next = max(0, kept[0].in.received+h.wait-now)
	}
	h.mu.Unlock()

	pol := h.q.cfg.Policy()
	for i := range out {
		hp := &out[i]
		pd := &hp.pd
		pd.heldFor = h.q.now() - hp.in.received
		set, known := wl.Pod(pd.p.Src)
		if !known && wl.Waits(pd.p.Src) {
			pd.unknown = true
			h.expired.Add(1)
		}
		err := hp.out.answerReleased(&hp.in, pd, pol, set)
		h.n.Add(-1) // after the verdict: a batch may cover this id now
		hp.out.complete(&hp.in, pd, err, h.q.now())
	}
	return next, pending
}

func (h *holder) workloads() *nat.Workloads {
	if f := h.q.cfg.Workloads; f != nil {
		return f()
	}
	return nil
}

// answerReleased decides a released packet and sends its verdict. A panic
// while deciding answers it unmarked, as on the receive path.
func (h *handler) answerReleased(in *inbound, pd *pending, pol *nat.Policy, set *nat.PolicySet) error {
	func() {
		defer func() {
			if r := recover(); r != nil {
				h.panicked(in, r)
				pd.outcome, pd.mark, pd.setMark = Panicked, in.mark, false
			}
		}()
		h.finish(in, pd, pol, set)
	}()
	return h.answer(in, pd)
}
