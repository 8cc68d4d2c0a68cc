package nat

import (
	"fmt"
	"net"
	"net/netip"
)

// These formats are ip-masq-agent's own, so that operators moving from it
// recognise the errors.
const (
	cidrParseErrFmt = "CIDR %q could not be parsed, %v"
	cidrAlignErrFmt = "CIDR %q is not aligned to a CIDR block, ip: %q network: %q"
)

// ParseCIDR validates s exactly as ip-masq-agent validates a
// nonMasqueradeCIDRs entry (net.ParseCIDR, then alignment), with its error
// texts, and returns it as a canonical netip.Prefix. IPv4-mapped IPv6
// prefixes are refused. Flags that take CIDRs use it so their errors read
// like the config file's.
func ParseCIDR(s string) (netip.Prefix, error) { return parseCIDR(s) }

// parseCIDR is ParseCIDR.
//
// net.ParseCIDR rather than netip.ParsePrefix decides what is accepted, so a
// file upstream accepts (for example "10.0.0.0/08") is accepted here too.
func parseCIDR(s string) (netip.Prefix, error) {
	// Fast path: what netip accepts, net accepts with the same meaning
	// (net.ParseCIDR parses the address with netip and is laxer only about
	// the length, e.g. leading zeros). Everything else, errors included,
	// takes upstream's path for upstream's texts.
	if p, err := netip.ParsePrefix(s); err == nil && p.Masked() == p && !p.Addr().Is4In6() {
		return p, nil
	}
	ip, ipnet, err := net.ParseCIDR(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf(cidrParseErrFmt, s, err)
	}
	if !ip.Equal(ipnet.IP) {
		return netip.Prefix{}, fmt.Errorf(cidrAlignErrFmt, s, ip, ipnet.String())
	}
	addr, ok := netip.AddrFromSlice(ipnet.IP)
	if !ok {
		return netip.Prefix{}, fmt.Errorf(cidrParseErrFmt, s, "invalid address")
	}
	// An IPv4 CIDR comes back from net.ParseCIDR as a 4-byte network, so a
	// mapped 16-byte one was written as "::ffff:a.b.c.d/n". Upstream treats
	// it as IPv4 yet hands the original text to iptables, which rejects it;
	// which family the operator meant is unclear, so we refuse.
	if addr.Is4In6() {
		return netip.Prefix{}, fmt.Errorf("CIDR %q is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR", s)
	}
	ones, _ := ipnet.Mask.Size()
	return netip.PrefixFrom(addr, ones), nil
}

// checkPrefix validates a prefix that arrives already parsed (cluster
// ranges from flags or callers): it must be valid, canonical and of a
// definite family.
func checkPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("invalid prefix %q", p)
	case p.Addr().Zone() != "":
		return fmt.Errorf("prefix %s has a zone", p)
	case p.Addr().Is4In6():
		return fmt.Errorf("CIDR %q is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR", p)
	case p.Masked() != p:
		return fmt.Errorf(cidrAlignErrFmt, p.String(), p.Addr().String(), p.Masked().String())
	}
	return nil
}
