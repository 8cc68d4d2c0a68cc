package conntrack

import (
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// Receive sizing. The kernel sends each event as its own datagram, sized
// by ctnetlink_nlmsg_size: about 600 bytes at most with IPv6 tuples, a
// master tuple, labels, sequence adjustment and a helper name, plus the
// SELinux context (CTA_SECCTX) if there is one; the largest seen in
// TestKernelEvents is 316 bytes. A longer datagram is cut short and
// counted as a decode error.
const (
	eventSlots    = 64 // datagrams per recvmmsg
	eventSlotSize = 2048
)

type listenerSys struct {
	conn *netlink.Conn
	rx   *nl.Receiver
}

// Listen subscribes to conntrack events in cfg.NetNS and starts the reader.
//
// It reads the socket itself rather than through ti-mo/conntrack's Listen,
// whose workers stop for good on the first ENOBUFS: here an overrun is
// counted and reading goes on. mdlayher/netlink sets the socket up; the
// reader takes up to eventSlots datagrams per system call into fixed
// buffers and decodes them in place (decodeEvent).
func Listen(cfg Config) (*Listener, error) {
	if cfg.Buffer < 0 || cfg.ReadBuffer < 0 {
		return nil, errors.New("conntrack listener buffers must not be negative")
	}
	if cfg.Reliable && (cfg.New || cfg.NewOnly) {
		return nil, errors.New("conntrack listener: Reliable cannot be combined with New: lost new-flow events would go unreported")
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = DefaultBuffer
	}
	if cfg.ReadBuffer == 0 {
		cfg.ReadBuffer = DefaultReadBuffer
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: cfg.NetNS})
	if err != nil {
		return nil, fmt.Errorf("dial conntrack netlink: %w", err)
	}
	rx, err := setUp(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	l := &Listener{
		cfg:    cfg,
		events: make(chan Event, cfg.Buffer),
		done:   make(chan struct{}),
		sys:    listenerSys{conn: conn, rx: rx},
	}
	go l.run()
	return l, nil
}

// setUp sizes the socket, sets the reliable-mode options, joins the event
// groups and returns the batch reader.
func setUp(conn *netlink.Conn, cfg Config) (*nl.Receiver, error) {
	if err := conn.SetReadBuffer(cfg.ReadBuffer); err != nil {
		return nil, fmt.Errorf("conntrack event socket buffer: %w", err)
	}
	if cfg.Reliable {
		for _, opt := range []netlink.ConnOption{netlink.BroadcastError, netlink.NoENOBUFS} {
			if err := conn.SetOption(opt, true); err != nil {
				return nil, fmt.Errorf("reliable conntrack events: %w", err)
			}
		}
	}
	var groups []netfilter.NetlinkGroup
	if !cfg.NewOnly {
		groups = append(groups, netfilter.GroupCTDestroy)
	}
	if cfg.New || cfg.NewOnly {
		groups = append(groups, netfilter.GroupCTNew)
	}
	for _, g := range groups {
		if err := conn.JoinGroup(uint32(g)); err != nil {
			return nil, fmt.Errorf("join conntrack event group %d: %w", g, err)
		}
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("raw conntrack event socket: %w", err)
	}
	return nl.NewReceiver(rc, eventSlots, eventSlotSize), nil
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
	rx := l.sys.rx
	for {
		n, err := rx.Read(true)
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
		for i := range n {
			if rx.Truncated(i) {
				// The rest of the event is gone; what is left
				// would decode as a wrong flow.
				l.decodeErrors.Add(1)
				continue
			}
			l.receive(rx.Datagram(i))
		}
	}
}
