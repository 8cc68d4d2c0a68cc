// Package queue answers the packets the kernel sends to NFQUEUE: it binds
// one netlink socket per queue number (go-nfqueue), decodes each packet
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
// waits for a verdict; then it closes the socket. Packets are therefore
// never dropped by an orderly stop, and the queue rule can stay in place
// (with --queue-bypass) through a restart.
//
// # Mark and verdict
//
// The kernel here lacks CONFIG_NETFILTER_NETLINK_GLUE_CT, so a connmark in
// a verdict is ignored and the conntrack flag cannot even be set: the
// decision travels as the packet mark. The kernel replaces skb->mark with
// the verdict's mark, so the verdict carries the packet's own mark with
// only the bits in Marks.Mask replaced.
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
// # Workers
//
// With Workers 0 (the default) each queue decides inline on its receive
// goroutine. Deciding costs well under a microsecond while receiving and
// sending the netlink messages costs several; handing packets to worker
// goroutines added a channel hand-off and a wake-up per packet and did not
// raise throughput on the 2-core build machine (measurements in
// queue_linux_test.go's benchmarks and the package README of the repo).
// Parallelism comes from several queue numbers (--queue-balance), each
// with its own socket and goroutine.
package queue
