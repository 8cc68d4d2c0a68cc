package nat

import (
	"bytes"
	"slices"
	"strconv"
)

// fastFile is a config file the fast path read: its keys as a JSON
// object, except the nonMasqueradeCIDRs list, which comes apart so that a
// 100,000-CIDR list is not quoted into JSON and decoded again.
type fastFile struct {
	js      []byte   // the file as a JSON object, without nonMasqueradeCIDRs
	cidrs   []string // nonMasqueradeCIDRs: nil for null, empty for []
	present int      // bit i set: the file holds configKeys[i]
}

// cidrsKey is nonMasqueradeCIDRs' bit in fastFile.present.
var cidrsKey = 1 << slices.Index(configKeys, "nonMasqueradeCIDRs")

// fastYAML reads the plain, block-style YAML that operators and
// generators write for this file (the five known keys, one CIDR per
// "- item" line or a flow list of CIDRs, comments) without the
// general YAML parser, which costs about 150 ms for a 100,000-CIDR list
// against a few ms here. It accepts only a strict subset whose meaning is
// unambiguous: on anything else (quotes, anchors, tags, tabs, documents,
// unknown or repeated keys, scalars YAML 1.1 could read as numbers,
// booleans or timestamps) it reports false and the caller uses the
// general parser, so errors and unusual files keep their exact behaviour.
// FuzzFastYAML checks that whenever it answers, it answers as the general
// parser does. The keys other than nonMasqueradeCIDRs come back as a JSON
// object (decoded by encoding/json, as upstream decodes the file), the list as
// strings sharing one allocation, and present says which keys the file
// holds, so the caller need not decode the keys again.
func fastYAML(data []byte) (fastFile, bool) {
	// Printable ASCII and '\n' only: YAML rejects some control characters
	// and invalid UTF-8 even inside comments, and a lone '\r' breaks lines
	// (CRLF files take the general parser).
	for _, c := range data {
		if (c < 0x20 || c > 0x7e) && c != '\n' {
			return fastFile{}, false
		}
	}
	out := make([]byte, 0, 256)
	out = append(out, '{')
	var (
		list    = make([]byte, 0, len(data))                        // the CIDRs, back to back
		ends    = make([]int, 0, bytes.Count(data, []byte{'\n'})+1) // where each ends in list
		hasList bool                                                // the CIDR key has a list value (possibly empty)
	)
	seen := 0           // bit set over configKeys
	inList := false     // inside a block sequence of the last key
	listIndent := 0     // indentation of its items
	pendingKey := false // last key had an empty value: null unless items follow
	pendingCIDRs := false
	keys := 0 // keys written to out
	closePending := func() {
		if pendingKey && !pendingCIDRs {
			out = append(out, "null"...)
		}
		inList, pendingKey, pendingCIDRs = false, false, false
	}
	fail := func() (fastFile, bool) { return fastFile{}, false }
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
			// A sequence item: only directly under the CIDR key with an
			// empty value, and only a CIDR. (Under another key it would be
			// a type error, which the general path words.)
			if !(pendingCIDRs || inList) || len(body) < 2 || body[1] != ' ' {
				return fail()
			}
			item := bytes.TrimSpace(body[2:])
			if !plainCIDR(item) {
				return fail()
			}
			if pendingCIDRs {
				pendingKey, pendingCIDRs, inList, listIndent, hasList = false, false, true, indent, true
			} else if indent != listIndent {
				return fail() // YAML rejects ragged sequences
			}
			list = append(list, item...)
			ends = append(ends, len(list))
			continue
		}
		if indent != 0 {
			return fail()
		}
		colon := bytes.IndexByte(body, ':')
		if colon <= 0 {
			return fail()
		}
		key, value := body[:colon], bytes.TrimSpace(body[colon+1:])
		if colon+1 < len(body) && body[colon+1] != ' ' {
			return fail() // "a:b" is a scalar, not a key
		}
		k := knownKey(key)
		if k < 0 || seen&(1<<k) != 0 {
			return fail()
		}
		seen |= 1 << k
		closePending()
		if 1<<k == cidrsKey {
			if len(value) == 0 {
				pendingKey, pendingCIDRs = true, true
				continue
			}
			if !fastFlowList(value, &list, &ends) {
				return fail()
			}
			hasList = true
			continue
		}
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
			return fail()
		}
		out = append(out, v...)
	}
	closePending()
	if seen == 0 {
		return fail() // comment-only and empty files have their own rule
	}
	f := fastFile{js: append(out, '}'), present: seen}
	if hasList {
		all := string(list)
		f.cidrs = make([]string, len(ends))
		start := 0
		for i, end := range ends {
			f.cidrs[i] = all[start:end]
			start = end
		}
	}
	return f, true
}

// fastFlowList appends the CIDRs of a flow list ("[a, b]") to list, or
// reports that the general parser must decide.
func fastFlowList(v []byte, list *[]byte, ends *[]int) bool {
	if len(v) < 2 || v[0] != '[' || v[len(v)-1] != ']' {
		return false
	}
	inner := bytes.TrimSpace(v[1 : len(v)-1])
	if len(inner) == 0 {
		return true
	}
	for item := range bytes.SplitSeq(inner, []byte{','}) {
		item = bytes.TrimSpace(item)
		// Inside a flow list a plain scalar cannot start with ':'.
		if !plainCIDR(item) || item[0] == ':' {
			return false
		}
		*list = append(*list, item...)
		*ends = append(*ends, len(*list))
	}
	return true
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
