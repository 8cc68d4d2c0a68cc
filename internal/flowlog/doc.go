// Package flowlog writes the per-flow audit trail: one JSON object per line
// for every NAT decision the agent makes ("decision"), every masqueraded
// flow conntrack confirms, with the translated source ("nat"), every flow
// conntrack destroys ("end", or "fallback" when the kernel fallback decided it), and a
// "gap" record whenever records could not be written, so that the trail
// never has a silent hole. The schema is Record; docs/flow-log.md is its
// reference.
//
// # Concurrency and ownership
//
// A Logger is safe for concurrent use. Log is called from the dataplane (the
// NFQUEUE workers and the conntrack listener) and never blocks on the sink:
// it encodes the Record into a bounded buffer, or counts it as dropped when
// the buffer is full, sampled out or over the per-second ceiling. The
// buffer is a byte slice appended to under a mutex; the writer swaps it for
// an empty one once per batch, so a producer pays one short lock and the
// encoding per record, and the writer one lock per batch
// (docs/performance.md says what that saves). Nothing of a Record is
// retained after Log returns.
// A single writer goroutine owned by the Logger writes the encoded records
// to the sink in batches, and writes a gap record as soon as the sink
// accepts writes again after any loss.
//
// The sink is written only by the writer goroutine. A write that fails is
// counted as lost records (ReasonWriteError), never retried and never
// fatal; a write that blocks (a stalled pipe) holds up only the writer,
// while Log keeps returning at once and counts overflow.
//
// AppendJSON, the encoder, is a pure function and allocation-free when dst
// has room.
package flowlog
