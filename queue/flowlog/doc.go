// Package flowlog writes the per-flow audit trail: one JSON object per line
// for every NAT decision the agent makes ("decision"), every flow conntrack
// destroys ("end", or "fallback" when the kernel fallback decided it), and a
// "gap" record whenever records could not be written, so that the trail
// never has a silent hole. The schema is Record; docs/flow-log.md is its
// reference.
//
// # Concurrency and ownership
//
// A Logger is safe for concurrent use. Log is called from the dataplane (the
// NFQUEUE workers and the conntrack listener) and never blocks on the sink:
// it copies the Record into a bounded buffer, or counts it as dropped when
// the buffer is full, sampled out or over the per-second ceiling. The
// buffer is a slice appended to under a mutex; the writer swaps it for an
// empty one once per batch, so a producer pays one short lock per record
// and the writer one per batch (a channel cost a send and a receive, each
// contended, per record: BenchmarkLog 100 -> 88 ns with two producers).
// A single writer goroutine owned by the Logger encodes records, writes
// them to the sink in batches, and writes a gap record as soon as the sink accepts
// writes again after any loss. Strings in a Record are retained until the
// record is written; Go strings are immutable, so callers need not copy.
//
// The sink is written only by the writer goroutine. A write that fails is
// counted as lost records (ReasonWriteError), never retried and never
// fatal; a write that blocks (a stalled pipe) holds up only the writer,
// while Log keeps returning at once and counts overflow.
//
// AppendJSON, the encoder, is a pure function and allocation-free when dst
// has room.
package flowlog
