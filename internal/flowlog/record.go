package flowlog

import (
	"net/netip"
	"time"
)

// SchemaVersion is the value of the "v" field of every record. It changes
// only when a field is renamed, removed or changes meaning; new fields may
// appear without a version change.
const SchemaVersion = 1

// Kind is the kind of a record, its "kind" field.
type Kind uint8

// Record kinds. The numeric values index Stats arrays.
const (
	// KindDecision is written when the agent decides the first packet of a flow.
	KindDecision Kind = iota
	// KindEnd is written when conntrack destroys a flow the agent decided.
	KindEnd
	// KindFallback is written when conntrack destroys a flow that the
	// kernel fallback chain decided (agent down, queue bypassed or full).
	KindFallback
	// KindGap is written by the Logger after records were lost.
	KindGap
	// KindNat is written when conntrack confirms a masqueraded flow: the
	// kernel has chosen its translated source address and port.
	KindNat

	// NumKinds is the number of kinds, the length of Stats arrays.
	NumKinds = iota
)

var kindNames = [NumKinds]string{"decision", "end", "fallback", "gap", "nat"}

// String returns the kind as written in the "kind" field.
func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// Reason says why a record was not written. Every reason except
// ReasonSampled is a loss and is reported in the next gap record.
type Reason uint8

// Reasons for not writing a record.
const (
	// ReasonSampled: left out by --flow-log-sample on purpose. Not a loss:
	// kept decision records carry the rate in their "sample" field.
	ReasonSampled Reason = iota
	// ReasonRateLimit: over the per-second ceiling.
	ReasonRateLimit
	// ReasonOverflow: the buffer between the dataplane and the writer was
	// full, because the sink is slower than the record rate or stalled.
	ReasonOverflow
	// ReasonWriteError: the sink returned an error for the write holding it.
	ReasonWriteError
	// ReasonFileDeleted: written to a log file that was then found deleted
	// (an upper bound: some may have reached the file before the deletion).
	ReasonFileDeleted
	// ReasonKernelOverrun: reported through ReportLost by the conntrack
	// listener when its netlink socket overflowed (ENOBUFS). Each count is
	// one overrun, which lost at least one event.
	ReasonKernelOverrun
	// ReasonClosed: logged after Close, or still buffered when Close gave
	// up waiting for a stalled sink. Cannot appear in a gap record.
	ReasonClosed

	// NumReasons is the number of reasons, the length of Stats arrays.
	NumReasons = iota
)

var reasonNames = [NumReasons]string{"sampled", "ratelimit", "overflow", "write_error", "file_deleted", "kernel_overrun", "closed"}

// String returns the reason as used in gap records and metric labels.
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// Lost reports whether records dropped for r are a hole in the trail.
func (r Reason) Lost() bool { return r != ReasonSampled }

// Record is one line of the flow log. Which fields a kind carries, and when
// a field is left out, is documented in docs/flow-log.md; AppendJSON is the
// only encoder. Zero values mean "unknown" and are left out of the line.
type Record struct {
	Kind Kind
	// Time is when the event happened: the decision, the translation
	// (when the agent read conntrack's new-flow event), or the flow's
	// destruction. Log fills it in when zero.
	Time time.Time
	// Node is the node name; the Logger fills it from Options.Node when empty.
	Node string

	// Proto is the IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6...).
	Proto uint8
	// Src and Dst are the flow's original-direction addresses, as the pod
	// sent them. Ports are written only for protocols that have ports.
	Src, Dst netip.AddrPort
	// Pod is "namespace/name" of the pod owning Src, empty when unknown.
	Pod string

	// Action is "masquerade" or "passthrough".
	Action string
	// Prefix is the policy prefix that decided, invalid when none matched.
	Prefix netip.Prefix
	// Source says where the deciding rule came from: config, default,
	// link-local, egress-policy, cluster, kernel-fallback...
	Source string
	// Origin names the egress policy the rule came from, if any.
	Origin string
	// PolicyHash identifies the policy in force; PolicyGeneration counts
	// reloads. Both are written only when PolicyHash is set.
	PolicyHash       string
	PolicyGeneration uint64

	// Queue is the NFQUEUE number (decision records).
	Queue uint16
	// Latency is from the packet's arrival in userspace to its verdict
	// (decision records).
	Latency time.Duration
	// Held is how long the packet waited for its pod's identity before it
	// was decided (decision records; written when not zero).
	Held time.Duration
	// IdentityUnknown says the packet was decided without its pod's
	// identity: the wait for it ran out, so MasqueradePolicies could not
	// apply and the node policy decided (decision records).
	IdentityUnknown bool
	// Sample is the 1-in-N sampling rate in force when the record was kept;
	// set by the Logger on decision records, written when above 1.
	Sample uint32

	// Accounted says the packet and byte counters below are known
	// (nf_conntrack_acct was on when the flow started).
	Accounted                bool
	PacketsOrig, BytesOrig   uint64
	PacketsReply, BytesReply uint64
	// Start is when conntrack created the flow (nf_conntrack_timestamp);
	// Duration is its lifetime. Both are written only when Start is set.
	Start    time.Time
	Duration time.Duration
	// Xlate is the source the remote side saw for a masqueraded flow: the
	// destination of conntrack's reply tuple. Invalid for other flows.
	Xlate netip.AddrPort
	// ConntrackID is the kernel's conntrack entry ID.
	ConntrackID uint32

	// Gap is set on gap records only.
	Gap *Gap
}

// Gap is the body of a gap record: how many records of each kind were lost
// for each reason between Start and End. Every loss is counted in exactly
// one gap record, so summing gap records gives the total loss.
type Gap struct {
	Start, End time.Time
	Dropped    [NumReasons][NumKinds]uint64
}

// Family returns "ipv4" or "ipv6" for the record's source address, or ""
// when it has none.
func (r *Record) Family() string {
	a := r.Src.Addr()
	switch {
	case !a.IsValid():
		return ""
	case a.Unmap().Is4():
		return "ipv4"
	default:
		return "ipv6"
	}
}
