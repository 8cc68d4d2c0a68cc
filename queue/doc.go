// Package queue answers the packets the kernel sends to NFQUEUE: it binds
// one netlink socket per queue number, decodes each packet
// (queue/packet), asks the current nat.Policy about its destination, and
// answers NF_ACCEPT with the decision in the packet mark. iptables copies
// that mark into the connmark in a later hook, so only the first packet of
// a flow is queued, and kernel MASQUERADE acts on it.
//
// # Never losing a verdict
//
// A queued packet waits for its verdict forever, so every packet is
// answered exactly once: a packet that does not decode, a missing policy,
// or a panic anywhere before the verdict is answered NF_ACCEPT without a
// mark (the kernel's fallback chain, written from the same policy, then
// decides it). A panic after the verdict (in the Observer) is only
// counted. Stats counts each case.
//
// # Stopping
//
// Run stops in three steps: it sets the kernel queue's length to 0, so
// that, with the fail-open flag, new packets are accepted unmarked
// instead of queued; it keeps answering until the kernel reports
// (/proc/.../nfnetlink_queue, read in the queue's namespace) that nothing
// waits for a verdict; then it closes the socket. An orderly stop
// therefore drops no packet (unless the drain outlasts
// Config.DrainTimeout), and the queue rule can stay in place (with
// --queue-bypass) through a restart.
//
// # Mark and verdict
//
// The kernel here lacks CONFIG_NETFILTER_NETLINK_GLUE_CT, so a connmark in
// a verdict is ignored and the conntrack flag cannot even be set: the
// decision travels as the packet mark. The kernel replaces skb->mark with
// the verdict's mark, so the verdict carries the packet's own mark with
// only the bits in Marks.Mask (a mark.Layout) replaced.
//
// # Concurrency and ownership
//
// A Queue is safe for concurrent use: Stats, ProcStats and Ready may be
// called from any goroutine while Run runs (Run itself is called once).
// Counters are plain atomics kept per deciding goroutine and summed by
// Stats. Each deciding goroutine owns its decoded packet and its Event; the
// Observer is called on that goroutine, must not block, and must copy what
// it keeps. Config.Policy is called for every packet and must be cheap
// (an atomic pointer load).
//
// # Performance
//
// The receive loop is hand-written; go-nfqueue's reads one message per
// system call into fresh memory, parses its attributes into newly
// allocated values, and cannot bind a queue without starting that loop.
// Here a queue is bound with three NFQNL_MSG_CONFIG messages in one write,
// acknowledged through the receive loop itself (so packets that arrive
// while it binds are answered, not mistaken for a reply). The loop reads
// up to 64 datagrams per recvmmsg into fixed slots (internal/nl),
// decodes and decides each without allocating (BenchmarkHandle: about
// 80 ns), and answers the whole batch with one write of concatenated
// verdict messages: the kernel processes every message of a write in
// turn. A run of consecutive packets with the same verdict and mark is
// one NFQNL_MSG_VERDICT_BATCH message (verdictBatch says why that is
// exact). Under load the batches grow and the system calls per packet
// shrink; an idle queue answers each packet on its own.
//
// The socket is a blocking one, outside the Go runtime's poller, read
// with a receive timeout so that a stop is seen. A socket in the poller
// has an epoll entry on its wait queue: every packet the kernel queues
// runs epoll's callback, and wakes the poller's thread if it sleeps,
// inside the sending pod's own sendto. With it, the pod's sender topped
// out at about 250k new flows/s in bench/live whatever the agent did
// (flow log off, two queues, busy polling); with the blocking socket it
// reached 284k-296k.
//
// Measured on the 2-core build machine with BenchmarkKernelNewFlows (new
// UDP flows from a raw sender in the pod, at most 512 unanswered; the
// machine shared, alternating runs): 269k-293k new flows/s at 4.7-5.0
// CPU-µs per flow for the whole path, kernel forwarding included, against
// 110k-112k flows/s and 10.7 CPU-µs with go-nfqueue's loop and one write
// per verdict. BenchmarkKernelFirstPacketRTT: the queue adds 3 µs to an
// unloaded first round trip (11.7 against 8.6 µs with a plain MARK rule),
// where go-nfqueue's loop added 5.5 µs. With every flow to one
// masqueraded destination (mix=masquerade), batch verdicts cut the CPU
// per flow from 5.1-6.7 (median 5.4) to 4.1-4.5 (median 4.25) µs, four
// alternating runs each.
//
// Busy polling (Config.BusyPoll; off by default in the library, the
// agent's --busy-poll defaults to DefaultBusyPoll, 10 µs): a reader that finds the
// socket empty may keep polling for up to that long before it sleeps, as
// KVM's halt polling does, because waking a sleeping thread costs tens of
// microseconds on a VM. The window adapts (busyPoll). While polling the
// reader yields the CPU at every empty poll: a verdict often wakes the
// packet's receiver onto the reader's CPU, and a reader that spun without
// yielding held it off until the window closed (62 instead of 13 µs per
// round trip). bench/live measures what it buys and costs.
//
// Workers: with Workers 0 (the default) each queue decides inline on its
// receive goroutine, in batches. A pool (Workers 1 or more) hands each
// packet, with a copy of its payload, to a worker that answers it with its
// own write: no batching. Parallelism comes from several queue numbers
// (--queue-balance), each with its own socket and goroutine.
package queue
