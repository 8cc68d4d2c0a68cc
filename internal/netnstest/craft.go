package netnstest

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"
)

// Checksum is the Internet checksum (RFC 1071) of b, continuing from the
// partial sum sum (0 to start). Tests use it to craft packets that the
// kernel accepts, or deliberately break them.
func Checksum(sum uint32, b []byte) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// UDPDatagram returns a UDP header and payload with a correct checksum
// over the pseudo-header of src and dst (either family).
func UDPDatagram(src, dst netip.AddrPort, payload []byte) []byte {
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	u = append(u, payload...)
	pseudo := append(src.Addr().AsSlice(), dst.Addr().AsSlice()...)
	if src.Addr().Is4() {
		pseudo = append(pseudo, 0, 17, byte(len(u)>>8), byte(len(u)))
	} else {
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(u)))
		pseudo = append(pseudo, 0, 0, 0, 17)
	}
	// The pseudo-header is always even-length: sum it, then go on with u.
	var sum uint32
	for i := 0; i+1 < len(pseudo); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(pseudo[i:]))
	}
	c := Checksum(sum, u)
	if c == 0 {
		c = 0xffff // 0 means "no checksum" in UDP over IPv4
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return u
}

// ipID numbers the IPv4 headers IPv4Header builds, so that fragments of
// different datagrams never meet in a node's reassembly queue.
var ipID atomic.Uint32

// IPv4Header is an IPv4 header of ihl 32-bit words (options padded with
// NOPs) for a payload of payloadLen bytes, with the fragment field frag
// and a correct header checksum.
func IPv4Header(proto byte, payloadLen, ihl int, frag uint16, src, dst netip.Addr) []byte {
	h := make([]byte, ihl*4)
	h[0] = 0x40 | byte(ihl)
	binary.BigEndian.PutUint16(h[2:], uint16(ihl*4+payloadLen))
	binary.BigEndian.PutUint16(h[4:], uint16(ipID.Add(1)))
	binary.BigEndian.PutUint16(h[6:], frag)
	h[8], h[9] = 64, proto
	copy(h[12:], src.AsSlice())
	copy(h[16:], dst.AsSlice())
	for i := 20; i < len(h); i++ {
		h[i] = 1 // NOP options
	}
	binary.BigEndian.PutUint16(h[10:], Checksum(0, h))
	return h
}

// IPv6Packet is an IPv6 header whose first next header is nh, followed by
// parts (extension headers, transport), with the payload length of parts.
func IPv6Packet(nh byte, src, dst netip.Addr, parts ...[]byte) []byte {
	b := make([]byte, 40)
	b[0] = 0x60
	b[6], b[7] = nh, 64
	copy(b[8:], src.AsSlice())
	copy(b[24:], dst.AsSlice())
	for _, p := range parts {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	return b
}

// IPv6Options is an IPv6 options header (hop-by-hop or destination
// options) of 8*units bytes whose next header is nh, padded with PadN.
func IPv6Options(nh byte, units int) []byte {
	b := make([]byte, 8*units)
	b[0], b[1] = nh, byte(units-1)
	b[2], b[3] = 1, byte(len(b)-4) // PadN
	return b
}
