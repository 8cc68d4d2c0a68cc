package sandbox

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
)

// Addresses of the standard topology. The pod network and the node's
// uplink are private; the remote network answers on several destination
// addresses chosen to land on each side of the default policy. None of
// them is reachable from the host: the remote namespace has no link out.
var (
	PodCIDR4 = netip.MustParsePrefix("10.244.0.0/24")
	PodCIDR6 = netip.MustParsePrefix("fd00:10:244::/64")
	PodAddr4 = netip.MustParseAddr("10.244.0.2")
	PodAddr6 = netip.MustParseAddr("fd00:10:244::2")
	// PodGW is the node's address on the pod network.
	PodGW4 = netip.MustParseAddr("10.244.0.1")
	PodGW6 = netip.MustParseAddr("fd00:10:244::1")

	// NodeAddr is the node's uplink address: the source a masqueraded flow shows.
	NodeAddr4   = netip.MustParseAddr("192.168.77.1")
	NodeAddr6   = netip.MustParseAddr("fd00:77::1")
	RemoteAddr4 = netip.MustParseAddr("192.168.77.2")
	RemoteAddr6 = netip.MustParseAddr("fd00:77::2")

	// Destinations served by the remote namespace.
	Internal4  = netip.MustParseAddr("10.200.0.10")     // in 10.0.0.0/8: a default non-masquerade range
	Internet4  = netip.MustParseAddr("11.0.0.10")       // outside every default range: masqueraded
	CGNAT4     = netip.MustParseAddr("100.64.0.10")     // GKE default (RFC 6598), not upstream's RFC 1918 list
	LinkLocal4 = netip.MustParseAddr("169.254.169.254") // metadata-server style link-local
	Internet6  = netip.MustParseAddr("2001:db8:100::10")
	Internal6  = netip.MustParseAddr("fd00:200::10")
)

// Destinations lists every destination address the remote serves.
var Destinations = []netip.Addr{Internal4, Internet4, CGNAT4, LinkLocal4, Internet6, Internal6}

// Topology is pod <-> node <-> remote. The node forwards between the pod
// network and its uplink; the remote routes the pod CIDRs back through the
// node (like a VPC route), so a flow that keeps the pod address still gets
// its replies.
type Topology struct {
	Pod, Node, Remote *netns.NS
}

// Build creates the topology (the demo, the live benchmark and the kernel
// tests use it).
// On error everything created so far is removed.
func Build(prefix string) (_ *Topology, err error) {
	var made []*netns.NS
	defer func() {
		if err != nil {
			for _, n := range made {
				n.Close()
			}
		}
	}()
	mk := func(role string) (*netns.NS, error) {
		n, err := netns.Create(prefix + "-" + role)
		if err == nil {
			made = append(made, n)
		}
		return n, err
	}
	top := &Topology{}
	if top.Pod, err = mk("pod"); err != nil {
		return nil, err
	}
	if top.Node, err = mk("node"); err != nil {
		return nil, err
	}
	if top.Remote, err = mk("remote"); err != nil {
		return nil, err
	}
	p := func(a netip.Addr, bits int) string { return netip.PrefixFrom(a, bits).String() }
	if err = netns.Veth(top.Pod, "eth0", []string{p(PodAddr4, 24), p(PodAddr6, 64)},
		top.Node, "pod0", []string{p(PodGW4, 24), p(PodGW6, 64)}); err != nil {
		return nil, err
	}
	if err = netns.Veth(top.Node, "eth0", []string{p(NodeAddr4, 24), p(NodeAddr6, 64)},
		top.Remote, "eth0", []string{p(RemoteAddr4, 24), p(RemoteAddr6, 64)}); err != nil {
		return nil, err
	}
	steps := []struct {
		ns   *netns.NS
		args []string
	}{
		{top.Pod, []string{"ip", "route", "add", "default", "via", PodGW4.String()}},
		{top.Pod, []string{"ip", "-6", "route", "add", "default", "via", PodGW6.String()}},
		{top.Node, []string{"ip", "route", "add", "default", "via", RemoteAddr4.String()}},
		{top.Node, []string{"ip", "-6", "route", "add", "default", "via", RemoteAddr6.String()}},
		{top.Remote, []string{"ip", "route", "add", PodCIDR4.String(), "via", NodeAddr4.String()}},
		{top.Remote, []string{"ip", "-6", "route", "add", PodCIDR6.String(), "via", NodeAddr6.String()}},
	}
	for _, d := range Destinations {
		steps = append(steps, struct {
			ns   *netns.NS
			args []string
		}{top.Remote, []string{"ip", "addr", "add", netip.PrefixFrom(d, d.BitLen()).String(), "dev", "lo", "nodad"}})
	}
	for _, s := range steps {
		args := s.args
		if args[len(args)-1] == "nodad" && d4(args) {
			args = args[:len(args)-1]
		}
		if _, err = s.ns.Try(args...); err != nil {
			return nil, err
		}
	}
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv6.conf.all.forwarding", "1"},
	} {
		if err = top.Node.Sysctl(kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("sysctl %s in %s: %w", kv[0], top.Node.Name, err)
		}
	}
	// Carrier on a new veth comes up asynchronously (the kernel's linkwatch
	// may take up to a second); IPv6 routes through a link without carrier
	// are unusable, so wait for it instead of letting the first flow fail.
	deadline := time.Now().Add(5 * time.Second)
	for _, n := range []*netns.NS{top.Pod, top.Node, top.Remote} {
		for {
			out, err := n.Try("ip", "-o", "link", "show", "up")
			if err != nil {
				return nil, err
			}
			if !strings.Contains(out, "NO-CARRIER") && !strings.Contains(out, "state DOWN") {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("links in %s have no carrier after 5s: %s", n.Name, out)
			}
			time.Sleep(10 * time.Millisecond) // polling a kernel state with a deadline
		}
	}
	return top, nil
}

// d4 reports whether an `ip addr add` argument list adds an IPv4 address
// (nodad is an IPv6-only flag).
func d4(args []string) bool {
	for _, a := range args {
		if pfx, err := netip.ParsePrefix(a); err == nil {
			return pfx.Addr().Is4()
		}
	}
	return false
}

// Close removes the three namespaces.
func (top *Topology) Close() {
	for _, n := range []*netns.NS{top.Pod, top.Node, top.Remote} {
		if n != nil {
			n.Close()
		}
	}
}
