// Package queue answers the packets the kernel sends to NFQUEUE: it binds
// one netlink socket per queue number, decodes each packet (queue/packet),
// asks the current nat.Policy about its destination, and answers NF_ACCEPT
// with the decision in the packet mark (only the bits of Config.Marks, a
// mark.Layout, change). iptables saves that mark in the connmark in a
// later hook, so only the first packet of a flow is queued.
//
// Contracts:
//   - Every packet is answered exactly once. A packet that does not decode,
//     a missing policy or a panic before the verdict is answered NF_ACCEPT
//     without a mark, and the kernel fallback decides it; a panic in the
//     Observer, after the verdict, is only counted. Stats counts each case.
//   - Run stops without dropping a packet: it sets the kernel queue's
//     length to 0 (new packets then pass, fail-open), answers until the
//     kernel reports nothing waiting, then closes the socket.
//   - A Queue is safe for concurrent use (Stats, ProcStats, Ready); Run is
//     called once. The Observer runs on the deciding goroutine after the
//     verdict, must not block, and must copy what it keeps; Config.Policy
//     is called for every packet and must be cheap (an atomic load).
//     Packets released after waiting for their pod's identity are
//     observed on the holder's goroutine, so the Observer must also be
//     safe for concurrent use when Config.IdentityWait is set.
//   - With Config.IdentityWait, a packet from an unknown pod address
//     (nat.Workloads.Unknown) gets no verdict until its pod is known or
//     the wait runs out; while any packet waits, verdicts go out one per
//     packet, since a batch verdict would answer the waiting one too.
//
// The receive loop is hand-written for speed (batched recvmmsg, batch
// verdicts, a blocking socket outside the runtime's poller, adaptive busy
// polling); go-nfqueue stays its oracle in tests (FuzzParseMessageOracle,
// BenchmarkKernelNewFlowsLoop). docs/performance.md has the numbers.
package queue
