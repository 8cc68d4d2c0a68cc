package conntrack

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// Defaults for Config fields left zero.
const (
	DefaultBuffer = 8192
	// DefaultReadBuffer is the event socket's receive buffer. Destroy
	// events arrive in bursts (a table flush, a timeout sweep); a small
	// buffer overruns and loses them.
	DefaultReadBuffer = 32 << 20
)

// EventType says what happened to a flow.
type EventType uint8

// Event types.
const (
	// EventNew: conntrack confirmed a new flow (Config.New).
	EventNew EventType = iota + 1
	// EventDestroy: the flow ended (timeout, TCP close, or deletion);
	// counters and the stop time are final.
	EventDestroy
)

// String returns "new" or "destroy".
func (t EventType) String() string {
	switch t {
	case EventNew:
		return "new"
	case EventDestroy:
		return "destroy"
	}
	return "unknown"
}

// Event is a flow the Listener saw created or destroyed.
type Event struct {
	Type EventType
	Flow Flow
}

// Config configures a Listener.
type Config struct {
	// NetNS is an open file descriptor of the network namespace to listen
	// in; 0 means the caller's.
	NetNS int
	// PodCIDRs selects flows by original source address; empty means all.
	PodCIDRs []netip.Prefix
	// New also delivers EventNew; by default only destroyed flows are.
	New bool
	// NewOnly delivers EventNew and nothing else. A socket of its own for
	// new-flow events keeps a burst of them from overrunning the socket
	// that carries destroy events, and tells which kind an overrun lost.
	NewOnly bool
	// Buffer is the capacity of the Events channel (DefaultBuffer).
	Buffer int
	// ReadBuffer is the socket receive buffer in bytes (DefaultReadBuffer);
	// as root it may exceed net.core.rmem_max.
	ReadBuffer int
	// Reliable asks the kernel to hold a destroy event the socket cannot
	// take and deliver it again later, instead of dropping it and
	// reporting an overrun (NETLINK_BROADCAST_ERROR with
	// NETLINK_NO_ENOBUFS, as conntrackd's reliable mode). No destroy event
	// is then lost, but a destroyed entry the listener has not yet read
	// still counts against nf_conntrack_max: a reader that falls far
	// behind could fill the table. Cannot be combined with New or
	// NewOnly, whose losses would then go unreported.
	Reliable bool
	// OnOverrun, if set, is called on the reader goroutine after each
	// socket overrun: the kernel dropped at least one event. It must not
	// block (flowlog.Logger.ReportLost does not).
	OnOverrun func()
	// OnDrop, if set, is called on the reader goroutine with each event
	// the full Events channel could not take. It must not block.
	OnDrop func(Event)
}

// Stats counts what a Listener received and lost.
type Stats struct {
	// Received counts decoded events; Ignored those outside PodCIDRs;
	// Delivered those sent on Events; Dropped those the full channel
	// could not take.
	Received, Ignored, Delivered, Dropped uint64
	// Overruns counts ENOBUFS reports on the socket. Each means the kernel
	// dropped one or more events, and it goes on dropping, without a new
	// report, until the reader has emptied the socket buffer: the number
	// of events lost is unknown. Reliable avoids it for destroy events.
	Overruns uint64
	// DecodeErrors counts messages that did not decode as a conntrack
	// event, and events longer than the reader's receive slot (cut
	// short, so lost).
	DecodeErrors uint64
}

// Listener delivers conntrack events for pod flows. Create it with Listen.
type Listener struct {
	cfg    Config
	events chan Event

	received, ignored, delivered, dropped, overruns, decodeErrors atomic.Uint64

	closing   atomic.Bool
	done      chan struct{}
	err       error // set by the reader before done is closed
	closeOnce sync.Once
	closeErr  error

	sys listenerSys
}

// Events returns the channel of events. It is closed when the Listener
// stops: after Close, or after a fatal socket error (see Err).
func (l *Listener) Events() <-chan Event { return l.events }

// Err returns the error that stopped the reader, once Events is closed;
// nil after a Close.
func (l *Listener) Err() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// Stats returns a snapshot of the counters.
func (l *Listener) Stats() Stats {
	return Stats{
		Received:     l.received.Load(),
		Ignored:      l.ignored.Load(),
		Delivered:    l.delivered.Load(),
		Dropped:      l.dropped.Load(),
		Overruns:     l.overruns.Load(),
		DecodeErrors: l.decodeErrors.Load(),
	}
}

// deliver filters and queues one event on the reader goroutine.
func (l *Listener) deliver(ev Event) {
	l.received.Add(1)
	if !InPrefixes(l.cfg.PodCIDRs, ev.Flow.Orig.Src.Addr()) {
		l.ignored.Add(1)
		return
	}
	select {
	case l.events <- ev:
		l.delivered.Add(1)
	default:
		l.dropped.Add(1)
		if l.cfg.OnDrop != nil {
			l.cfg.OnDrop(ev)
		}
	}
}

func (l *Listener) overrun() {
	l.overruns.Add(1)
	if l.cfg.OnOverrun != nil {
		l.cfg.OnOverrun()
	}
}

// receive decodes and delivers the events of one datagram on the reader
// goroutine. Anything that is not a conntrack entry event is counted as a
// decode error; updates are ignored.
func (l *Listener) receive(dgram []byte) {
	for len(dgram) > 0 {
		msg, rest, ok := nl.NextMessage(dgram)
		if !ok {
			l.decodeErrors.Add(1)
			return
		}
		dgram = rest
		var ev Event
		switch {
		case !decodeEvent(msg, &ev):
			l.decodeErrors.Add(1)
		case ev.Type != 0:
			l.deliver(ev)
		}
	}
}
