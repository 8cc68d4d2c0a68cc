//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
	"golang.org/x/sys/unix"
)

// bulkServer receives bulk transfers in the remote namespace and reports,
// per connection, the bytes read between the first read and EOF.
type bulkServer struct {
	ln      *net.TCPListener
	results chan bulkResult
	wg      sync.WaitGroup
}

type bulkResult struct {
	bytes       int64
	first, last time.Time
}

func startBulkServer(ns *netns.NS, addr netip.AddrPort) (*bulkServer, error) {
	s := &bulkServer{results: make(chan bulkResult, 4)}
	if err := ns.Do(func() (err error) {
		s.ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		return nil, fmt.Errorf("bulk server: %w", err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.AcceptTCP()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				s.results <- drain(c)
			}()
		}
	}()
	return s, nil
}

func drain(c *net.TCPConn) bulkResult {
	var r bulkResult
	buf := make([]byte, 1<<20)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if r.first.IsZero() {
				r.first = time.Now()
			}
			r.bytes += int64(n)
			r.last = time.Now()
		}
		if err != nil {
			return r
		}
	}
}

func (s *bulkServer) Close() {
	s.ln.Close()
	s.wg.Wait()
}

// tcpThroughput makes n bulk transfers of d each; their median counts.
func (b *bench) tcpThroughput(ctx context.Context, n int, d time.Duration) (TCP, error) {
	var t TCP
	for range n {
		bps, err := b.bulkTransfer(ctx, d)
		if err != nil {
			return t, err
		}
		t.Transfers = append(t.Transfers, bps)
	}
	t.BitsPerSecond = median(t.Transfers)
	return t, nil
}

// bulkTransfer sends from the pod to the bulk server for d on one new
// connection and returns the rate the server received at.
func (b *bench) bulkTransfer(ctx context.Context, d time.Duration) (float64, error) {
	var c net.Conn
	if err := b.top.Pod.Do(func() (err error) {
		var dl net.Dialer
		c, err = dl.DialContext(ctx, "tcp", netip.AddrPortFrom(b.opts.dst, bulkPort).String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("bulk connect: %w", err)
	}
	buf := make([]byte, 256<<10)
	end := time.Now().Add(d)
	_ = c.SetWriteDeadline(end.Add(10 * time.Second))
	for time.Now().Before(end) {
		if _, err := c.Write(buf); err != nil {
			c.Close()
			return 0, fmt.Errorf("bulk write: %w", err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	defer c.Close()
	select {
	case r := <-b.bulk.results:
		secs := r.last.Sub(r.first).Seconds()
		if secs <= 0 {
			return 0, errors.New("bulk transfer: nothing received")
		}
		return float64(r.bytes) * 8 / secs, nil
	case <-time.After(30 * time.Second):
		return 0, errors.New("bulk transfer: the server reported nothing within 30s")
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// startAcceptServer accepts and closes connections in the remote.
func startAcceptServer(ns *netns.NS, addr netip.AddrPort) (net.Listener, error) {
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		return nil, fmt.Errorf("connect server: %w", err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln, nil
}

// connectTimes opens n TCP connections from the pod, one after the other,
// each from a new source port (a new flow whose SYN is the first packet),
// and returns each connect time. The connects are plain blocking
// syscalls on one thread in the pod, so the time is the SYN's trip
// through the node and the SYN-ACK's return, plus one system call, with
// no Go scheduler in between. Each socket closes with a reset (linger 0):
// no TIME_WAIT piles up over thousands of connects.
func (b *bench) connectTimes(ctx context.Context, n, warmup int) (times []time.Duration, failures int, err error) {
	dst := b.opts.dst.As4()
	sa := &unix.SockaddrInet4{Port: connectPort, Addr: dst}
	err = b.top.Pod.Do(func() error {
		for i := -warmup; i < n; i++ {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			// connect(2) gives up after SO_SNDTIMEO: a lost SYN costs
			// 2 s and a failure, not the kernel's two minutes of retries.
			_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 2})
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			start := time.Now()
			err = unix.Connect(fd, sa)
			took := time.Since(start)
			unix.Close(fd)
			switch {
			case err != nil:
				if i >= 0 {
					failures++
				}
			case i >= 0:
				times = append(times, took)
			}
		}
		return nil
	})
	if failures > n/10 {
		return times, failures, fmt.Errorf("%d of %d connects failed", failures, n)
	}
	return times, failures, err
}
