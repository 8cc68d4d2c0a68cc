package replay

import (
	"encoding/binary"
	"fmt"
	"strconv"

	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/queue/packet"
)

// Link types whose header IPPacket strips. The values are tcpdump's
// LINKTYPE_ numbers, as written in capture files.
const (
	LinkNull     = layers.LinkTypeNull     // 0: BSD loopback, host-order address family
	LinkEthernet = layers.LinkTypeEthernet // 1
	LinkRaw      = layers.LinkTypeRaw      // 101: IPv4 or IPv6, by the version nibble
	LinkLoop     = layers.LinkTypeLoop     // 108: OpenBSD loopback, network-order family
	LinkSLL      = layers.LinkTypeLinuxSLL // 113: Linux cooked capture v1
	LinkIPv4     = layers.LinkTypeIPv4     // 228
	LinkIPv6     = layers.LinkTypeIPv6     // 229
	LinkSLL2     = layers.LinkType(276)    // Linux cooked capture v2
)

// SkipKind is the class of reason a record was not replayed.
type SkipKind uint8

// Skip kinds. Each names a Skip; Skip.String gives the reason as written in
// a Summary.
const (
	// NotSkipped is the zero SkipKind: the record carried an IP packet.
	NotSkipped SkipKind = iota
	// SkipLinkType: a link type IPPacket does not know ("linktype:<n>").
	SkipLinkType
	// SkipEtherType: an Ethernet or Linux cooked frame that carries
	// something other than IP ("ethertype:0x0806").
	SkipEtherType
	// SkipLLC: an IEEE 802.3 frame (length instead of EtherType) ("llc").
	SkipLLC
	// SkipFamily: a loopback frame of an address family other than IP
	// ("family:<n>").
	SkipFamily
	// SkipShortLink: the record ends inside the link header
	// ("short_link_header").
	SkipShortLink
	// SkipDecode: the IP decoder rejected the packet; Code is its
	// packet.Status, and the reason is the status name ("bad_version").
	SkipDecode
	// SkipNotFromPod: the IP packet's source is outside the pod CIDRs the
	// Replayer was given, so the agent would not see it ("not_from_pod").
	SkipNotFromPod
	// SkipTruncatedRecord: the capture file ends inside a record
	// ("truncated_record").
	SkipTruncatedRecord
	// SkipBadRecord: the record header is inconsistent (a capture length
	// beyond the snap length, a pcapng block that does not parse), so the
	// rest of the file cannot be trusted ("bad_record").
	SkipBadRecord
)

// Skip is why one record was not replayed as an IP packet. It is a small
// comparable value, so counting Skips in a map does not allocate; String
// formats it only when a Summary is built.
type Skip struct {
	Kind SkipKind
	// Code is the link type, EtherType, address family or packet.Status the
	// Kind refers to, and 0 for kinds without one.
	Code uint32
}

// String returns the reason as written in a Summary's skipped map.
func (s Skip) String() string {
	switch s.Kind {
	case NotSkipped:
		return "none"
	case SkipLinkType:
		return "linktype:" + strconv.FormatUint(uint64(s.Code), 10)
	case SkipEtherType:
		return fmt.Sprintf("ethertype:0x%04x", s.Code)
	case SkipLLC:
		return "llc"
	case SkipFamily:
		return "family:" + strconv.FormatUint(uint64(s.Code), 10)
	case SkipShortLink:
		return "short_link_header"
	case SkipDecode:
		if s.Code < uint32(packet.NumStatus) {
			return packet.Status(s.Code).String()
		}
		return "status_" + strconv.FormatUint(uint64(s.Code), 10)
	case SkipNotFromPod:
		return "not_from_pod"
	case SkipTruncatedRecord:
		return "truncated_record"
	case SkipBadRecord:
		return "bad_record"
	}
	return "skip_" + strconv.Itoa(int(s.Kind))
}

// EtherTypes IPPacket follows. VLAN tags (802.1Q, 802.1ad and the older
// 0x9100 QinQ) are walked over, since pod traffic on a trunk carries them.
const (
	etherTypeIPv4  = 0x0800
	etherTypeIPv6  = 0x86dd
	etherTypeVLAN  = 0x8100
	etherTypeQinQ  = 0x88a8
	etherTypeQinQ2 = 0x9100
	// Below this, the EtherType field of an Ethernet frame is an 802.3
	// length.
	minEtherType = 0x0600
)

// Loopback address families: AF_INET is 2 everywhere, AF_INET6 differs by
// the operating system that wrote the capture.
const (
	afInet         = 2
	afInet6Linux   = 10
	afInet6BSD     = 24 // NetBSD, OpenBSD
	afInet6FreeBSD = 28
	afInet6Darwin  = 30
)

// IPPacket strips the link header of one capture record of link type lt.
// It returns the IP packet and the IP version the link layer announced (4
// or 6, or 0 when it announces none, as LINKTYPE_RAW does), or a Skip
// saying why the record carries no IP packet. ip aliases frame. It never
// allocates.
func IPPacket(lt layers.LinkType, frame []byte) (ip []byte, version uint8, skip Skip) {
	switch lt {
	case LinkEthernet:
		if len(frame) < 14 {
			return nil, 0, Skip{Kind: SkipShortLink}
		}
		return etherPayload(binary.BigEndian.Uint16(frame[12:14]), frame[14:], true)
	case LinkRaw:
		return frame, 0, Skip{}
	case LinkIPv4:
		return frame, 4, Skip{}
	case LinkIPv6:
		return frame, 6, Skip{}
	case LinkSLL:
		if len(frame) < 16 {
			return nil, 0, Skip{Kind: SkipShortLink}
		}
		return etherPayload(binary.BigEndian.Uint16(frame[14:16]), frame[16:], false)
	case LinkSLL2:
		if len(frame) < 20 {
			return nil, 0, Skip{Kind: SkipShortLink}
		}
		return etherPayload(binary.BigEndian.Uint16(frame[0:2]), frame[20:], false)
	case LinkNull, LinkLoop:
		if len(frame) < 4 {
			return nil, 0, Skip{Kind: SkipShortLink}
		}
		fam := binary.BigEndian.Uint32(frame[0:4])
		if lt == LinkNull && fam > 0xffff {
			// DLT_NULL's family is in the byte order of the machine that
			// wrote the capture; families are small, so a value that only
			// fits the other order is the other order.
			fam = binary.LittleEndian.Uint32(frame[0:4])
		}
		switch fam {
		case afInet:
			return frame[4:], 4, Skip{}
		case afInet6Linux, afInet6BSD, afInet6FreeBSD, afInet6Darwin:
			return frame[4:], 6, Skip{}
		}
		return nil, 0, Skip{Kind: SkipFamily, Code: fam}
	}
	return nil, 0, Skip{Kind: SkipLinkType, Code: uint32(lt)}
}

// etherPayload follows an EtherType, through VLAN tags, to an IP packet.
// ethernet is false for Linux cooked captures, where the protocol field is
// always an EtherType (or a small ARPHRD-specific number, which is not IP
// either).
func etherPayload(et uint16, rest []byte, ethernet bool) ([]byte, uint8, Skip) {
	for et == etherTypeVLAN || et == etherTypeQinQ || et == etherTypeQinQ2 {
		// Every tag takes 4 bytes, so the walk ends with the frame.
		if len(rest) < 4 {
			return nil, 0, Skip{Kind: SkipShortLink}
		}
		et, rest = binary.BigEndian.Uint16(rest[2:4]), rest[4:]
	}
	switch {
	case et == etherTypeIPv4:
		return rest, 4, Skip{}
	case et == etherTypeIPv6:
		return rest, 6, Skip{}
	case ethernet && et < minEtherType:
		return nil, 0, Skip{Kind: SkipLLC}
	}
	return nil, 0, Skip{Kind: SkipEtherType, Code: uint32(et)}
}
