package conntrack

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"
)

type listenerSys struct {
	conn *netfilter.Conn
}

// Listen subscribes to conntrack events in cfg.NetNS and starts the reader.
//
// It reads the socket itself rather than through ti-mo/conntrack's Listen,
// whose workers stop for good on the first ENOBUFS: here an overrun is
// counted and reading goes on.
func Listen(cfg Config) (*Listener, error) {
	if cfg.Buffer < 0 || cfg.ReadBuffer < 0 {
		return nil, errors.New("conntrack listener buffers must not be negative")
	}
	if cfg.Reliable && cfg.New {
		return nil, errors.New("conntrack listener: Reliable cannot be combined with New: lost new-flow events would go unreported")
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = DefaultBuffer
	}
	if cfg.ReadBuffer == 0 {
		cfg.ReadBuffer = DefaultReadBuffer
	}
	conn, err := netfilter.Dial(&netlink.Config{NetNS: cfg.NetNS})
	if err != nil {
		return nil, fmt.Errorf("dial conntrack netlink: %w", err)
	}
	if err := conn.SetReadBuffer(cfg.ReadBuffer); err != nil {
		conn.Close()
		return nil, fmt.Errorf("conntrack event socket buffer: %w", err)
	}
	if cfg.Reliable {
		for _, opt := range []netlink.ConnOption{netlink.BroadcastError, netlink.NoENOBUFS} {
			if err := conn.SetOption(opt, true); err != nil {
				conn.Close()
				return nil, fmt.Errorf("reliable conntrack events: %w", err)
			}
		}
	}
	groups := []netfilter.NetlinkGroup{netfilter.GroupCTDestroy}
	if cfg.New {
		groups = append(groups, netfilter.GroupCTNew)
	}
	if err := conn.JoinGroups(groups); err != nil {
		conn.Close()
		return nil, fmt.Errorf("join conntrack event groups: %w", err)
	}
	l := &Listener{
		cfg:    cfg,
		events: make(chan Event, cfg.Buffer),
		done:   make(chan struct{}),
		sys:    listenerSys{conn: conn},
	}
	go l.run()
	return l, nil
}

// Close stops the reader, closes the socket and waits for Events to close.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		l.closing.Store(true)
		l.closeErr = l.sys.conn.Close()
		<-l.done
	})
	return l.closeErr
}

func (l *Listener) run() {
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

// fromCT copies the fields the flow log needs out of a decoded entry.
func fromCT(f *ct.Flow) Flow {
	out := Flow{
		ID:     f.ID,
		Proto:  f.TupleOrig.Proto.Protocol,
		Orig:   tupleFromCT(f.TupleOrig),
		Reply:  tupleFromCT(f.TupleReply),
		Mark:   f.Mark,
		Zone:   f.Zone,
		Status: uint32(f.Status),
		// With accounting on, every entry has seen its first packet.
		Accounted:     f.CountersOrig.Packets != 0,
		OrigCounters:  Counters{Packets: f.CountersOrig.Packets, Bytes: f.CountersOrig.Bytes},
		ReplyCounters: Counters{Packets: f.CountersReply.Packets, Bytes: f.CountersReply.Bytes},
		Start:         f.Timestamp.Start,
		Stop:          f.Timestamp.Stop,
	}
	if p := f.TupleOrig.Proto; p.ICMPv4 || p.ICMPv6 {
		out.ICMP = ICMP{Type: p.ICMPType, Code: p.ICMPCode, ID: p.ICMPID}
	}
	return out
}

func tupleFromCT(t ct.Tuple) Tuple {
	return Tuple{
		Src: netip.AddrPortFrom(t.IP.SourceAddress.Unmap(), t.Proto.SourcePort),
		Dst: netip.AddrPortFrom(t.IP.DestinationAddress.Unmap(), t.Proto.DestinationPort),
	}
}
