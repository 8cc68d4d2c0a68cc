package nl

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func msg(typ uint16, body []byte) []byte {
	b := make([]byte, HdrLen, HdrLen+len(body)+3)
	binary.NativeEndian.PutUint32(b, uint32(HdrLen+len(body)))
	binary.NativeEndian.PutUint16(b[4:], typ)
	b = append(b, body...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func attr(typ uint16, data []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(AttrHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func TestNextMessage(t *testing.T) {
	a := msg(3, []byte{1, 2, 3}) // padded to 20
	b := msg(0x300, attr(1, []byte{9}))
	dgram := append(append([]byte{}, a...), b...)
	var got [][]byte
	for rest := dgram; len(rest) > 0; {
		m, r, ok := NextMessage(rest)
		if !ok {
			t.Fatalf("split failed with %d bytes left", len(rest))
		}
		got = append(got, m)
		rest = r
	}
	if len(got) != 2 || !bytes.Equal(got[0], a[:HdrLen+3]) || !bytes.Equal(got[1], b) {
		t.Errorf("split into %x", got)
	}
	if MessageType(got[1]) != 0x300 {
		t.Errorf("type %#x", MessageType(got[1]))
	}
	// The last message of a datagram may lack its padding.
	if m, rest, ok := NextMessage(a[:HdrLen+3]); !ok || len(m) != HdrLen+3 || len(rest) != 0 {
		t.Errorf("unpadded last message: %x %x %v", m, rest, ok)
	}
	for _, bad := range [][]byte{nil, make([]byte, 8), {0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
		if _, _, ok := NextMessage(bad); ok {
			t.Errorf("NextMessage(%x) accepted", bad)
		}
	}
}

func TestParseError(t *testing.T) {
	body := binary.NativeEndian.AppendUint32(nil, uint32(0xfffffffe)) // -ENOENT
	hdr := make([]byte, HdrLen)
	binary.NativeEndian.PutUint32(hdr[8:], 77)
	m := msg(TypeError, append(body, hdr...))
	if errno, seq, ok := ParseError(m); !ok || errno != 2 || seq != 77 {
		t.Errorf("ParseError = %d, %d, %v; want 2, 77, true", errno, seq, ok)
	}
	if _, _, ok := ParseError(m[:HdrLen+4]); ok {
		t.Error("short error message accepted")
	}
}

func TestAttrs(t *testing.T) {
	nested := append(attr(1, []byte{0, 80}), attr(2|0x4000, []byte{1, 2, 3, 4})...)
	b := append(attr(1|0x8000, nested), attr(7, []byte{0, 0, 0, 0, 0, 0, 1, 0})...)
	b = append(b, attr(3, []byte{0xab})...)
	b = append(b, 0xff, 0xff, 9, 0) // longer than what is left: ends the walk

	a := NewAttrs(b)
	if !a.Next() || a.Type() != 1 {
		t.Fatalf("first attribute: %d", a.Type())
	}
	in := a.Nested()
	if !in.Next() || in.Type() != 1 {
		t.Fatal("nested port")
	}
	if v, ok := in.Be16(); !ok || v != 80 {
		t.Errorf("Be16 = %d, %v", v, ok)
	}
	if !in.Next() || in.Type() != 2 {
		t.Fatal("nested address: byte-order flag not masked")
	}
	if v, ok := in.Be32(); !ok || v != 0x01020304 {
		t.Errorf("Be32 = %#x", v)
	}
	if in.Next() {
		t.Error("nested walk went past its end")
	}
	if !a.Next() || a.Type() != 7 {
		t.Fatal("second attribute")
	}
	if v, ok := a.Be64(); !ok || v != 256 {
		t.Errorf("Be64 = %d", v)
	}
	if !a.Next() || a.Type() != 3 {
		t.Fatal("third attribute")
	}
	if v, ok := a.Uint8(); !ok || v != 0xab {
		t.Errorf("Uint8 = %d", v)
	}
	if _, ok := a.Be16(); ok {
		t.Error("Be16 of a 1-byte payload")
	}
	if a.Next() {
		t.Error("an attribute longer than the input was returned")
	}
	if a.Next() {
		t.Error("the walk restarted after a bad attribute")
	}
}
