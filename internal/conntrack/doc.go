// Package conntrack reads the kernel's connection tracking table for the
// flow log and for policy reloads: a Listener delivers flows from the pod
// CIDRs as conntrack destroys them (and, optionally, as it creates them),
// DeleteStale removes entries whose NAT decision changed so that their next
// packet is decided again, and EnableAccounting turns on the per-flow
// counters and timestamps the flow log reports.
//
// Flow is this package's own copy of a conntrack entry, in the terms the
// flow log needs (netip addresses, counters, start time, connmark); it does
// not expose github.com/ti-mo/conntrack types. mark.Layout.Classify reads
// who decided a flow from its connmark, and Flow.Masqueraded reads from the
// tuples whether the source was actually replaced.
//
// # Reading events
//
// The Listener joins the conntrack destroy group (and the new group with
// Config.New) on a NETLINK_NETFILTER socket that mdlayher/netlink opens
// and configures, then reads it itself: up to 64 datagrams per recvmmsg
// into fixed 2 KiB slots (the largest event seen is 316 bytes: an IPv6
// TCP flow with counters, timestamps and TCP state), and decodes each
// ctnetlink message in place into an Event, allocating nothing. Every
// flow ends in one destroy event, so this reader runs at the rate flows
// end; reading through mdlayher's Receive and ti-mo/conntrack's decoder
// cost as much CPU as the whole NFQUEUE decision path, plus garbage
// collection of its 41 to 47 allocations per event. Measured on a 2-core
// VM (medians of alternating runs): decoding a masqueraded flow's destroy
// event takes 107 ns instead of 1,300 ns over IPv4 UDP, 111 instead of
// 1,560 over IPv6 TCP, with no allocation (BenchmarkDecode); reading a
// flush of 20,000 entries costs the process 1.4 µs of CPU per event
// instead of 6.4 µs (BenchmarkKernelDestroy), about what reading the
// datagrams alone costs. The decoder is fuzzed against ti-mo/conntrack,
// which stays the reference in tests and is still used by DeleteStale.
//
// # Concurrency and ownership
//
// A Listener owns one netlink socket and one reader goroutine. The reader
// never blocks on the consumer: events go into a bounded channel and are
// counted as dropped when it is full, and a socket overrun (ENOBUFS: the
// kernel dropped events because the reader fell behind) is counted and
// reported through Config.OnOverrun. Listener methods are safe for
// concurrent use. Flow values are plain data, owned by whoever holds them.
//
// DeleteStale and EnableAccounting open their own netlink socket or file
// for the duration of the call and are safe for concurrent use.
//
// All three take a network namespace as an open file descriptor (0 means
// the caller's namespace). Kernel access lives in _linux.go files; other
// systems get stubs that return ErrUnsupported.
package conntrack
