package main

import (
	"encoding/binary"
	"net/netip"
)

// Flow tuples: the source cycles through flowPorts ports on each of
// flowAddrs pod addresses, so consecutive packets are distinct flows for
// flowPorts*flowAddrs packets, far more than one trial sends.
const (
	flowPortBase = 1024
	flowPorts    = 65536 - flowPortBase
	flowAddrs    = 250 // 10.244.0.2 … 10.244.0.251
	// Destination ports cycle too: masqueraded flows share the node's
	// address, and MASQUERADE --to-ports 32768-65535 has 32,768 source
	// ports per destination address and port. With one destination port
	// a burst beyond that many flows fails in NAT, not in the dataplane.
	flowDstPortBase = 10000
	flowDstPorts    = 50000
	flowPayload     = 16
	flowPacketSz    = 20 + 8 + flowPayload
)

// flowSource returns the pod address and source port of flow i.
func flowSource(pod netip.Prefix, i uint64) netip.AddrPort {
	a := pod.Addr().As4()
	host := 2 + (i/flowPorts)%flowAddrs
	a[3] += byte(host)
	return netip.AddrPortFrom(netip.AddrFrom4(a), uint16(flowPortBase+i%flowPorts))
}

// flowDstPort returns the destination port of flow i.
func flowDstPort(i uint64) uint16 { return uint16(flowDstPortBase + i%flowDstPorts) }

// putFlowPacket writes into b (flowPacketSz bytes) the IPv4/UDP packet of
// flow i from the pod network to dst. The UDP checksum is left 0 (none),
// which IPv4 allows, so building a packet is a few stores.
func putFlowPacket(b []byte, pod netip.Prefix, dst netip.Addr, i uint64) {
	src := flowSource(pod, i)
	_ = b[flowPacketSz-1]
	clear(b[:flowPacketSz])
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], flowPacketSz)
	binary.BigEndian.PutUint16(b[4:], uint16(i))
	b[8], b[9] = 64, 17
	s, d := src.Addr().As4(), dst.As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], ipChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], flowDstPort(i))
	binary.BigEndian.PutUint16(b[24:], 8+flowPayload)
	copy(b[28:], "nfmasq-bench-udp")
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
