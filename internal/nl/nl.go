// Package nl walks netlink messages and attributes without allocating,
// and (on Linux) reads netlink datagrams in batches. It serves the two
// hot paths that read netlink at the rate flows start and end: the
// NFQUEUE receive loop and the conntrack event listener. Everything else
// uses mdlayher/netlink.
//
// Netlink headers and attribute headers are in host byte order; the
// payloads of netfilter attributes are in network byte order.
package nl

import "encoding/binary"

// Sizes and flags from linux/netlink.h.
const (
	HdrLen     = 16 // struct nlmsghdr
	AttrHdrLen = 4  // struct nlattr
	alignTo    = 4
	// TypeError is NLMSG_ERROR: an acknowledgement (error 0) or an error.
	TypeError = 2
	// attrTypeMask clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
	attrTypeMask = 0x3fff
)

// Align rounds n up to netlink's 4-byte alignment.
func Align(n int) int { return (n + alignTo - 1) &^ (alignTo - 1) }

// NextMessage splits the first message off a datagram. ok is false when b
// holds no complete message; the rest of the datagram is then unusable.
func NextMessage(b []byte) (msg, rest []byte, ok bool) {
	if len(b) < HdrLen {
		return nil, nil, false
	}
	n := int(binary.NativeEndian.Uint32(b))
	if n < HdrLen || n > len(b) {
		return nil, nil, false
	}
	return b[:n], b[min(Align(n), len(b)):], true
}

// MessageType returns the type of a message from NextMessage.
func MessageType(msg []byte) uint16 { return binary.NativeEndian.Uint16(msg[4:]) }

// MessageFlags returns the flags of a message from NextMessage.
func MessageFlags(msg []byte) uint16 { return binary.NativeEndian.Uint16(msg[6:]) }

// ParseError reads an NLMSG_ERROR message: the error (0 for an
// acknowledgement, else a positive errno) and the sequence number of the
// request it answers. ok is false when the message is too short.
func ParseError(msg []byte) (errno, seq uint32, ok bool) {
	// struct nlmsgerr: int error, then the request's header, whose
	// sequence number is at offset 8.
	if len(msg) < HdrLen+4+HdrLen {
		return 0, 0, false
	}
	return uint32(-int32(binary.NativeEndian.Uint32(msg[HdrLen:]))), binary.NativeEndian.Uint32(msg[HdrLen+4+8:]), true
}

// Attrs iterates over a run of attributes as the kernel's nla_for_each_attr
// does: it stops at the first attribute shorter than its header or longer
// than what is left.
//
//	a := nl.NewAttrs(b)
//	for a.Next() {
//		switch a.Type() { … a.Data() … }
//	}
//
// Declare it outside the for statement: as a loop variable it is copied
// on every iteration (Go 1.22 semantics), which made a walk 4x slower.
type Attrs struct {
	b    []byte
	typ  uint16
	data []byte
}

// NewAttrs returns an iterator over b.
func NewAttrs(b []byte) Attrs { return Attrs{b: b} }

// Next moves to the next attribute and reports whether there is one.
func (a *Attrs) Next() bool {
	if len(a.b) < AttrHdrLen {
		return false
	}
	n := int(binary.NativeEndian.Uint16(a.b))
	if n < AttrHdrLen || n > len(a.b) {
		a.b = nil
		return false
	}
	a.typ = binary.NativeEndian.Uint16(a.b[2:]) & attrTypeMask
	a.data = a.b[AttrHdrLen:n]
	a.b = a.b[min(Align(n), len(a.b)):]
	return true
}

// Type is the current attribute's type without the nested and byte-order
// flags.
func (a *Attrs) Type() uint16 { return a.typ }

// Data is the current attribute's payload (a slice of the input).
func (a *Attrs) Data() []byte { return a.data }

// Nested returns an iterator over the current attribute's payload.
func (a *Attrs) Nested() Attrs { return Attrs{b: a.data} }

// Uint8 returns the payload's first byte, ok false when it is empty.
func (a *Attrs) Uint8() (uint8, bool) {
	if len(a.data) < 1 {
		return 0, false
	}
	return a.data[0], true
}

// Be16 returns the payload as a big-endian 16-bit number.
func (a *Attrs) Be16() (uint16, bool) {
	if len(a.data) < 2 {
		return 0, false
	}
	return binary.BigEndian.Uint16(a.data), true
}

// Be32 returns the payload as a big-endian 32-bit number.
func (a *Attrs) Be32() (uint32, bool) {
	if len(a.data) < 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(a.data), true
}

// Be64 returns the payload as a big-endian 64-bit number.
func (a *Attrs) Be64() (uint64, bool) {
	if len(a.data) < 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(a.data), true
}
