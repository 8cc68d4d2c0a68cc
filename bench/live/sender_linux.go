//go:build linux

package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/nfmasq/nfmasq/internal/sandbox"
	"golang.org/x/sys/unix"
)

// flowSender writes IPv4/UDP packets, each the first of a new flow, from
// the pod to the node as Ethernet frames through a packet socket. Nothing
// in the pod's own stack touches them (no conntrack, no routing), so the
// sender's cost is one sendto per flow and the node sees exactly what is
// written. The node processes each frame in the sender's sendto (veth
// delivers to the per-CPU backlog and the softirq runs on the way out of
// the syscall), so a kernel-only dataplane's cost shows up as sender time.
type flowSender struct {
	fd   int
	sa   unix.SockaddrLinklayer
	pod  netip.Prefix
	dst  netip.Addr
	next uint64 // flow index of the next packet
	buf  [flowPacketSz]byte
}

func newFlowSender(top *sandbox.Topology, dst netip.Addr) (*flowSender, error) {
	s := &flowSender{fd: -1, pod: sandbox.PodCIDR4, dst: dst}
	var gw net.HardwareAddr
	if err := top.Node.Do(func() error {
		ifi, err := net.InterfaceByName("pod0")
		if err == nil {
			gw = ifi.HardwareAddr
		}
		return err
	}); err != nil {
		return nil, fmt.Errorf("node's pod link: %w", err)
	}
	if err := top.Pod.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		s.sa = unix.SockaddrLinklayer{Ifindex: ifi.Index, Protocol: htons(unix.ETH_P_IP), Halen: 6}
		copy(s.sa.Addr[:], gw)
		s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		return nil, fmt.Errorf("packet socket in the pod: %w", err)
	}
	return s, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Close closes the socket.
func (s *flowSender) Close() error { return unix.Close(s.fd) }

// sendResult is what one burst sent.
type sendResult struct {
	sent     uint64
	start    time.Time
	duration time.Duration
	errs     uint64 // sendto failures (ENOBUFS and the like); the flow is not counted as sent
}

// send writes up to n new flows at rate flows/s (0: as fast as sendto
// returns), stopping early after maxDur or when stop becomes true. Pacing
// sends what is due, then sleeps until about half a millisecond's worth is
// due again: no busy wait, so a paced sender leaves the CPU to the
// dataplane.
//
// With even, flows leave one at a time at equal intervals instead: the
// sender spins between flows (busy waiting on its own CPU), because a
// dataplane's cost per flow can depend on the gaps between flows, and
// sleeps only cover gaps of a millisecond or more.
func (s *flowSender) send(rate float64, n uint64, maxDur time.Duration, stop *atomic.Bool, even bool) (sendResult, error) {
	r := sendResult{start: time.Now()}
	batch := uint64(1)
	if rate > 0 && !even {
		batch = max(1, uint64(rate/2000))
	}
	var attempts uint64
	for attempts < n {
		el := time.Since(r.start)
		if el > maxDur || (stop != nil && stop.Load()) {
			break
		}
		// Unpaced, the clock is read every 256 flows.
		due := min(n, attempts+256)
		if rate > 0 {
			due = min(n, uint64(rate*el.Seconds())+1)
		}
		for ; attempts < due; attempts++ {
			putFlowPacket(s.buf[:], s.pod, s.dst, s.next)
			s.next++
			if err := unix.Sendto(s.fd, s.buf[:], 0, &s.sa); err != nil {
				if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EAGAIN) {
					r.errs++ // the flow never left the pod; the trial reports it
					continue
				}
				r.duration = time.Since(r.start)
				return r, fmt.Errorf("sendto: %w", err)
			}
			r.sent++
		}
		if rate > 0 && attempts < n {
			wake := r.start.Add(time.Duration(float64(attempts+batch) / rate * float64(time.Second)))
			if !even || time.Until(wake) > time.Millisecond {
				time.Sleep(time.Until(wake)) // pacing, not synchronisation
			}
			for even && time.Now().Before(wake) {
			}
		}
	}
	r.duration = time.Since(r.start)
	return r, nil
}
