package who

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"time"
)

// state is one flow being joined. It keeps the lines of its records for
// the answer and the few facts a Query tests.
type state struct {
	key                key
	decision, nat, end string // record lines, released once done
	hasDecision        bool
	hasNat, hasEnd     bool
	endKind            kind
	conntrackID        uint32
	began, ended       time.Time
	xlate              netip.AddrPort
	pod                podState
	done, inClosed     bool
}

// key is a flow's 5-tuple as the pod sent it.
type key struct {
	proto    uint8
	src, dst netip.AddrPort
}

type podState uint8

const (
	podUnknown podState = iota
	podMatch
	podOther
)

// protoNum maps the flow log's protocol names back to numbers.
func protoNum(b []byte) (uint8, bool) {
	switch string(b) {
	case "tcp":
		return 6, true
	case "udp":
		return 17, true
	case "icmp":
		return 1, true
	case "icmpv6":
		return 58, true
	case "sctp":
		return 132, true
	case "udplite":
		return 136, true
	case "dccp":
		return 33, true
	}
	var n int
	if len(b) == 0 || len(b) > 3 {
		return 0, false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return uint8(n), n < 256
}

// skip reports whether a record cannot belong to a matching flow: every
// record of a flow carries the same destination and protocol, and, when
// it carries them, the same pod and translation.
func (j *Joiner) skip(r *record) bool {
	q := &j.q
	switch {
	case q.Proto != "" && string(r.proto) != q.Proto:
		return true
	case q.Dst.IsValid() && (r.dst.Addr() != q.Dst || q.DstPort != 0 && r.dst.Port() != q.DstPort):
		return true
	case q.Pod != "" && r.hasPod && !r.podEscaped && string(r.pod) != q.Pod:
		return true
	case q.Translated.IsValid() && r.hasXlate && r.xlate != q.Translated:
		return true
	case q.Translated.IsValid() && r.kind == kindDecision && bytes.Equal(r.action, passthrough):
		return true // kept its source: no translation to match
	}
	// A flow that began after the question's latest time cannot match: a
	// decision is written when the flow begins, a nat record within
	// milliseconds (Window is the slack), an end record says when.
	if latest := j.latest; !latest.IsZero() {
		switch r.kind {
		case kindDecision:
			return r.time.After(latest)
		case kindNat:
			return r.time.After(latest.Add(j.opts.Window))
		case kindEnd, kindFallback:
			return !r.start.IsZero() && r.start.After(latest)
		}
	}
	return false
}

var passthrough = []byte("passthrough")

// join adds a record to its flow.
func (j *Joiner) join(r *record, line []byte) {
	if j.skip(r) {
		return
	}
	p, _ := protoNum(r.proto)
	k := key{proto: p, src: r.src, dst: r.dst}
	s := j.open[k]
	if s == nil {
		// A record of a flow that ended within Window: its decision
		// (written late, after waiting for the pod's name) or its nat
		// record (read from another socket than its end).
		if c := j.closed[k]; c != nil && j.belongs(c, r) {
			if !c.done {
				j.fill(c, r, line)
				if r.kind == kindDecision {
					j.done(c)
				}
			} else if r.kind == kindNat {
				c.hasNat = true
			}
			return
		}
	} else if !j.belongs(s, r) {
		// The same 5-tuple again: the earlier flow's end is not in the
		// log (lost, or in a file not read). Give it up as open.
		delete(j.open, k)
		j.done(s)
		s = nil
	}
	if s == nil {
		s = &state{key: k}
		j.open[k] = s
		j.order = append(j.order, s)
		j.bound()
	}
	j.fill(s, r, line)
	if r.kind == kindEnd || r.kind == kindFallback {
		// Held for Window of log time, for records written after the
		// end: a decision that waited for its pod's name (the flow is
		// answered once it comes), a nat record from the other socket.
		delete(j.open, k)
		if c := j.closed[k]; c != nil {
			c.inClosed = false
			j.done(c)
		}
		s.inClosed = true
		j.closed[k] = s
		j.ended = append(j.ended, s)
		if s.hasDecision || r.kind == kindFallback {
			j.done(s)
		}
	}
}

// belongs reports whether r can be a record of flow s rather than of a
// later flow with the same 5-tuple.
func (j *Joiner) belongs(s *state, r *record) bool {
	if r.conntrackID != 0 && s.conntrackID != 0 && r.conntrackID != s.conntrackID {
		return false
	}
	switch r.kind {
	case kindDecision:
		return !s.hasDecision && (!s.hasEnd || !r.time.After(s.ended))
	case kindNat:
		return !s.hasNat && (!s.hasEnd || !r.time.After(s.ended.Add(j.opts.Window)))
	default:
		return !s.hasEnd
	}
}

// fill records what r tells about s.
func (j *Joiner) fill(s *state, r *record, line []byte) {
	text := string(line)
	switch r.kind {
	case kindDecision:
		s.decision, s.hasDecision = text, true
	case kindNat:
		s.nat, s.hasNat = text, true
	case kindEnd, kindFallback:
		s.end, s.hasEnd, s.endKind, s.ended = text, true, r.kind, r.time
	}
	t := r.time
	if r.kind == kindEnd || r.kind == kindFallback {
		t = r.start
	}
	if !t.IsZero() && (s.began.IsZero() || t.Before(s.began)) {
		s.began = t
	}
	if r.conntrackID != 0 {
		s.conntrackID = r.conntrackID
	}
	if r.hasXlate {
		s.xlate = r.xlate
	}
	if r.hasPod && s.pod == podUnknown {
		s.pod = podOther
		if j.q.Pod != "" && (string(r.pod) == j.q.Pod || r.podEscaped && (field{val: r.pod, str: true, escaped: true}).text() == j.q.Pod) {
			s.pod = podMatch
		}
	}
}

// bound gives up the oldest open flows beyond MaxOpen, and compacts the
// order list once it is mostly flows no longer open.
func (j *Joiner) bound() {
	for len(j.open) > j.opts.MaxOpen && len(j.order) > 0 {
		s := j.order[0]
		j.order[0] = nil
		j.order = j.order[1:]
		if j.open[s.key] == s {
			delete(j.open, s.key)
			j.stats.Evicted++
			j.done(s)
		}
	}
	if len(j.order) > 2*len(j.open)+1024 {
		kept := make([]*state, 0, 2*len(j.open)+1024)
		for _, s := range j.order {
			if j.open[s.key] == s {
				kept = append(kept, s)
			}
		}
		j.order = kept
	}
}

// expire emits the ended flows whose decision record did not come within
// Window of log time.
func (j *Joiner) expire() {
	i := 0
	for ; i < len(j.ended); i++ {
		s := j.ended[i]
		if !s.inClosed {
			continue
		}
		if j.mark.Sub(s.ended) < j.opts.Window {
			break
		}
		if j.closed[s.key] == s {
			delete(j.closed, s.key)
		}
		s.inClosed = false
		j.done(s)
	}
	clear(j.ended[:i])
	j.ended = j.ended[i:]
}

// done tests a flow that will receive no more records against the query,
// and emits it if it matches.
func (j *Joiner) done(s *state) {
	if s.done {
		return
	}
	s.done = true
	if j.matches(s) {
		j.stats.Matched++
		j.emit(s.flow())
	}
	s.decision, s.nat, s.end = "", "", ""
}

func (j *Joiner) matches(s *state) bool {
	q := &j.q
	if q.Translated.IsValid() && s.xlate != q.Translated {
		return false
	}
	if q.Pod != "" && s.pod != podMatch {
		return false
	}
	from, to := s.began.Add(-q.Tolerance), s.ended.Add(q.Tolerance)
	open := !s.hasEnd
	if !q.At.IsZero() && (q.At.Before(from) || !open && q.At.After(to)) {
		return false
	}
	if !q.Until.IsZero() && q.Until.Before(from) {
		return false
	}
	if !q.Since.IsZero() && !open && q.Since.After(to) {
		return false
	}
	return true
}

// flow builds the answer from the flow's record lines: the decision's
// rule and policy, the translation and conntrack id of the nat or end
// record, the end record's counters.
func (s *state) flow() *Flow {
	f := &Flow{Start: s.began, Open: !s.hasEnd}
	for _, rec := range []struct {
		kind string
		line string
	}{{"decision", s.decision}, {"nat", s.nat}, {s.endKind.String(), s.end}} {
		if rec.line == "" {
			continue
		}
		f.Records = append(f.Records, rec.kind)
		var r struct {
			Flow
			Time time.Time `json:"time"`
		}
		if json.Unmarshal([]byte(rec.line), &r) != nil {
			continue // scanned as valid; cannot happen
		}
		merge(f, &r.Flow)
		if rec.kind == s.endKind.String() && rec.line == s.end {
			end := r.Time
			f.End = &end
			f.PacketsOrig, f.BytesOrig, f.PacketsReply, f.BytesReply = r.PacketsOrig, r.BytesOrig, r.PacketsReply, r.BytesReply
		}
	}
	return f
}

// merge copies the fields of one record into the flow, the first record
// that carries a field giving its value (decision first).
func merge(f, r *Flow) {
	set := func(dst *string, v string) {
		if *dst == "" {
			*dst = v
		}
	}
	set(&f.Node, r.Node)
	set(&f.Family, r.Family)
	set(&f.Proto, r.Proto)
	set(&f.Src, r.Src)
	set(&f.Dst, r.Dst)
	set(&f.Pod, r.Pod)
	set(&f.Action, r.Action)
	set(&f.XlateSrc, r.XlateSrc)
	set(&f.Source, r.Source)
	set(&f.Prefix, r.Prefix)
	set(&f.Origin, r.Origin)
	set(&f.PolicyHash, r.PolicyHash)
	if f.Sport == nil {
		f.Sport = r.Sport
	}
	if f.Dport == nil {
		f.Dport = r.Dport
	}
	if f.XlateSport == nil {
		f.XlateSport = r.XlateSport
	}
	if f.PolicyGeneration == 0 {
		f.PolicyGeneration = r.PolicyGeneration
	}
	if f.ConntrackID == 0 {
		f.ConntrackID = r.ConntrackID
	}
}

func (k kind) String() string {
	switch k {
	case kindDecision:
		return "decision"
	case kindNat:
		return "nat"
	case kindEnd:
		return "end"
	case kindFallback:
		return "fallback"
	case kindGap:
		return "gap"
	}
	return ""
}
