package packet

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// Status describes how far Decode got and, if it stopped early, why.
type Status uint8

const (
	// OK: the packet is well formed as far as it was captured. Addresses,
	// protocol and fragment position are known, and so are the ports (or
	// ICMP type and code) when the protocol carries them and the packet is
	// not a later fragment.
	OK Status = iota

	// Snapped: the capture ends before the transport header or inside the
	// IPv6 extension headers, although the packet's own length fields say
	// the bytes exist. NFQUEUE's copy range and pcap snap lengths do this
	// to ordinary packets. Addresses are known; ports are not. Decode
	// cannot tell a capture cut from a packet that lost its tail in
	// transit; a caller that knows the wire length can compare it with
	// Parsed.Length.
	Snapped

	// NotIP: empty input, or a version nibble that is neither 4 nor 6.
	NotIP

	// BadVersion: the version nibble disagrees with the family announced
	// by the link layer (see DecodeVersion).
	BadVersion

	// Truncated: the bytes end inside the fixed IP header, so not even the
	// addresses could be read.
	Truncated

	// BadHeaderLength: the IPv4 header length (IHL) is below the minimum
	// of 5 words. The address bytes are not trusted and left unset.
	BadHeaderLength

	// BadTotalLength: the IPv4 total length is smaller than the header
	// length. Addresses and protocol are filled (the fixed header was
	// intact), ports are not.
	BadTotalLength

	// BadExtHeader: an IPv6 extension header runs past the end of the
	// packet, or the chain is longer than MaxExtHeaders. Addresses are
	// filled; Proto is the header where the walk stopped.
	BadExtHeader

	// TruncatedTransport: the packet, by its own length fields, ends inside
	// the transport header (for a first fragment: the fragment is too
	// small to hold it). Addresses and protocol are filled, ports are not.
	TruncatedTransport

	// NumStatus is the number of Status values, for arrays indexed by
	// Status. It is not a status itself.
	NumStatus
)

var statusNames = [NumStatus]string{
	OK:                 "ok",
	Snapped:            "snapped",
	NotIP:              "not_ip",
	BadVersion:         "bad_version",
	Truncated:          "truncated",
	BadHeaderLength:    "bad_header_length",
	BadTotalLength:     "bad_total_length",
	BadExtHeader:       "bad_ext_header",
	TruncatedTransport: "truncated_transport",
}

// String returns a lower-case, snake_case name suitable as a metric label.
func (s Status) String() string {
	if s < NumStatus {
		return statusNames[s]
	}
	return "status_" + strconv.Itoa(int(s))
}

// Valid reports whether the packet is well formed as far as it was
// captured (OK or Snapped), so its addresses can be trusted for a decision.
func (s Status) Valid() bool { return s == OK || s == Snapped }

// Fragment is the position of a packet in a fragmented datagram.
type Fragment uint8

const (
	// NotFragment is a whole datagram (including an IPv6 atomic fragment:
	// offset 0 without the more-fragments flag).
	NotFragment Fragment = iota
	// FirstFragment is offset 0 with more fragments to come: it carries the
	// transport header.
	FirstFragment
	// LaterFragment has a non-zero offset: no transport header, so no ports.
	LaterFragment
)

// String returns "none", "first" or "later".
func (f Fragment) String() string {
	switch f {
	case NotFragment:
		return "none"
	case FirstFragment:
		return "first"
	case LaterFragment:
		return "later"
	}
	return "fragment_" + strconv.Itoa(int(f))
}

// IPProto is an IP protocol number (IPv4 protocol, IPv6 next header).
type IPProto uint8

// Protocol numbers Decode gives meaning to.
const (
	ICMPv4  IPProto = 1
	TCP     IPProto = 6
	UDP     IPProto = 17
	DCCP    IPProto = 33
	ESP     IPProto = 50
	ICMPv6  IPProto = 58
	SCTP    IPProto = 132
	UDPLite IPProto = 136
)

// IPv6 extension headers that Decode walks over.
const (
	hopByHop    = 0
	routing     = 43
	fragmentHdr = 44
	authHeader  = 51
	destOpts    = 60
	mobility    = 135
	hip         = 139
	shim6       = 140
)

// MaxExtHeaders bounds the IPv6 extension-header walk so that a hostile
// chain costs a fixed amount of work. Real packets carry at most a handful
// (hop-by-hop, destination options, routing, fragment, AH, destination
// options).
const MaxExtHeaders = 8

// String returns the conventional lower-case name, or the number.
func (p IPProto) String() string {
	switch p {
	case ICMPv4:
		return "icmp"
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case DCCP:
		return "dccp"
	case ESP:
		return "esp"
	case ICMPv6:
		return "icmpv6"
	case SCTP:
		return "sctp"
	case UDPLite:
		return "udplite"
	}
	return strconv.Itoa(int(p))
}

// transportHeaderLen is how many bytes of a protocol's header Decode needs
// before it reads ports or ICMP type and code: the fixed header, so that a
// packet too short to be real is told apart. 0 means the protocol carries
// nothing Decode reads.
func transportHeaderLen(p IPProto) int {
	switch p {
	case TCP:
		return 20
	case UDP, UDPLite, ICMPv4, ICMPv6:
		return 8
	case SCTP, DCCP:
		return 12
	}
	return 0
}

// Parsed is one decoded packet. The zero value is ready for Decode; reuse
// it across packets to keep decoding free of allocations.
type Parsed struct {
	// Status says whether the packet decoded fully and, if not, why.
	Status Status
	// IPVersion is 4 or 6 once the version nibble was accepted, else 0.
	IPVersion uint8
	// Proto is the transport protocol: IPv4's protocol field, or the
	// IPv6 next header that ended the extension-header walk.
	Proto IPProto
	// Frag is the fragment position.
	Frag Fragment
	// ExtHeaders counts the IPv6 extension headers walked over.
	ExtHeaders uint8

	// Src and Dst are filled whenever the fixed IP header was intact,
	// whatever Status says later; see the Status values.
	Src, Dst netip.Addr

	// SrcPort and DstPort are set for TCP, UDP, UDP-Lite, SCTP and DCCP
	// when the transport header was decoded.
	SrcPort, DstPort uint16

	// ICMPType and ICMPCode are set for ICMPv4 and ICMPv6.
	ICMPType, ICMPCode uint8

	// Length is the IP packet length declared by the header (IPv4 total
	// length, or 40 plus the IPv6 payload length). When the header says 0
	// (IPv4 TSO/BIG TCP, IPv6 jumbograms and BIG TCP), it is the number
	// of bytes captured.
	Length int

	// TransportOffset is the offset of the transport header in the bytes
	// given to Decode, or 0 when the walk never reached it.
	TransportOffset int
}

// Decode parses b, an IP packet starting at the IP header, into p,
// overwriting all of p. It sniffs the version from the first nibble.
// It never allocates and does not retain b.
func (p *Parsed) Decode(b []byte) { p.decode(b, 0) }

// DecodeVersion is Decode for a caller whose link layer already announced
// the family (an EtherType, NFQUEUE's hardware protocol): version is 4 or
// 6, and a packet whose version nibble disagrees gets BadVersion.
func (p *Parsed) DecodeVersion(b []byte, version uint8) { p.decode(b, version) }

func (p *Parsed) decode(b []byte, want uint8) {
	*p = Parsed{}
	if len(b) == 0 {
		p.Status = NotIP
		return
	}
	v := b[0] >> 4
	if want != 0 && v != want {
		p.Status = BadVersion
		return
	}
	switch v {
	case 4:
		p.decode4(b)
	case 6:
		p.decode6(b)
	default:
		p.Status = NotIP
	}
}

func (p *Parsed) decode4(b []byte) {
	p.IPVersion = 4
	if len(b) < 20 {
		p.Status = Truncated
		return
	}
	ihl := int(b[0]&0x0f) * 4
	if ihl < 20 {
		p.Status = BadHeaderLength
		return
	}
	p.Src = netip.AddrFrom4([4]byte(b[12:16]))
	p.Dst = netip.AddrFrom4([4]byte(b[16:20]))
	p.Proto = IPProto(b[9])

	end := int(binary.BigEndian.Uint16(b[2:4]))
	switch {
	case end == 0:
		// The kernel writes 0 in GSO and BIG TCP packets above 64 KiB;
		// the real length is whatever is there.
		end = len(b)
	case end < ihl:
		p.Length = end
		p.Status = BadTotalLength
		return
	}
	p.Length = end

	frag := binary.BigEndian.Uint16(b[6:8])
	if frag&0x1fff != 0 {
		p.Frag = LaterFragment
		p.Status = OK
		return
	}
	if frag&0x2000 != 0 {
		p.Frag = FirstFragment
	}
	if ihl > len(b) {
		// The options run past the capture, but end >= ihl: a cut capture.
		p.Status = Snapped
		return
	}
	p.transport(b, ihl, end)
}

func (p *Parsed) decode6(b []byte) {
	p.IPVersion = 6
	if len(b) < 40 {
		p.Status = Truncated
		return
	}
	p.Src = netip.AddrFrom16([16]byte(b[8:24]))
	p.Dst = netip.AddrFrom16([16]byte(b[24:40]))

	end := 40 + int(binary.BigEndian.Uint16(b[4:6]))
	if end == 40 {
		// Payload length 0: a jumbogram or a BIG TCP packet; the real
		// length is whatever is there.
		end = len(b)
	}
	p.Length = end
	limit := min(end, len(b))

	nh := b[6]
	off := 40
	for {
		switch nh {
		case hopByHop, routing, destOpts, authHeader, mobility, hip, shim6, fragmentHdr:
		default:
			p.Proto = IPProto(nh)
			p.transport(b, off, end)
			return
		}
		p.Proto = IPProto(nh)
		if p.ExtHeaders == MaxExtHeaders {
			p.Status = BadExtHeader
			return
		}
		// Every extension header is at least 8 bytes long.
		if off+8 > limit {
			if off+8 > end {
				p.Status = BadExtHeader
			} else {
				p.Status = Snapped
			}
			return
		}
		var n int
		switch nh {
		case fragmentHdr:
			n = 8
		case authHeader:
			n = (int(b[off+1]) + 2) * 4
		default:
			n = (int(b[off+1]) + 1) * 8
		}
		if off+n > end {
			p.Status = BadExtHeader
			return
		}
		p.ExtHeaders++
		if nh == fragmentHdr {
			frag := binary.BigEndian.Uint16(b[off+2 : off+4])
			if frag>>3 != 0 {
				p.Frag = LaterFragment
				p.Proto = IPProto(b[off])
				p.Status = OK
				return
			}
			if frag&1 != 0 {
				p.Frag = FirstFragment
			}
		}
		nh = b[off]
		off += n
	}
}

// transport decodes the transport header at b[off:], where end is the
// packet's declared end.
func (p *Parsed) transport(b []byte, off, end int) {
	p.TransportOffset = off
	n := transportHeaderLen(p.Proto)
	switch {
	case n == 0:
		p.Status = OK
		return
	case off+n > end:
		p.Status = TruncatedTransport
		return
	case off+n > len(b):
		p.Status = Snapped
		return
	}
	switch p.Proto {
	case ICMPv4, ICMPv6:
		p.ICMPType = b[off]
		p.ICMPCode = b[off+1]
	default:
		p.SrcPort = binary.BigEndian.Uint16(b[off : off+2])
		p.DstPort = binary.BigEndian.Uint16(b[off+2 : off+4])
	}
	p.Status = OK
}

// HasPorts reports whether SrcPort and DstPort were decoded.
func (p *Parsed) HasPorts() bool {
	if p.Status != OK || p.Frag == LaterFragment {
		return false
	}
	switch p.Proto {
	case TCP, UDP, UDPLite, SCTP, DCCP:
		return true
	}
	return false
}

// FlowKey identifies the flow a packet belongs to: protocol, addresses and
// ports (zero when unknown, as for ICMP or later fragments).
type FlowKey struct {
	Proto            IPProto
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
}

// FlowKey returns p's flow key. It never allocates.
func (p *Parsed) FlowKey() FlowKey {
	return FlowKey{Proto: p.Proto, Src: p.Src, Dst: p.Dst, SrcPort: p.SrcPort, DstPort: p.DstPort}
}

// String renders the key as "udp 10.0.0.1:1234 > 8.8.8.8:53".
func (k FlowKey) String() string {
	b := make([]byte, 0, 64)
	b = append(b, k.Proto.String()...)
	b = append(b, ' ')
	b = netip.AddrPortFrom(k.Src, k.SrcPort).AppendTo(b)
	b = append(b, " > "...)
	b = netip.AddrPortFrom(k.Dst, k.DstPort).AppendTo(b)
	return string(b)
}

// String summarises p for logs and test failures; it allocates.
func (p *Parsed) String() string {
	b := make([]byte, 0, 96)
	b = append(b, p.Status.String()...)
	if p.IPVersion != 0 {
		b = append(b, " ipv"...)
		b = strconv.AppendUint(b, uint64(p.IPVersion), 10)
	}
	if p.Dst.IsValid() {
		b = append(b, ' ')
		b = append(b, p.FlowKey().String()...)
	}
	if p.Proto == ICMPv4 || p.Proto == ICMPv6 {
		b = append(b, " type "...)
		b = strconv.AppendUint(b, uint64(p.ICMPType), 10)
		b = append(b, " code "...)
		b = strconv.AppendUint(b, uint64(p.ICMPCode), 10)
	}
	if p.Frag != NotFragment {
		b = append(b, " frag "...)
		b = append(b, p.Frag.String()...)
	}
	if p.Length != 0 {
		b = append(b, " len "...)
		b = strconv.AppendInt(b, int64(p.Length), 10)
	}
	return string(b)
}
