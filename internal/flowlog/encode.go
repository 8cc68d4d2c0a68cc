package flowlog

import (
	"net/netip"
	"strconv"
	"time"
	"unicode/utf8"
)

// AppendJSON appends r as one JSON object followed by a newline. It never
// fails: every string is escaped exactly as encoding/json escapes it (so a
// pod name or an egress policy name can neither end the object nor start a
// new line), and invalid UTF-8 becomes U+FFFD. It does not allocate when
// dst has room; that, not speed alone, is why it is written by hand (see
// BenchmarkAppendJSON).
func AppendJSON(dst []byte, r *Record) []byte {
	var e encoder
	return e.appendJSON(dst, r)
}

// encoder is AppendJSON with a memory: the date and time to the second of
// the last two timestamps it wrote (an end record has two), which the
// next records of a busy logger share: time.Time.AppendFormat was a third
// of the encoding.
type encoder struct {
	stamps [2]stamp
	next   int // the slot the next new second replaces
}

type stamp struct {
	sec  int64
	text [len("2006-01-02T15:04:05")]byte
	ok   bool
}

func (e *encoder) appendJSON(dst []byte, r *Record) []byte {
	dst = append(dst, `{"v":`...)
	dst = strconv.AppendInt(dst, SchemaVersion, 10)
	dst = appendKey(dst, "kind")
	dst = appendString(dst, r.Kind.String())
	dst = appendKey(dst, "time")
	dst = e.appendTime(dst, r.Time)
	if r.Node != "" {
		dst = appendKey(dst, "node")
		dst = appendString(dst, r.Node)
	}
	if r.Kind == KindGap {
		return e.appendGap(dst, r.Gap)
	}

	if f := r.Family(); f != "" {
		dst = appendKey(dst, "family")
		dst = appendString(dst, f)
	}
	dst = appendKey(dst, "proto")
	dst = appendProto(dst, r.Proto)
	ports := hasPorts(r.Proto)
	dst = appendEndpoint(dst, "src", "sport", r.Src, ports)
	dst = appendEndpoint(dst, "dst", "dport", r.Dst, ports)
	if r.Pod != "" {
		dst = appendKey(dst, "pod")
		dst = appendString(dst, r.Pod)
	}
	if r.Action != "" {
		dst = appendKey(dst, "action")
		dst = appendString(dst, r.Action)
	}
	if r.Prefix.IsValid() {
		dst = appendKey(dst, "prefix")
		dst = append(dst, '"')
		dst = r.Prefix.AppendTo(dst)
		dst = append(dst, '"')
	}
	if r.Source != "" {
		dst = appendKey(dst, "source")
		dst = appendString(dst, r.Source)
	}
	if r.Origin != "" {
		dst = appendKey(dst, "origin")
		dst = appendString(dst, r.Origin)
	}
	if r.PolicyHash != "" {
		dst = appendKey(dst, "policy_hash")
		dst = appendString(dst, r.PolicyHash)
		dst = appendKey(dst, "policy_generation")
		dst = strconv.AppendUint(dst, r.PolicyGeneration, 10)
	}

	if r.Kind == KindDecision {
		dst = appendKey(dst, "queue")
		dst = strconv.AppendUint(dst, uint64(r.Queue), 10)
		dst = appendKey(dst, "latency_us")
		dst = appendMilli(dst, r.Latency.Nanoseconds())
		if r.Held > 0 {
			dst = appendKey(dst, "held_us")
			dst = appendMilli(dst, r.Held.Nanoseconds())
		}
		if r.IdentityUnknown {
			dst = appendKey(dst, "identity")
			dst = appendString(dst, "unknown")
		}
		if r.Sample > 1 {
			dst = appendKey(dst, "sample")
			dst = strconv.AppendUint(dst, uint64(r.Sample), 10)
		}
		return append(dst, '}', '\n')
	}

	if r.Accounted {
		dst = appendKey(dst, "packets_orig")
		dst = strconv.AppendUint(dst, r.PacketsOrig, 10)
		dst = appendKey(dst, "bytes_orig")
		dst = strconv.AppendUint(dst, r.BytesOrig, 10)
		dst = appendKey(dst, "packets_reply")
		dst = strconv.AppendUint(dst, r.PacketsReply, 10)
		dst = appendKey(dst, "bytes_reply")
		dst = strconv.AppendUint(dst, r.BytesReply, 10)
	}
	if !r.Start.IsZero() {
		dst = appendKey(dst, "start")
		dst = e.appendTime(dst, r.Start)
		dst = appendKey(dst, "duration_ms")
		dst = appendMilli(dst, r.Duration.Microseconds())
	}
	if r.Xlate.IsValid() {
		dst = appendEndpoint(dst, "xlate_src", "xlate_sport", r.Xlate, ports)
	}
	if r.ConntrackID != 0 {
		dst = appendKey(dst, "conntrack_id")
		dst = strconv.AppendUint(dst, uint64(r.ConntrackID), 10)
	}
	return append(dst, '}', '\n')
}

// appendGap writes the gap body: the interval, then only the non-zero
// counts, grouped by reason then kind.
func (e *encoder) appendGap(dst []byte, g *Gap) []byte {
	if g == nil {
		g = &Gap{}
	}
	dst = appendKey(dst, "start")
	dst = e.appendTime(dst, g.Start)
	dst = appendKey(dst, "end")
	dst = e.appendTime(dst, g.End)
	dst = appendKey(dst, "dropped")
	dst = append(dst, '{')
	firstReason := true
	for reason := range Reason(NumReasons) {
		firstKind := true
		for kind := range Kind(NumKinds) {
			n := g.Dropped[reason][kind]
			if n == 0 {
				continue
			}
			if firstKind {
				if !firstReason {
					dst = append(dst, ',')
				}
				firstReason = false
				dst = appendString(dst, reason.String())
				dst = append(dst, ':', '{')
			} else {
				dst = append(dst, ',')
			}
			firstKind = false
			dst = appendString(dst, kind.String())
			dst = append(dst, ':')
			dst = strconv.AppendUint(dst, n, 10)
		}
		if !firstKind {
			dst = append(dst, '}')
		}
	}
	return append(dst, '}', '}', '\n')
}

func appendKey(dst []byte, key string) []byte {
	dst = append(dst, ',', '"')
	dst = append(dst, key...)
	return append(dst, '"', ':')
}

// appendTime writes RFC 3339 with nanoseconds in UTC, as encoding/json
// writes a time.Time (time.RFC3339Nano: trailing zeros of the fraction
// dropped), or null for the zero time.
func (e *encoder) appendTime(dst []byte, t time.Time) []byte {
	if t.IsZero() {
		return append(dst, "null"...)
	}
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		dst = append(dst, '"')
		dst = t.AppendFormat(dst, time.RFC3339Nano)
		return append(dst, '"')
	}
	sec := t.Unix()
	st := &e.stamps[0]
	if !st.ok || st.sec != sec {
		st = &e.stamps[1]
		if !st.ok || st.sec != sec {
			st = &e.stamps[e.next]
			e.next ^= 1
			t.AppendFormat(st.text[:0], "2006-01-02T15:04:05")
			st.sec, st.ok = sec, true
		}
	}
	dst = append(dst, '"')
	dst = append(dst, st.text[:]...)
	if ns := t.Nanosecond(); ns != 0 {
		var frac [10]byte
		frac[0] = '.'
		for i := 9; i > 0; i-- {
			frac[i] = byte('0' + ns%10)
			ns /= 10
		}
		n := 10
		for frac[n-1] == '0' {
			n--
		}
		dst = append(dst, frac[:n]...)
	}
	return append(dst, 'Z', '"')
}

// appendMilli writes v/1000 as a JSON number with at most three decimals
// and no trailing zeros: the shortest form, which is also what
// encoding/json writes for the float64 value.
func appendMilli(dst []byte, v int64) []byte {
	if v < 0 {
		dst = append(dst, '-')
		v = -v
	}
	dst = strconv.AppendInt(dst, v/1000, 10)
	frac := v % 1000
	if frac == 0 {
		return dst
	}
	digits := [3]byte{byte('0' + frac/100), byte('0' + frac/10%10), byte('0' + frac%10)}
	n := 3
	for digits[n-1] == '0' {
		n--
	}
	dst = append(dst, '.')
	return append(dst, digits[:n]...)
}

func appendEndpoint(dst []byte, addrKey, portKey string, ap netip.AddrPort, ports bool) []byte {
	dst = appendKey(dst, addrKey)
	if !ap.Addr().IsValid() {
		return append(dst, "null"...)
	}
	dst = append(dst, '"')
	dst = ap.Addr().Unmap().AppendTo(dst)
	dst = append(dst, '"')
	if ports {
		dst = appendKey(dst, portKey)
		dst = strconv.AppendUint(dst, uint64(ap.Port()), 10)
	}
	return dst
}

var protoNames = [256]string{1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "icmpv6", 132: "sctp", 136: "udplite"}

// ProtoName returns the name written in the "proto" field: a lower-case
// name for well-known protocols, the decimal number otherwise.
func ProtoName(p uint8) string {
	if n := protoNames[p]; n != "" {
		return n
	}
	return strconv.Itoa(int(p))
}

func appendProto(dst []byte, p uint8) []byte {
	dst = append(dst, '"')
	if n := protoNames[p]; n != "" {
		dst = append(dst, n...)
	} else {
		dst = strconv.AppendUint(dst, uint64(p), 10)
	}
	return append(dst, '"')
}

// hasPorts reports whether the protocol's header starts with 16-bit source
// and destination ports, so that the ports in a flow key mean something.
func hasPorts(p uint8) bool {
	switch p {
	case 6, 17, 33, 132, 136:
		return true
	}
	return false
}

const hexDigits = "0123456789abcdef"

// safe[b] is true for ASCII bytes written as themselves inside a JSON
// string: the set encoding/json leaves alone with HTML escaping on.
var safe = func() (t [utf8.RuneSelf]bool) {
	for b := 0x20; b < utf8.RuneSelf; b++ {
		t[b] = b != '"' && b != '\\' && b != '<' && b != '>' && b != '&'
	}
	return t
}()

// appendString writes s as a JSON string, byte for byte as encoding/json
// (with its default HTML escaping) writes it. Control characters, quotes
// and backslashes are escaped; so are U+2028 and U+2029, which some
// JavaScript-based log viewers treat as line ends.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		if b := s[i]; b < utf8.RuneSelf {
			if safe[b] {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch b {
			case '\\', '"':
				dst = append(dst, '\\', b)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[b>>4], hexDigits[b&0xF])
			}
			i++
			start = i
			continue
		}
		c, size := utf8.DecodeRuneInString(s[i:])
		if c == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if c == '\u2028' || c == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[c&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
