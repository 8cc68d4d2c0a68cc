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
// The Listener reads its socket itself (recvmmsg into fixed slots, events
// decoded in place without allocating); the decoder is fuzzed against
// ti-mo/conntrack, which DeleteStale still uses. docs/performance.md has
// the numbers.
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
