package replay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/nat"
	"github.com/nfmasq/nfmasq/queue/packet"
)

// Replayer decides the flows of captures with a Policy, the way the agent
// decides the flows its queue sees: each record is stripped of its link
// header, decoded with queue/packet, and the first packet of every flow
// (by packet.FlowKey) is decided with (*nat.Policy).Decide. Later packets
// of a flow only count, as they would pass the kernel on the connmark.
//
// Every record is accounted for: Summary's Records equals IPPackets plus
// the sum of Skipped.
type Replayer struct {
	policy *nat.Policy
	pods   []netip.Prefix
	flows  map[packet.FlowKey]struct{}
	p      packet.Parsed
	files  []string

	records   uint64
	ipPackets uint64
	actions   map[nat.Action]uint64
	sources   map[nat.Source]uint64
	skipped   map[Skip]uint64
	elapsed   time.Duration
	readErr   error

	log    *bufio.Writer
	logBuf []byte
	logErr error
}

// ErrFlowLog marks the errors of writing flow records: Replay and Flush
// wrap the writer's error with it, so that a caller can tell a failing
// log from an unreadable capture with errors.Is.
var ErrFlowLog = errors.New("write flow log")

// Options are a Replayer's optional settings.
type Options struct {
	// Log, when not nil, receives a FlowRecord, as one JSON line, for
	// every new flow.
	Log io.Writer
	// PodCIDRs, when not empty, restrict decisions to packets from these
	// ranges, as the agent's queue rule does (--pod-cidr); other IP
	// packets are skipped as "not_from_pod". Empty means every packet is
	// a pod's.
	PodCIDRs []netip.Prefix
}

// New returns a Replayer deciding with policy.
func New(policy *nat.Policy, opts Options) *Replayer {
	r := &Replayer{
		policy:  policy,
		flows:   make(map[packet.FlowKey]struct{}),
		actions: make(map[nat.Action]uint64),
		sources: make(map[nat.Source]uint64),
		skipped: make(map[Skip]uint64),
	}
	for _, p := range opts.PodCIDRs {
		r.pods = append(r.pods, p.Masked())
	}
	if opts.Log != nil {
		r.log = bufio.NewWriterSize(opts.Log, 64<<10)
		r.logBuf = make([]byte, 0, 256)
	}
	return r
}

// fromPod reports whether src is in a pod CIDR, or there are none to
// check.
func (r *Replayer) fromPod(src netip.Addr) bool {
	if len(r.pods) == 0 {
		return true
	}
	for _, p := range r.pods {
		if p.Contains(src) {
			return true
		}
	}
	return false
}

// Record replays one capture record of link type lt. It does not retain
// frame, and it does not allocate unless the record starts a new flow or
// is the first one skipped for its reason.
func (r *Replayer) Record(lt layers.LinkType, frame []byte) {
	r.records++
	ip, version, skip := IPPacket(lt, frame)
	if skip.Kind != NotSkipped {
		r.skipped[skip]++
		return
	}
	if version == 0 {
		r.p.Decode(ip)
	} else {
		r.p.DecodeVersion(ip, version)
	}
	if !r.p.Status.Valid() {
		r.skipped[Skip{Kind: SkipDecode, Code: uint32(r.p.Status)}]++
		return
	}
	if !r.fromPod(r.p.Src) {
		r.skipped[Skip{Kind: SkipNotFromPod}]++
		return
	}
	r.ipPackets++
	key := r.p.FlowKey()
	if _, seen := r.flows[key]; seen {
		return
	}
	r.flows[key] = struct{}{}
	d := r.policy.Decide(key.Dst)
	r.actions[d.Action]++
	r.sources[d.Source]++
	if r.log != nil && r.logErr == nil {
		r.logBuf = appendFlowRecord(r.logBuf[:0], r.records, key, d)
		_, r.logErr = r.log.Write(r.logBuf)
	}
}

// Replay reads every record of the capture in c and replays it. A capture
// whose file header cannot be read is an error. A capture that ends inside
// a record, or whose records stop making sense, is not: the record is
// counted as skipped (truncated_record or bad_record), reading stops, and
// Summary reports the reason in ReadError. Replay also fails when the flow
// log cannot be written.
//
// Replay may be called for several captures in turn; counts and flows
// accumulate.
func (r *Replayer) Replay(c io.Reader) error {
	start := time.Now()
	defer func() { r.elapsed += time.Since(start) }()
	rd, err := NewReader(c)
	if err != nil {
		return err
	}
	for {
		lt, data, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			r.records++
			kind := SkipBadRecord
			if errors.Is(err, ErrTruncated) {
				kind = SkipTruncatedRecord
			}
			r.skipped[Skip{Kind: kind}]++
			r.readErr = err
			break
		}
		r.Record(lt, data)
		if r.logErr != nil {
			break
		}
	}
	return r.Flush()
}

// ReplayFile is Replay on the file at path; errors name the file, and the
// Summary lists it.
func (r *Replayer) ReplayFile(path string) error {
	r.files = append(r.files, path)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := r.Replay(f); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// Flush writes buffered flow records to the log. Replay flushes before it
// returns; callers of Record flush themselves.
func (r *Replayer) Flush() error {
	if r.log != nil && r.logErr == nil {
		r.logErr = r.log.Flush()
	}
	if r.logErr != nil {
		return fmt.Errorf("%w: %w", ErrFlowLog, r.logErr)
	}
	return nil
}

// Summary is the account of a replay, printed by `nfmasq replay` as one
// JSON object.
type Summary struct {
	// Files are the captures replayed by ReplayFile, in order.
	Files []string `json:"files,omitempty"`
	// PolicyHash is (*nat.Policy).Hash of the policy that decided.
	PolicyHash string `json:"policy_hash"`
	// Records is every record read, including the one a read error
	// stopped at.
	Records uint64 `json:"records"`
	// IPPackets is the records whose IP packet decoded well enough to be
	// decided (packet.Status.Valid), and came from a pod when PodCIDRs
	// were given.
	IPPackets uint64 `json:"ip_packets"`
	// Flows is the number of distinct flow keys, each decided once.
	Flows uint64 `json:"flows"`
	// Decisions counts flows by action; both actions are always present.
	Decisions map[string]uint64 `json:"decisions"`
	// Sources counts flows by the nat.Source that decided them; only
	// sources that decided a flow are present.
	Sources map[string]uint64 `json:"sources"`
	// Skipped counts the records that were not IP packets, by reason (see
	// Skip.String); empty when there were none.
	Skipped map[string]uint64 `json:"skipped"`
	// ReadError is why reading stopped before the end of a capture, if it
	// did.
	ReadError string `json:"read_error,omitempty"`
	// Elapsed is the time spent in Replay, including reading the capture.
	Elapsed Duration `json:"elapsed"`
	// RecordsPerSecond is Records divided by Elapsed.
	RecordsPerSecond float64 `json:"records_per_second"`
}

// Duration is a time.Duration that encodes as its String in JSON.
type Duration time.Duration

// MarshalText encodes d as time.Duration's String ("1.5ms").
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText decodes what MarshalText wrote.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Skipped returns the number of records skipped so far with skip.
func (r *Replayer) Skipped(skip Skip) uint64 { return r.skipped[skip] }

// Summary returns the account of everything replayed so far.
func (r *Replayer) Summary() Summary {
	s := Summary{
		Files:      slices.Clone(r.files),
		PolicyHash: r.policy.Hash(),
		Records:    r.records,
		IPPackets:  r.ipPackets,
		Flows:      uint64(len(r.flows)),
		Decisions: map[string]uint64{
			nat.Masquerade.String():  0,
			nat.Passthrough.String(): 0,
		},
		Sources: map[string]uint64{},
		Skipped: map[string]uint64{},
		Elapsed: Duration(r.elapsed),
	}
	for a, n := range r.actions {
		s.Decisions[a.String()] += n
	}
	for src, n := range r.sources {
		s.Sources[src.String()] += n
	}
	for skip, n := range r.skipped {
		s.Skipped[skip.String()] += n
	}
	if r.readErr != nil {
		s.ReadError = r.readErr.Error()
	}
	if r.elapsed > 0 {
		s.RecordsPerSecond = float64(r.records) / r.elapsed.Seconds()
	}
	return s
}

// FlowRecord is one line of the flow log: the decision for a new flow.
// The Replayer writes it without encoding/json; the field order and names
// here are the ones it writes.
type FlowRecord struct {
	// Packet is the 1-based index, among the records read, of the flow's
	// first packet.
	Packet  uint64     `json:"packet"`
	Proto   string     `json:"proto"`
	Src     netip.Addr `json:"src"`
	SrcPort uint16     `json:"src_port"`
	Dst     netip.Addr `json:"dst"`
	DstPort uint16     `json:"dst_port"`
	Action  nat.Action `json:"action"`
	Prefix  string     `json:"prefix"`
	Source  nat.Source `json:"source"`
	Origin  string     `json:"origin,omitempty"`
}

// appendFlowRecord appends the JSON line of FlowRecord for key and d.
// With room in dst it does not allocate.
func appendFlowRecord(dst []byte, index uint64, key packet.FlowKey, d nat.Decision) []byte {
	dst = append(dst, `{"packet":`...)
	dst = strconv.AppendUint(dst, index, 10)
	dst = append(dst, `,"proto":"`...)
	dst = appendProto(dst, key.Proto)
	dst = append(dst, `","src":"`...)
	dst = key.Src.AppendTo(dst)
	dst = append(dst, `","src_port":`...)
	dst = strconv.AppendUint(dst, uint64(key.SrcPort), 10)
	dst = append(dst, `,"dst":"`...)
	dst = key.Dst.AppendTo(dst)
	dst = append(dst, `","dst_port":`...)
	dst = strconv.AppendUint(dst, uint64(key.DstPort), 10)
	dst = append(dst, `,"action":"`...)
	dst = append(dst, d.Action.String()...)
	dst = append(dst, `","prefix":"`...)
	if d.Prefix.IsValid() {
		dst = d.Prefix.AppendTo(dst)
	}
	dst = append(dst, `","source":"`...)
	dst = append(dst, d.Source.String()...)
	dst = append(dst, '"')
	if d.Origin != "" {
		dst = append(dst, `,"origin":`...)
		dst = appendJSONString(dst, d.Origin)
	}
	return append(dst, "}\n"...)
}

// appendProto is IPProto.String without its allocation for numbers.
func appendProto(dst []byte, p packet.IPProto) []byte {
	switch p {
	case packet.ICMPv4, packet.TCP, packet.UDP, packet.DCCP, packet.ESP, packet.ICMPv6, packet.SCTP, packet.UDPLite:
		return append(dst, p.String()...)
	}
	return strconv.AppendUint(dst, uint64(p), 10)
}

// appendJSONString appends s as a JSON string, escaped as encoding/json
// escapes it (HTML characters included), so that a name from a cluster
// object cannot break or forge a record.
func appendJSONString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				dst = append(dst, '\\', c)
			case c == '\n':
				dst = append(dst, '\\', 'n')
			case c == '\r':
				dst = append(dst, '\\', 'r')
			case c == '\t':
				dst = append(dst, '\\', 't')
			case c < 0x20 || c == '<' || c == '>' || c == '&':
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				dst = append(dst, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			dst = append(dst, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return append(dst, '"')
}
