package who

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// kind is a flow-log record kind.
type kind uint8

const (
	kindOther kind = iota // a kind this reader does not know: skipped
	kindDecision
	kindNat
	kindEnd
	kindFallback
	kindGap
)

// record is the part of one flow-log line nfmasq who reads. Byte slices
// point into the line and live only until the next line is read.
type record struct {
	kind             kind
	time             time.Time
	proto            []byte
	src, dst         netip.AddrPort
	pod              []byte
	action           []byte
	xlate            netip.AddrPort
	conntrackID      uint32
	start            time.Time // end, fallback: when conntrack created the flow
	gapDropped       uint64    // gap: records lost in all
	gapStart, gapEnd time.Time
	hasPod, hasXlate bool
	podEscaped       bool
}

var errBadFlow = errors.New("flow record without proto, src or dst")

// parse reads line into r. Unknown members are ignored, as the schema
// asks of readers; a known member of the wrong type makes the line
// malformed.
func (r *record) parse(line []byte) error {
	*r = record{}
	var srcA, dstA, xA netip.Addr
	var sport, dport, xport uint64
	var bad error
	fail := func(key []byte, err error) {
		if bad == nil {
			bad = fmt.Errorf("%s: %w", key, err)
		}
	}
	err := scanLine(line, func(f field) {
		if bad != nil {
			return
		}
		var err error
		switch string(f.key) {
		case "kind":
			r.kind = kindOf(f.val)
		case "time":
			r.time, err = parseTime(f)
		case "proto":
			r.proto = f.val
		case "action":
			r.action = f.val
		case "src":
			srcA, err = parseAddr(f)
		case "dst":
			dstA, err = parseAddr(f)
		case "xlate_src":
			xA, err = parseAddr(f)
			r.hasXlate = err == nil
		case "sport":
			sport, err = parsePort(f)
		case "dport":
			dport, err = parsePort(f)
		case "xlate_sport":
			xport, err = parsePort(f)
		case "pod":
			if !f.str {
				err = errors.New("not a string")
			}
			r.pod, r.hasPod, r.podEscaped = f.val, true, f.escaped
		case "conntrack_id":
			var v uint64
			var ok bool
			if v, ok = f.uint(32); !ok {
				err = errors.New("not a 32-bit count")
			}
			r.conntrackID = uint32(v)
		case "start":
			r.start, err = parseTime(f)
		case "end":
			r.gapEnd, err = parseTime(f)
		case "dropped":
			r.gapDropped = sumDropped(f.val)
		}
		if err != nil {
			fail(f.key, err)
		}
	})
	switch {
	case err != nil:
		return err
	case bad != nil:
		return bad
	case r.kind == kindOther:
		return nil
	case r.time.IsZero():
		return errors.New("no time")
	case r.kind == kindGap:
		r.gapStart, r.start = r.start, time.Time{}
		return nil
	case len(r.proto) == 0 || !srcA.IsValid() || !dstA.IsValid():
		return errBadFlow
	}
	r.src = netip.AddrPortFrom(srcA, uint16(sport))
	r.dst = netip.AddrPortFrom(dstA, uint16(dport))
	if r.hasXlate {
		r.xlate = netip.AddrPortFrom(xA, uint16(xport))
	}
	return nil
}

func kindOf(v []byte) kind {
	switch string(v) {
	case "decision":
		return kindDecision
	case "nat":
		return kindNat
	case "end":
		return kindEnd
	case "fallback":
		return kindFallback
	case "gap":
		return kindGap
	}
	return kindOther
}

func parseTime(f field) (time.Time, error) {
	if !f.str {
		if string(f.val) == "null" {
			return time.Time{}, nil
		}
		return time.Time{}, errors.New("not a time")
	}
	if t, ok := parseUTC(f.val); ok {
		return t, nil
	}
	return time.Parse(time.RFC3339Nano, string(f.val))
}

// parseUTC parses the agent's own time format, RFC 3339 in UTC with up
// to nine fractional digits ("2026-12-06T17:28:16.123456789Z"), without
// allocating; anything else is left to time.Parse.
func parseUTC(b []byte) (time.Time, bool) {
	if len(b) < len("2006-01-02T15:04:05Z") || b[4] != '-' || b[7] != '-' || b[10] != 'T' || b[13] != ':' || b[16] != ':' || b[len(b)-1] != 'Z' {
		return time.Time{}, false
	}
	year, ok1 := decimal(b[0:4])
	month, ok2 := decimal(b[5:7])
	day, ok3 := decimal(b[8:10])
	hour, ok4 := decimal(b[11:13])
	minute, ok5 := decimal(b[14:16])
	sec, ok6 := decimal(b[17:19])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6) || month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	nsec := 0
	if frac := b[19 : len(b)-1]; len(frac) > 0 {
		if frac[0] != '.' || len(frac) < 2 || len(frac) > 10 {
			return time.Time{}, false
		}
		v, ok := decimal(frac[1:])
		if !ok {
			return time.Time{}, false
		}
		for range 10 - len(frac) {
			v *= 10
		}
		nsec = v
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.UTC)
	if t.Day() != day {
		return time.Time{}, false // February 30th and the like: time.Parse says why
	}
	return t, true
}

// decimal parses digits only.
func decimal(v []byte) (int, bool) {
	n := 0
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

func parseAddr(f field) (netip.Addr, error) {
	if !f.str || f.escaped {
		return netip.Addr{}, errors.New("not an address")
	}
	if a, ok := parseIPv4(f.val); ok {
		return a, nil
	}
	a, err := netip.ParseAddr(string(f.val))
	return a.Unmap(), err
}

// parseIPv4 parses a dotted-quad IPv4 address without allocating, as
// netip.ParseAddr does (no leading zeros); anything else is left to it.
func parseIPv4(b []byte) (netip.Addr, bool) {
	var ip [4]byte
	field, digits, n := 0, 0, 0
	for _, c := range b {
		switch {
		case '0' <= c && c <= '9':
			if digits > 0 && n == 0 {
				return netip.Addr{}, false // a leading zero
			}
			n = n*10 + int(c-'0')
			digits++
			if n > 255 {
				return netip.Addr{}, false
			}
		case c == '.' && digits > 0 && field < 3:
			ip[field] = byte(n)
			field++
			digits, n = 0, 0
		default:
			return netip.Addr{}, false
		}
	}
	if field != 3 || digits == 0 {
		return netip.Addr{}, false
	}
	ip[3] = byte(n)
	return netip.AddrFrom4(ip), true
}

func parsePort(f field) (uint64, error) {
	v, ok := f.uint(16)
	if !ok {
		return 0, errors.New("not a port")
	}
	return v, nil
}

// sumDropped adds up the counts of a gap record's "dropped" object,
// {reason: {kind: count}}. The line has been validated, so the scan only
// looks for numbers.
func sumDropped(obj []byte) uint64 {
	var sum, v uint64
	in := false
	for i := 0; i < len(obj); i++ {
		c := obj[i]
		switch {
		case c == '"':
			// Skip the string (a reason or a kind name).
			j := bytes.IndexByte(obj[i+1:], '"')
			if j < 0 {
				return sum
			}
			i += j + 1
		case '0' <= c && c <= '9':
			v = v*10 + uint64(c-'0')
			in = true
		default:
			if in {
				sum += v
				v, in = 0, false
			}
		}
	}
	return sum + v
}
