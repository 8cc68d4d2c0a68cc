package nat

import (
	"bytes"
	"strconv"
)

// fastYAMLToJSON converts the plain, block-style YAML that operators and
// generators write for this file (the five known keys, one CIDR per
// "- item" line or a flow list of CIDRs, comments) to JSON without the
// general YAML parser, which costs about 150 ms for a 100,000-CIDR list
// against a few ms here. It accepts only a strict subset whose meaning is
// unambiguous: on anything else (quotes, anchors, tags, tabs, documents,
// unknown or repeated keys, scalars YAML 1.1 could read as numbers,
// booleans or timestamps) it returns ok=false and the caller uses the
// general parser, so errors and unusual files keep their exact behaviour.
// FuzzFastYAML checks that whenever it answers, it answers as the general
// parser does. present is the set of configKeys (bit i for configKeys[i])
// the file holds, so the caller need not decode the keys again.
func fastYAMLToJSON(data []byte) (js []byte, present int, ok bool) {
	// Printable ASCII and '\n' only: YAML rejects some control characters
	// and invalid UTF-8 even inside comments, and a lone '\r' breaks lines
	// (CRLF files take the general parser).
	for _, c := range data {
		if (c < 0x20 || c > 0x7e) && c != '\n' {
			return nil, 0, false
		}
	}
	out := make([]byte, 0, len(data)+len(data)/8)
	out = append(out, '{')
	seen := 0           // bit set over configKeys
	inList := false     // inside a block sequence of the last key
	listItems := 0      // items in that sequence
	listIndent := 0     // indentation of its items
	pendingKey := false // last key had an empty value: null unless items follow
	keys := 0
	closePending := func() {
		switch {
		case inList:
			out = append(out, ']')
		case pendingKey:
			out = append(out, "null"...)
		}
		inList, pendingKey, listItems = false, false, 0
	}
	for len(data) > 0 {
		line := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			data = nil
		}
		body := stripComment(bytes.TrimLeft(line, " "))
		indent := len(line) - len(bytes.TrimLeft(line, " "))
		if len(body) == 0 {
			continue
		}
		if body[0] == '-' {
			// A sequence item: only directly under a key with an empty
			// value, and only a CIDR.
			if !(pendingKey || inList) || len(body) < 2 || body[1] != ' ' {
				return nil, 0, false
			}
			item := bytes.TrimSpace(body[2:])
			if !plainCIDR(item) {
				return nil, 0, false
			}
			if pendingKey {
				out = append(out, '[')
				pendingKey, inList, listIndent = false, true, indent
			} else if indent != listIndent {
				return nil, 0, false // YAML rejects ragged sequences
			}
			if listItems > 0 {
				out = append(out, ',')
			}
			out = appendQuoted(out, item)
			listItems++
			continue
		}
		if indent != 0 {
			return nil, 0, false
		}
		colon := bytes.IndexByte(body, ':')
		if colon <= 0 {
			return nil, 0, false
		}
		key, value := body[:colon], bytes.TrimSpace(body[colon+1:])
		if colon+1 < len(body) && body[colon+1] != ' ' {
			return nil, 0, false // "a:b" is a scalar, not a key
		}
		k := knownKey(key)
		if k < 0 || seen&(1<<k) != 0 {
			return nil, 0, false
		}
		seen |= 1 << k
		closePending()
		if keys > 0 {
			out = append(out, ',')
		}
		keys++
		out = strconv.AppendQuote(out, configKeys[k])
		out = append(out, ':')
		if len(value) == 0 {
			pendingKey = true
			continue
		}
		v, ok := fastValue(configKeys[k], value)
		if !ok {
			return nil, 0, false
		}
		out = append(out, v...)
	}
	closePending()
	if keys == 0 {
		return nil, 0, false // comment-only and empty files have their own rule
	}
	return append(out, '}'), seen, true
}

// stripComment removes a trailing " # comment" (or a whole-line comment).
func stripComment(b []byte) []byte {
	if len(b) > 0 && b[0] == '#' {
		return nil
	}
	for i := 1; i < len(b); i++ {
		if b[i] == '#' && b[i-1] == ' ' {
			return bytes.TrimRight(b[:i], " ")
		}
	}
	return bytes.TrimRight(b, " ")
}

func knownKey(k []byte) int {
	for i, known := range configKeys {
		if string(k) == known {
			return i
		}
	}
	return -1
}

// fastValue renders the scalar or flow list of key as JSON, or reports
// that the general parser must decide.
func fastValue(key string, v []byte) ([]byte, bool) {
	switch key {
	case "nonMasqueradeCIDRs":
		if len(v) < 2 || v[0] != '[' || v[len(v)-1] != ']' {
			return nil, false
		}
		out := []byte{'['}
		inner := bytes.TrimSpace(v[1 : len(v)-1])
		if len(inner) == 0 {
			return append(out, ']'), true
		}
		for i, item := range bytes.Split(inner, []byte{','}) {
			item = bytes.TrimSpace(item)
			if !plainCIDR(item) {
				return nil, false
			}
			if i > 0 {
				out = append(out, ',')
			}
			out = appendQuoted(out, item)
		}
		return append(out, ']'), true
	case "masqLinkLocal", "masqLinkLocalIPv6":
		if string(v) == "true" || string(v) == "false" {
			return v, true
		}
	case "cidrLimit":
		if plainInt(v) {
			return v, true
		}
	case "resyncInterval":
		if plainDuration(v) {
			return strconv.AppendQuote(nil, string(v)), true
		}
	}
	return nil, false
}

// plainCIDR accepts address/length text made of hex digits, dots and
// colons: YAML reads such a scalar (it has a '/') as a string, never as a
// number, boolean or timestamp.
func plainCIDR(b []byte) bool {
	slash := bytes.IndexByte(b, '/')
	if slash <= 0 || slash == len(b)-1 {
		return false
	}
	for i, c := range b {
		switch {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'f', c >= 'A' && c <= 'F', c == '.':
		case c == ':':
			// ": " or a trailing ':' would make a mapping.
			if i+1 == len(b) || b[i+1] == ' ' {
				return false
			}
		case c == '/' && i == slash:
		default:
			return false
		}
	}
	return true
}

// plainInt accepts 0 or a decimal without leading zeros (YAML 1.1 reads
// 010 as octal), at most 9 digits.
func plainInt(b []byte) bool {
	if len(b) == 0 || len(b) > 9 || (b[0] == '0' && len(b) > 1) {
		return false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// plainDuration accepts Go durations of whole numbers with units
// ("60s", "1m30s", "500ms"): YAML reads them as strings.
func plainDuration(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for len(b) > 0 {
		n := 0
		for n < len(b) && b[n] >= '0' && b[n] <= '9' {
			n++
		}
		if n == 0 {
			return false
		}
		b = b[n:]
		unit := 0
		for unit < len(b) && b[unit] >= 'a' && b[unit] <= 'z' {
			unit++
		}
		switch string(b[:unit]) {
		case "ns", "us", "ms", "s", "m", "h":
		default:
			return false
		}
		b = b[unit:]
	}
	return true
}

// appendQuoted quotes a scalar the fast path accepted: it holds no quote,
// backslash or control character, so it needs no escaping.
func appendQuoted(dst, s []byte) []byte {
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}
