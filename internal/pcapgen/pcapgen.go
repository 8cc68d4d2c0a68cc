package pcapgen

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/nfmasq/nfmasq/queue/packet"
)

// Class is the kind of destination a flow goes to.
type Class uint8

// Destination classes.
const (
	// Internet: a public address outside every non-masquerade range, so a
	// policy masquerades it.
	Internet Class = iota
	// NonMasquerade: an address inside one of Config.NonMasquerade.
	NonMasquerade
	// LinkLocal: 169.254.0.0/16 or fe80::/64.
	LinkLocal
	numClasses
)

var classNames = [numClasses]string{Internet: "internet", NonMasquerade: "non_masquerade", LinkLocal: "link_local"}

// String returns "internet", "non_masquerade" or "link_local".
func (c Class) String() string {
	if c < numClasses {
		return classNames[c]
	}
	return "unknown"
}

// Config describes a synthetic capture. Zero fields take the defaults
// documented on each; fractions are of flows, drawn per flow, so the
// counts come out near (not exactly at) the fractions; Stats has the
// exact counts.
type Config struct {
	// Flows is the number of flows (at least 1).
	Flows int
	// PacketsPerFlow is the number of packets in each flow (default 1).
	// Packets are written in rounds: the first packet of every flow, then
	// the second of every flow, and so on, as many concurrent flows would
	// interleave.
	PacketsPerFlow int
	// InternetFraction of the flows go to public addresses.
	InternetFraction float64
	// LinkLocalFraction of the flows go to link-local addresses. The rest
	// (1 - InternetFraction - LinkLocalFraction) go to NonMasquerade.
	LinkLocalFraction float64
	// IPv6Fraction of the flows are IPv6.
	IPv6Fraction float64
	// UDPFraction of the flows are UDP; the rest are TCP.
	UDPFraction float64
	// PodCIDR4 and PodCIDR6 hold the pods' source addresses (default
	// 10.244.0.0/16 and fd00:10:244::/64, Kubernetes' customary ranges).
	PodCIDR4, PodCIDR6 netip.Prefix
	// Pods is the number of distinct pod addresses per family (default
	// 64). It grows if needed so that every flow has its own source port.
	Pods int
	// NonMasquerade are the ranges non-masquerade destinations are drawn
	// from, uniformly by range, and that internet destinations avoid
	// (default RFC 1918 and fd00::/8).
	NonMasquerade []netip.Prefix
	// PayloadSize is the number of payload bytes in each packet but TCP
	// SYNs (default 0: headers only).
	PayloadSize int
	// Seed makes the capture: the same Config gives the same bytes.
	Seed uint64
	// LinkType is LinkTypeRaw (the default) or LinkTypeEthernet.
	LinkType layers.LinkType
}

// Defaults for Config's zero fields.
var (
	DefaultPodCIDR4      = netip.MustParsePrefix("10.244.0.0/16")
	DefaultPodCIDR6      = netip.MustParsePrefix("fd00:10:244::/64")
	DefaultNonMasquerade = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("fd00::/8"),
	}
)

const (
	defaultPods = 64
	// portsPerPod is the source ports a pod uses, 1024 to 65535.
	portsPerPod = 65536 - 1024
	// maxPayload keeps every packet within a 64 KiB IP datagram.
	maxPayload = 65535 - 60 - 20
)

// notInternet are the IPv4 and IPv6 ranges an internet destination is
// never drawn from: special-purpose (RFC 6890), multicast and reserved
// space, so that whatever policy replays the capture, an internet flow is
// masqueraded unless the policy lists public space on purpose.
var notInternet = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("192.88.99.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("224.0.0.0/3"),
	netip.MustParsePrefix("2001::/23"),
	netip.MustParsePrefix("2001:db8::/32"),
	netip.MustParsePrefix("2002::/16"),
}

var (
	linkLocal4 = netip.MustParsePrefix("169.254.0.0/16")
	linkLocal6 = netip.MustParsePrefix("fe80::/64")
	// Customary destination ports, so that flows look like pod traffic.
	tcpPorts = []uint16{443, 443, 443, 80, 8080, 5432, 3306, 6379, 9092, 22}
	udpPorts = []uint16{53, 53, 53, 443, 123, 5353, 4789, 8125, 514, 161}
)

// Generator makes the flows and packets of one Config. It is immutable
// and safe for concurrent use.
type Generator struct {
	cfg        Config
	nonMasq4   []netip.Prefix
	nonMasq6   []netip.Prefix
	notPublic4 []netip.Prefix
	notPublic6 []netip.Prefix
}

// New validates cfg, fills in its defaults and returns its Generator.
func New(cfg Config) (*Generator, error) {
	if cfg.Flows < 1 {
		return nil, fmt.Errorf("flows must be at least 1, not %d", cfg.Flows)
	}
	if cfg.PacketsPerFlow == 0 {
		cfg.PacketsPerFlow = 1
	}
	if cfg.PacketsPerFlow < 1 {
		return nil, fmt.Errorf("packets per flow must be at least 1, not %d", cfg.PacketsPerFlow)
	}
	for _, f := range []struct {
		name string
		v    float64
	}{
		{"internet fraction", cfg.InternetFraction},
		{"link-local fraction", cfg.LinkLocalFraction},
		{"ipv6 fraction", cfg.IPv6Fraction},
		{"udp fraction", cfg.UDPFraction},
	} {
		// Written so that NaN fails too.
		if !(f.v >= 0 && f.v <= 1) {
			return nil, fmt.Errorf("%s must be between 0 and 1, not %v", f.name, f.v)
		}
	}
	if cfg.InternetFraction+cfg.LinkLocalFraction > 1 {
		return nil, fmt.Errorf("internet fraction %v and link-local fraction %v add up to more than 1", cfg.InternetFraction, cfg.LinkLocalFraction)
	}
	if cfg.PayloadSize < 0 || cfg.PayloadSize > maxPayload {
		return nil, fmt.Errorf("payload size must be between 0 and %d, not %d", maxPayload, cfg.PayloadSize)
	}
	switch cfg.LinkType {
	case 0:
		cfg.LinkType = layers.LinkTypeRaw
	case layers.LinkTypeRaw, layers.LinkTypeEthernet:
	default:
		return nil, fmt.Errorf("link type %d is not supported: use %d (raw IP) or %d (Ethernet)", cfg.LinkType, layers.LinkTypeRaw, layers.LinkTypeEthernet)
	}
	if !cfg.PodCIDR4.IsValid() {
		cfg.PodCIDR4 = DefaultPodCIDR4
	}
	if !cfg.PodCIDR6.IsValid() {
		cfg.PodCIDR6 = DefaultPodCIDR6
	}
	cfg.PodCIDR4, cfg.PodCIDR6 = cfg.PodCIDR4.Masked(), cfg.PodCIDR6.Masked()
	if !cfg.PodCIDR4.Addr().Is4() || !cfg.PodCIDR6.Addr().Is6() || cfg.PodCIDR6.Addr().Is4In6() {
		return nil, fmt.Errorf("pod CIDRs %s and %s must be IPv4 and IPv6", cfg.PodCIDR4, cfg.PodCIDR6)
	}
	if cfg.Pods == 0 {
		cfg.Pods = defaultPods
	}
	if cfg.Pods < 0 {
		return nil, fmt.Errorf("pods must be positive, not %d", cfg.Pods)
	}
	cfg.Pods = max(cfg.Pods, (cfg.Flows+portsPerPod-1)/portsPerPod)
	for _, pc := range []netip.Prefix{cfg.PodCIDR4, cfg.PodCIDR6} {
		// The network address and the first (gateway) address are not pods.
		if hostBits := pc.Addr().BitLen() - pc.Bits(); hostBits < 63 && uint64(cfg.Pods)+2 > 1<<hostBits {
			return nil, fmt.Errorf("pod CIDR %s holds fewer than %d pods", pc, cfg.Pods)
		}
	}
	if cfg.NonMasquerade == nil {
		cfg.NonMasquerade = DefaultNonMasquerade
	}

	g := &Generator{}
	for _, p := range cfg.NonMasquerade {
		if !p.IsValid() {
			return nil, errors.New("non-masquerade prefix is not valid")
		}
		p = p.Masked()
		if p.Addr().Is4() {
			g.nonMasq4 = append(g.nonMasq4, p)
		} else {
			g.nonMasq6 = append(g.nonMasq6, p)
		}
	}
	internal := 1 - cfg.InternetFraction - cfg.LinkLocalFraction
	if internal > 0 && cfg.IPv6Fraction < 1 && len(g.nonMasq4) == 0 {
		return nil, errors.New("non-masquerade IPv4 flows are asked for, but no IPv4 non-masquerade prefix is given")
	}
	if internal > 0 && cfg.IPv6Fraction > 0 && len(g.nonMasq6) == 0 {
		return nil, errors.New("non-masquerade IPv6 flows are asked for, but no IPv6 non-masquerade prefix is given")
	}
	for _, p := range append(notInternet, cfg.NonMasquerade...) {
		if p.Addr().Is4() {
			g.notPublic4 = append(g.notPublic4, p.Masked())
		} else {
			g.notPublic6 = append(g.notPublic6, p.Masked())
		}
	}
	if internetBlocked(g.notPublic4) || internetBlocked(g.notPublic6) {
		return nil, errors.New("the non-masquerade prefixes cover the whole internet: there is no internet destination to draw")
	}
	cfg.NonMasquerade = append([]netip.Prefix(nil), cfg.NonMasquerade...)
	g.cfg = cfg
	return g, nil
}

// internetBlocked reports whether a default route is among the ranges,
// which would make drawing an internet address loop for ever.
func internetBlocked(ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Bits() == 0 {
			return true
		}
	}
	return false
}

// Config returns the Config with its defaults filled in.
func (g *Generator) Config() Config {
	c := g.cfg
	c.NonMasquerade = append([]netip.Prefix(nil), c.NonMasquerade...)
	return c
}

// Flow is one generated flow.
type Flow struct {
	// Index is the flow's number, 0 to Config.Flows-1.
	Index int
	// Class is the kind of destination.
	Class Class
	// Proto is packet.TCP or packet.UDP.
	Proto packet.IPProto
	// Src is the pod's address and source port; Dst the destination's.
	Src, Dst netip.AddrPort
	// ISN is the TCP initial sequence number, and seeds the IPv4 IDs.
	ISN uint32
}

// splitmix64 spreads a flow index over the seed space, so that
// neighbouring flows get unrelated random streams.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// Flow returns flow i. Every flow is a function of the Config and i only,
// so packets can be written in any order without remembering flows.
// Source address and port are unique per flow.
func (g *Generator) Flow(i int) Flow {
	c := &g.cfg
	rng := rand.New(rand.NewPCG(c.Seed, splitmix64(uint64(i))))
	f := Flow{Index: i, Proto: packet.TCP, ISN: rng.Uint32()}
	v6 := rng.Float64() < c.IPv6Fraction
	if rng.Float64() < c.UDPFraction {
		f.Proto = packet.UDP
	}
	switch u := rng.Float64(); {
	case u < c.InternetFraction:
		f.Class = Internet
	case u < c.InternetFraction+c.LinkLocalFraction:
		f.Class = LinkLocal
	default:
		f.Class = NonMasquerade
	}

	pod, port := i%c.Pods, 1024+(i/c.Pods)%portsPerPod
	podCIDR := c.PodCIDR4
	if v6 {
		podCIDR = c.PodCIDR6
	}
	f.Src = netip.AddrPortFrom(addOffset(podCIDR.Addr(), uint64(pod)+2), uint16(port))

	var dst netip.Addr
	switch f.Class {
	case Internet:
		dst = g.internet(rng, v6)
	case LinkLocal:
		if v6 {
			dst = randomIn(rng, linkLocal6)
		} else {
			dst = randomIn(rng, linkLocal4)
		}
	default:
		ps := g.nonMasq4
		if v6 {
			ps = g.nonMasq6
		}
		dst = randomIn(rng, ps[rng.IntN(len(ps))])
	}
	ports := tcpPorts
	if f.Proto == packet.UDP {
		ports = udpPorts
	}
	f.Dst = netip.AddrPortFrom(dst, ports[rng.IntN(len(ports))])
	return f
}

// internet draws a public address outside every non-masquerade range.
func (g *Generator) internet(rng *rand.Rand, v6 bool) netip.Addr {
	if v6 {
		global := netip.MustParsePrefix("2000::/3")
		for {
			a := randomIn(rng, global)
			if !containedIn(g.notPublic6, a) {
				return a
			}
		}
	}
	for {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], rng.Uint32())
		if a := netip.AddrFrom4(b); !containedIn(g.notPublic4, a) {
			return a
		}
	}
}

func containedIn(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// randomIn returns a random address in p.
func randomIn(rng *rand.Rand, p netip.Prefix) netip.Addr {
	b := p.Addr().As16()
	start := 0
	if p.Addr().Is4() {
		start = 12
	}
	var r [16]byte
	binary.BigEndian.PutUint64(r[:8], rng.Uint64())
	binary.BigEndian.PutUint64(r[8:], rng.Uint64())
	bits := p.Bits() + start*8
	for i := start; i < 16; i++ {
		switch {
		case bits >= (i+1)*8:
		case bits <= i*8:
			b[i] = r[i]
		default:
			keep := byte(0xff) << (8 - (bits - i*8))
			b[i] = b[i]&keep | r[i]&^keep
		}
	}
	if p.Addr().Is4() {
		return netip.AddrFrom4([4]byte(b[12:]))
	}
	return netip.AddrFrom16(b)
}

// addOffset returns a + n, within the last 64 bits.
func addOffset(a netip.Addr, n uint64) netip.Addr {
	b := a.As16()
	binary.BigEndian.PutUint64(b[8:], binary.BigEndian.Uint64(b[8:])+n)
	if a.Is4() {
		return netip.AddrFrom4([4]byte(b[12:]))
	}
	return netip.AddrFrom16(b)
}

// TCP flags the generator sets.
const (
	tcpSYN = 0x02
	tcpPSH = 0x08
	tcpACK = 0x10
)

// AppendPacket appends packet n (0-based) of flow f to dst as an IP
// packet with valid checksums: for TCP a SYN first, then ACK|PSH segments
// carrying payload bytes; for UDP a datagram of payload bytes. The
// payload is zeros.
func AppendPacket(dst []byte, f Flow, n, payload int) []byte {
	tl := 8
	if f.Proto == packet.TCP {
		tl = 20
		if n == 0 {
			payload = 0
		}
	}
	start := len(dst)
	v6 := f.Src.Addr().Is6()
	ipLen := 20
	if v6 {
		ipLen = 40
	}
	total := ipLen + tl + payload
	dst = slices.Grow(dst, total)[:start+total]
	b := dst[start:]
	clear(b)
	src, dstAddr := f.Src.Addr().AsSlice(), f.Dst.Addr().AsSlice()
	if v6 {
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[4:6], uint16(tl+payload))
		b[6] = byte(f.Proto)
		b[7] = 64
		copy(b[8:24], src)
		copy(b[24:40], dstAddr)
	} else {
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:4], uint16(total))
		binary.BigEndian.PutUint16(b[4:6], uint16(f.ISN)+uint16(n))
		b[6] = 0x40 // don't fragment
		b[8] = 64
		b[9] = byte(f.Proto)
		copy(b[12:16], src)
		copy(b[16:20], dstAddr)
		binary.BigEndian.PutUint16(b[10:12], ^checksum(0, b[:20]))
	}
	t := b[ipLen:]
	binary.BigEndian.PutUint16(t[0:2], f.Src.Port())
	binary.BigEndian.PutUint16(t[2:4], f.Dst.Port())
	csumOff := 6
	if f.Proto == packet.TCP {
		seq := f.ISN
		if n > 0 {
			seq += 1 + uint32(n-1)*uint32(payload)
		}
		binary.BigEndian.PutUint32(t[4:8], seq)
		t[12] = 5 << 4
		if n == 0 {
			t[13] = tcpSYN
		} else {
			// The peer's sequence numbers are unknown in a one-way
			// capture; any acknowledgment number will do.
			binary.BigEndian.PutUint32(t[8:12], 1)
			t[13] = tcpACK | tcpPSH
		}
		binary.BigEndian.PutUint16(t[14:16], 64240)
		csumOff = 16
	} else {
		binary.BigEndian.PutUint16(t[4:6], uint16(tl+payload))
	}
	// Pseudo-header: addresses, protocol and transport length.
	sum := uint32(checksum(0, src)) + uint32(checksum(0, dstAddr)) + uint32(f.Proto) + uint32(tl+payload)
	c := ^checksum(sum, t)
	if c == 0 && f.Proto == packet.UDP {
		// UDP sends a computed zero as all ones; zero means "none".
		c = 0xffff
	}
	binary.BigEndian.PutUint16(t[csumOff:], c)
	return dst
}

// checksum adds b to the ones' complement sum and folds it to 16 bits.
func checksum(sum uint32, b []byte) uint16 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// Stats counts what a capture holds.
type Stats struct {
	Packets uint64 `json:"packets"`
	Flows   uint64 `json:"flows"`
	// Classes counts flows by destination class.
	Classes map[string]uint64 `json:"classes"`
	IPv4    uint64            `json:"ipv4_flows"`
	IPv6    uint64            `json:"ipv6_flows"`
	TCP     uint64            `json:"tcp_flows"`
	UDP     uint64            `json:"udp_flows"`
	Bytes   uint64            `json:"bytes"`
}

// Ethernet addresses of generated frames: locally administered, unicast.
var (
	podMAC  = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	nodeMAC = [6]byte{0x02, 0, 0, 0, 0, 0x02}
)

// epoch is the first packet's timestamp; later packets are 1µs apart, so
// that the capture does not depend on the clock.
var epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// WritePcap writes the capture as pcap (microsecond timestamps) to w and
// returns what it holds, counting the bytes written.
func (g *Generator) WritePcap(w io.Writer) (Stats, error) {
	cw := &countingWriter{w: w}
	bw := bufio.NewWriterSize(cw, 256<<10)
	pw := pcapgo.NewWriter(bw)
	if err := pw.WriteFileHeader(65535, g.cfg.LinkType); err != nil {
		return Stats{}, err
	}
	st := Stats{Classes: map[string]uint64{}}
	for c := range numClasses {
		st.Classes[c.String()] = 0
	}
	var classes [numClasses]uint64
	buf := make([]byte, 0, 128+g.cfg.PayloadSize)
	for round := range g.cfg.PacketsPerFlow {
		for i := range g.cfg.Flows {
			f := g.Flow(i)
			if round == 0 {
				st.Flows++
				classes[f.Class]++
				if f.Src.Addr().Is6() {
					st.IPv6++
				} else {
					st.IPv4++
				}
				if f.Proto == packet.UDP {
					st.UDP++
				} else {
					st.TCP++
				}
			}
			buf = buf[:0]
			if g.cfg.LinkType == layers.LinkTypeEthernet {
				et := uint16(0x0800)
				if f.Src.Addr().Is6() {
					et = 0x86dd
				}
				buf = append(buf, nodeMAC[:]...)
				buf = append(buf, podMAC[:]...)
				buf = binary.BigEndian.AppendUint16(buf, et)
			}
			buf = AppendPacket(buf, f, round, g.cfg.PayloadSize)
			ci := gopacket.CaptureInfo{
				Timestamp:     epoch.Add(time.Duration(st.Packets) * time.Microsecond),
				CaptureLength: len(buf),
				Length:        len(buf),
			}
			if err := pw.WritePacket(ci, buf); err != nil {
				return Stats{}, err
			}
			st.Packets++
		}
	}
	if err := bw.Flush(); err != nil {
		return Stats{}, err
	}
	for c, n := range classes {
		st.Classes[Class(c).String()] = n
	}
	st.Bytes = cw.n
	return st, nil
}

type countingWriter struct {
	w io.Writer
	n uint64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += uint64(n)
	return n, err
}
