package rules

import (
	"net/netip"

	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// kernelPolicySets is one MasqueradePolicy set for the sandbox pod, as the
// agent compiles it: nested prefixes, an except (a nomatch entry), both
// families, both actions.
func kernelPolicySets() []PolicySet {
	p := netip.MustParsePrefix
	return []PolicySet{{
		ID:   "0123abcd",
		Pods: []netip.Addr{sandbox.PodAddr4, sandbox.PodAddr6},
		Destinations: []PolicyDestination{
			{Prefix: p("10.200.0.0/16"), Decides: true, Masquerade: true},
			{Prefix: p("11.0.0.0/8"), Decides: true},
			{Prefix: p("11.0.0.0/24")},
			{Prefix: p("100.64.0.0/10"), Decides: true},
			{Prefix: p("2001:db8::/32"), Decides: true},
			{Prefix: p("fd00:200::/32"), Decides: true, Masquerade: true},
		},
	}}
}
