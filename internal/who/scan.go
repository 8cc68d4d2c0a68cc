package who

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"unicode/utf8"
)

// field is one top-level member of a flow-log line: its key and its raw
// value (a string's contents without the quotes, with escapes still in
// place when escaped is set; a number's text; the text of an object,
// array, true, false or null).
type field struct {
	key, val []byte
	str      bool // val is a string's contents
	escaped  bool // ... holding at least one backslash escape
}

var errSyntax = errors.New("not a JSON object")

// scanLine splits one flow-log line into its top-level members, calling
// each for every one. It accepts exactly the lines encoding/json accepts
// as a JSON object (FuzzScanOracle holds it to that), allocates nothing,
// and leaves nested objects (a gap record's "dropped") whole.
//
// It exists because decoding with encoding/json costs about 8x as much
// per record (BenchmarkScan), and nfmasq who must scan a node's whole log
// at a million records a second; encoding/json remains its oracle.
func scanLine(line []byte, each func(f field)) error {
	plain := plainBytes(line)
	if plain {
		if done, err := scanCompact(line, each); done {
			return err
		}
	}
	s := scanner{b: line, plain: plain}
	s.space()
	if !s.consume('{') {
		return errSyntax
	}
	s.space()
	if s.consume('}') {
		return s.end()
	}
	for {
		s.space()
		key, _, ok := s.str()
		if !ok {
			return errSyntax
		}
		s.space()
		if !s.consume(':') {
			return errSyntax
		}
		s.space()
		var f field
		f.key = key
		if s.peek() == '"' {
			f.val, f.escaped, ok = s.str()
			f.str = true
		} else {
			start := s.i
			ok = s.value(0)
			f.val = s.b[start:s.i]
		}
		if !ok {
			return errSyntax
		}
		each(f)
		s.space()
		if s.consume(',') {
			continue
		}
		if s.consume('}') {
			return s.end()
		}
		return errSyntax
	}
}

// scanCompact is scanLine for a plain line (see scanner.plain) written
// without white space, as the agent writes them: one pass, no calls but
// each. It reports done=false, having called each for nothing, when the
// line holds anything else (white space, an array, a literal), which
// scanLine then reads the general way.
func scanCompact(b []byte, each func(f field)) (done bool, err error) {
	// Members are collected first so that each is not called for a line
	// that turns out not to be compact.
	var fields [32]field
	n := 0
	if len(b) < 2 || b[0] != '{' {
		return false, nil
	}
	i := 1
	if b[i] == '}' {
		return i+1 == len(b), nil
	}
	for {
		if n == len(fields) || i >= len(b) || b[i] != '"' {
			return false, nil
		}
		j := i + 1
		for j < len(b) && b[j] != '"' {
			j++
		}
		if j+1 >= len(b) || b[j+1] != ':' {
			return false, nil
		}
		f := &fields[n]
		f.key = b[i+1 : j]
		i = j + 2
		if i >= len(b) {
			return false, nil
		}
		switch c := b[i]; {
		case c == '"':
			j = i + 1
			for j < len(b) && b[j] != '"' {
				j++
			}
			if j >= len(b) {
				return true, errSyntax
			}
			f.val, f.str = b[i+1:j], true
			i = j + 1
		case c == '-' || '0' <= c && c <= '9':
			s := scanner{b: b, i: i}
			if !s.number() {
				return true, errSyntax
			}
			f.val = b[i:s.i]
			i = s.i
		case c == '{':
			s := scanner{b: b, i: i, plain: true}
			if !s.value(0) {
				return false, nil
			}
			f.val = b[i:s.i]
			i = s.i
		default:
			return false, nil
		}
		n++
		if i >= len(b) {
			return false, nil
		}
		if b[i] == ',' {
			i++
			continue
		}
		if b[i] == '}' && i+1 == len(b) {
			for k := range n {
				each(fields[k])
			}
			return true, nil
		}
		return false, nil
	}
}

// maxDepth bounds nesting, as encoding/json does (10000); flow-log lines
// nest two deep.
const maxDepth = 10000

type scanner struct {
	b []byte
	i int
	// plain says the line holds no backslash and no control character:
	// every string ends at the next quote. Agent lines are plain, unless
	// a name needed escaping.
	plain bool
}

// plainBytes reports whether b holds no backslash and no control
// character, eight bytes at a time.
func plainBytes(b []byte) bool {
	i := 0
	for ; i+8 <= len(b); i += 8 {
		v := binary.LittleEndian.Uint64(b[i:])
		bs := v ^ backslashes
		if ((v-lows)&^v|(bs-ones)&^bs)&highs != 0 {
			return false
		}
	}
	for _, c := range b[i:] {
		if c < 0x20 || c == '\\' {
			return false
		}
	}
	return true
}

func (s *scanner) peek() byte {
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *scanner) consume(c byte) bool {
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

func (s *scanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// end accepts trailing white space only.
func (s *scanner) end() error {
	s.space()
	if s.i != len(s.b) {
		return errSyntax
	}
	return nil
}

// str reads a string at s.i and returns its contents between the quotes.
func (s *scanner) str() (val []byte, escaped, ok bool) {
	b, i := s.b, s.i
	if i >= len(b) || b[i] != '"' {
		return nil, false, false
	}
	i++
	start := i
	if s.plain {
		j := bytes.IndexByte(b[i:], '"')
		if j < 0 {
			return nil, false, false
		}
		s.i = i + j + 1
		return b[i : i+j], false, true
	}
	// A line with escapes or control characters: rare, byte by byte.
	for i < len(b) {
		c := b[i]
		if plain[c] {
			i++
			continue
		}
		switch {
		case c == '"':
			s.i = i + 1
			return b[start:i], escaped, true
		case c == '\\':
			escaped = true
			if i+1 >= len(b) {
				return nil, false, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) {
					return nil, false, false
				}
				for _, h := range b[i+2 : i+6] {
					if !isHex(h) {
						return nil, false, false
					}
				}
				i += 6
			default:
				return nil, false, false
			}
		default: // a control character
			return nil, false, false
		}
	}
	return nil, false, false
}

// Byte patterns for plainBytes's eight-at-a-time test.
const (
	ones        = 0x0101010101010101
	lows        = 0x2020202020202020
	highs       = 0x8080808080808080
	backslashes = 0x5c5c5c5c5c5c5c5c
)

// plain[c] is true for the bytes that stand for themselves in a JSON
// string: all but the quote, the backslash and control characters.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// value skips one JSON value of any kind.
func (s *scanner) value(depth int) bool {
	if depth > maxDepth {
		return false
	}
	switch c := s.peek(); {
	case c == '"':
		_, _, ok := s.str()
		return ok
	case c == '{':
		s.i++
		s.space()
		if s.consume('}') {
			return true
		}
		for {
			s.space()
			if _, _, ok := s.str(); !ok {
				return false
			}
			s.space()
			if !s.consume(':') {
				return false
			}
			s.space()
			if !s.value(depth + 1) {
				return false
			}
			s.space()
			if s.consume(',') {
				continue
			}
			return s.consume('}')
		}
	case c == '[':
		s.i++
		s.space()
		if s.consume(']') {
			return true
		}
		for {
			s.space()
			if !s.value(depth + 1) {
				return false
			}
			s.space()
			if s.consume(',') {
				continue
			}
			return s.consume(']')
		}
	case c == '-' || '0' <= c && c <= '9':
		return s.number()
	default:
		for _, lit := range [...]string{"true", "false", "null"} {
			if len(s.b)-s.i >= len(lit) && string(s.b[s.i:s.i+len(lit)]) == lit {
				s.i += len(lit)
				return true
			}
		}
		return false
	}
}

// number skips a number in JSON's grammar:
// -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
func (s *scanner) number() bool {
	s.consume('-')
	switch c := s.peek(); {
	case c == '0':
		s.i++
	case '1' <= c && c <= '9':
		s.digits()
	default:
		return false
	}
	if s.consume('.') {
		if !s.digits() {
			return false
		}
	}
	if s.consume('e') || s.consume('E') {
		if !s.consume('+') {
			s.consume('-')
		}
		if !s.digits() {
			return false
		}
	}
	return true
}

// digits skips one or more digits.
func (s *scanner) digits() bool {
	start := s.i
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' {
		s.i++
	}
	return s.i > start
}

// text returns a string member's value, unescaped, with invalid UTF-8
// replaced as encoding/json replaces it. The agent escapes only what
// encoding/json escapes, which no Kubernetes name or address contains.
func (f field) text() string {
	if !f.escaped && utf8.Valid(f.val) {
		return string(f.val)
	}
	quoted := make([]byte, 0, len(f.val)+2)
	quoted = append(append(append(quoted, '"'), f.val...), '"')
	var v string
	if err := json.Unmarshal(quoted, &v); err != nil {
		return string(f.val)
	}
	return v
}

// uint parses a number member as an unsigned integer of the given size.
func (f field) uint(bits int) (uint64, bool) {
	if f.str || len(f.val) == 0 || len(f.val) > 20 {
		return 0, false
	}
	var v uint64
	for _, c := range f.val {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if v > (1<<64-1-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, v>>bits == 0 || bits == 64
}
