package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
)

// Seen is one flow as the remote host saw it: which of its addresses was
// contacted, and the source the packet carried on arrival.
type Seen struct {
	Proto string         // "udp" or "tcp"
	Dst   netip.AddrPort // the remote's own address and port
	Src   netip.AddrPort // the source as received: pod or node address
	Bytes int64          // payload bytes received on the flow
}

// Sink is a set of UDP and TCP listeners in one namespace that records the
// source of everything it receives and answers each datagram or connection
// (so conntrack sees replies).
type Sink struct {
	mu      sync.Mutex
	seen    []Seen
	notify  chan struct{}
	closers []io.Closer
	wg      sync.WaitGroup
}

// StartSink listens on port for UDP and TCP on each address, inside ns.
func StartSink(ns *netns.NS, addrs []netip.Addr, port uint16) (*Sink, error) {
	s := &Sink{notify: make(chan struct{}, 1)}
	err := ns.Do(func() error {
		for _, a := range addrs {
			ap := netip.AddrPortFrom(a, port)
			uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, uc)
			tl, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, tl)
			s.wg.Add(2)
			go s.serveUDP(uc, ap)
			go s.serveTCP(tl, ap)
		}
		return nil
	})
	if err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Sink) record(v Seen) {
	s.mu.Lock()
	s.seen = append(s.seen, v)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *Sink) serveUDP(c *net.UDPConn, local netip.AddrPort) {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		s.record(Seen{Proto: "udp", Dst: local, Src: unmap(from), Bytes: int64(n)})
		_, _ = c.WriteToUDPAddrPort(buf[:n], from)
	}
}

func (s *Sink) serveTCP(l *net.TCPListener, local netip.AddrPort) {
	defer s.wg.Done()
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			from := unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())
			n, _ := io.Copy(io.Discard, c)
			s.record(Seen{Proto: "tcp", Dst: local, Src: from, Bytes: n})
			_, _ = c.Write([]byte("ok"))
		}()
	}
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Seen returns a copy of everything recorded so far.
func (s *Sink) Seen() []Seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Seen(nil), s.seen...)
}

// WaitFor waits until match returns true for the recorded list, or the
// deadline passes. It returns the list at that moment.
func (s *Sink) WaitFor(ctx context.Context, match func([]Seen) bool) ([]Seen, error) {
	for {
		seen := s.Seen()
		if match(seen) {
			return seen, nil
		}
		select {
		case <-s.notify:
		case <-ctx.Done():
			return seen, fmt.Errorf("waiting for the remote to record flows: %w", ctx.Err())
		}
	}
}

// Close stops every listener and waits for the handlers.
func (s *Sink) Close() {
	for _, c := range s.closers {
		_ = c.Close()
	}
	s.wg.Wait()
}

// SendUDP sends payload from inside ns to dst from a fresh socket (a new
// flow each call) and waits up to timeout for the echo. It returns the
// local address used, and whether the echo arrived.
func SendUDP(ns *netns.NS, dst netip.AddrPort, payload []byte, timeout time.Duration) (netip.AddrPort, bool, error) {
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		return netip.AddrPort{}, false, err
	}
	defer c.Close()
	local := unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
	if _, err := c.Write(payload); err != nil {
		return local, false, err
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, len(payload)+16)
	if _, err := c.Read(buf); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return local, false, nil
		}
		return local, false, err
	}
	return local, true, nil
}

// SendTCP connects from inside ns to dst, writes payload, half-closes and
// waits for the reply. It returns the local address and connect time.
func SendTCP(ns *netns.NS, dst netip.AddrPort, payload []byte, timeout time.Duration) (netip.AddrPort, time.Duration, error) {
	var c *net.TCPConn
	var took time.Duration
	if err := ns.Do(func() error {
		d := net.Dialer{Timeout: timeout}
		start := time.Now()
		conn, err := d.Dial("tcp", dst.String())
		took = time.Since(start)
		if err != nil {
			return err
		}
		c = conn.(*net.TCPConn)
		return nil
	}); err != nil {
		return netip.AddrPort{}, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	local := unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
	if _, err := c.Write(payload); err != nil {
		return local, took, err
	}
	_ = c.CloseWrite()
	if _, err := io.ReadAll(c); err != nil {
		return local, took, err
	}
	return local, took, nil
}
