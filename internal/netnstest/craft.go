package netnstest

import (
	"encoding/binary"
	"net/netip"
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
