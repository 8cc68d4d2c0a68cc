// Package who answers attribution questions from the flow log: which pod
// was behind a node address and port at a given time, what a pod talked
// to, who talked to a destination. It reads flow-log lines
// (docs/flow-log.md) in a stream, joins the records of each flow
// (decision, nat, end or fallback) by the flow's 5-tuple, and hands every
// joined flow that matches a Query to a callback.
//
// Memory is bounded: join state is kept only for flows still open in the
// log, at most Options.MaxOpen of them (the oldest is given up first), and
// for ended flows for Window of log time while their decision record may
// still follow. Lines that are not flow-log records are counted, never
// fatal.
package who

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"
)

// Query selects flows. Zero fields select everything.
type Query struct {
	// Translated selects masqueraded flows whose translated source (the
	// node address and port the remote side saw) is this.
	Translated netip.AddrPort
	// At, when set, selects flows alive at that instant, within Tolerance.
	At time.Time
	// Since and Until select flows alive at some point in [Since, Until].
	Since, Until time.Time
	// Tolerance widens every flow's lifetime on both sides, for the
	// granularity of the clock a question's time comes from.
	Tolerance time.Duration
	// Proto is "tcp", "udp", ... as in the flow log; empty for all.
	Proto string
	// Pod is "namespace/name".
	Pod string
	// Dst selects flows to this address; DstPort, when not 0, to this port.
	Dst     netip.Addr
	DstPort uint16
}

// Flow is one flow joined across its records. Field names are the flow
// log's; Records lists the kinds the flow was joined from.
type Flow struct {
	Node             string     `json:"node,omitempty"`
	Family           string     `json:"family"`
	Proto            string     `json:"proto"`
	Src              string     `json:"src"`
	Sport            *uint16    `json:"sport,omitempty"`
	Dst              string     `json:"dst"`
	Dport            *uint16    `json:"dport,omitempty"`
	Pod              string     `json:"pod,omitempty"`
	Action           string     `json:"action,omitempty"`
	XlateSrc         string     `json:"xlate_src,omitempty"`
	XlateSport       *uint16    `json:"xlate_sport,omitempty"`
	Source           string     `json:"source,omitempty"`
	Prefix           string     `json:"prefix,omitempty"`
	Origin           string     `json:"origin,omitempty"`
	PolicyHash       string     `json:"policy_hash,omitempty"`
	PolicyGeneration uint64     `json:"policy_generation,omitempty"`
	Start            time.Time  `json:"start"`
	End              *time.Time `json:"end,omitempty"`
	PacketsOrig      *uint64    `json:"packets_orig,omitempty"`
	BytesOrig        *uint64    `json:"bytes_orig,omitempty"`
	PacketsReply     *uint64    `json:"packets_reply,omitempty"`
	BytesReply       *uint64    `json:"bytes_reply,omitempty"`
	ConntrackID      uint32     `json:"conntrack_id,omitempty"`
	Records          []string   `json:"records"`
	// Open says the log holds no end of the flow: it was still open when
	// the log was read, or its end record was lost (see Stats.Lost).
	Open bool `json:"open,omitempty"`
}

// Defaults for Options fields left zero.
const (
	// DefaultMaxOpen bounds the flows held open: four times the
	// conntrack table of a node with 16 GiB (262,144 entries).
	DefaultMaxOpen = 1 << 20
	// DefaultWindow is how long, in log time, an ended flow waits for a
	// decision record written after its end record: a decision record
	// waits up to --flow-log-pod-wait (2 s) for its pod's name.
	DefaultWindow = 10 * time.Second
	// MaxLine is the longest line read; a longer one is malformed.
	MaxLine = 1 << 20
)

// Options tune a Joiner.
type Options struct {
	MaxOpen int
	Window  time.Duration
}

// Stats counts what a Joiner read.
type Stats struct {
	Lines, Records, Malformed, Skipped uint64
	// FirstMalformed says where the first malformed line was.
	FirstMalformed string
	// Lost sums the gap records' dropped counts; LostFrom and LostTo span
	// their intervals. A non-zero Lost means the answer may be incomplete.
	Lost             uint64
	LostFrom, LostTo time.Time
	// Evicted counts open flows given up to stay within MaxOpen.
	Evicted uint64
	Matched uint64
}

// Joiner joins records into flows. Feed it streams with Read, then call
// Finish.
type Joiner struct {
	q     Query
	opts  Options
	emit  func(*Flow)
	stats Stats

	open   map[key]*state
	closed map[key]*state // ended, held for Window of log time
	order  []*state       // open flows in the order they began (lazily compacted)
	ended  []*state       // closed flows in the order they ended
	mark   time.Time      // the latest record time seen
	latest time.Time      // no flow that began after this matches (zero: any)
	rec    record
}

// NewJoiner returns a Joiner that calls emit with each matching flow. The
// Flow is the callee's.
func NewJoiner(q Query, opts Options, emit func(*Flow)) *Joiner {
	if opts.MaxOpen <= 0 {
		opts.MaxOpen = DefaultMaxOpen
	}
	if opts.Window <= 0 {
		opts.Window = DefaultWindow
	}
	j := &Joiner{q: q, opts: opts, emit: emit, open: map[key]*state{}, closed: map[key]*state{}}
	switch {
	case !q.At.IsZero():
		j.latest = q.At.Add(q.Tolerance)
	case !q.Until.IsZero():
		j.latest = q.Until.Add(q.Tolerance)
	}
	return j
}

// Stats returns the counters so far.
func (j *Joiner) Stats() Stats { return j.stats }

// Read feeds every line of r; name says where they come from in
// Stats.FirstMalformed. A last line without its newline (a file cut by
// rotation, or still being written) is read like the others.
func (j *Joiner) Read(r io.Reader, name string) error {
	br := bufio.NewReaderSize(r, 256<<10)
	n := 0
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// Longer than the buffer: a line no agent writes.
			n++
			j.malformed(name, n, "line longer than 256 KiB")
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
			continue
		}
		if len(line) > 0 {
			n++
			j.line(line, name, n)
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (j *Joiner) malformed(name string, n int, why string) {
	j.stats.Lines++
	j.stats.Malformed++
	if j.stats.FirstMalformed == "" {
		j.stats.FirstMalformed = fmt.Sprintf("%s:%d: %s", name, n, why)
	}
}

func (j *Joiner) line(line []byte, name string, n int) {
	if len(line) > 0 && line[len(line)-1] == '\n' {
		line = line[:len(line)-1]
	}
	if len(line) == 0 {
		j.stats.Lines++
		return
	}
	r := &j.rec
	if err := r.parse(line); err != nil {
		j.malformed(name, n, err.Error())
		return
	}
	j.stats.Lines++
	j.stats.Records++
	switch r.kind {
	case kindOther:
		j.stats.Skipped++
		return
	case kindGap:
		j.gap(r)
		return
	}
	if r.time.After(j.mark) {
		j.mark = r.time
		j.expire()
	}
	j.join(r, line)
}

func (j *Joiner) gap(r *record) {
	if r.gapDropped == 0 {
		return
	}
	j.stats.Lost += r.gapDropped
	if from := r.gapStart; !from.IsZero() && (j.stats.LostFrom.IsZero() || from.Before(j.stats.LostFrom)) {
		j.stats.LostFrom = from
	}
	if to := r.gapEnd; to.After(j.stats.LostTo) {
		j.stats.LostTo = to
	}
}

// Finish emits the flows still held: ended flows that never got their
// decision record, and open flows (Flow.Open).
func (j *Joiner) Finish() {
	for _, s := range j.ended {
		if s.inClosed {
			delete(j.closed, s.key)
			j.done(s)
		}
	}
	j.ended = nil
	for _, s := range j.order {
		if j.open[s.key] == s {
			delete(j.open, s.key)
			j.done(s)
		}
	}
	j.order = nil
}
