package rules

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
)

// Backend is the iptables variant the rules are written with; the empty
// Backend means whatever the node's plain iptables-restore is. Both put the
// same xtables rules in the kernel; they differ in which kernel API holds
// them, and a node must use the one its kubelet and kube-proxy use or the
// two rule sets run side by side in an order nobody chose.
type Backend string

const (
	// BackendNFT is iptables-nft (the nf_tables API).
	BackendNFT Backend = "nft"
	// BackendLegacy is iptables-legacy (the xtables setsockopt API).
	BackendLegacy Backend = "legacy"
)

// ParseBackend reads a --iptables-backend value: "auto" (or "") returns
// the empty Backend, meaning "detect".
func ParseBackend(s string) (Backend, error) {
	switch s {
	case "", "auto":
		return "", nil
	case string(BackendNFT), string(BackendLegacy):
		return Backend(s), nil
	}
	return "", fmt.Errorf("iptables backend %q: want auto, nft or legacy", s)
}

// tool returns the binary of this backend for a family, e.g.
// "ip6tables-legacy-restore". Naming the variant, instead of the
// alternatives symlink, keeps the choice ours whatever the image links;
// the empty Backend names the symlink ("iptables-restore").
func (b Backend) tool(fam Family, kind string) string {
	prefix := "iptables"
	if fam == IPv6 {
		prefix = "ip6tables"
	}
	if b == "" {
		return prefix + "-" + kind
	}
	return prefix + "-" + string(b) + "-" + kind
}

// Detection is a chosen backend and the reason for the choice, for the log.
type Detection struct {
	Backend Backend
	Reason  string
}

// ResolveBackend returns the backend named by a --iptables-backend value,
// detecting it with DetectBackend for "auto".
func ResolveBackend(ctx context.Context, r Runner, choice string) (Detection, error) {
	b, err := ParseBackend(choice)
	if err != nil {
		return Detection{}, err
	}
	if b != "" {
		return Detection{Backend: b, Reason: "set by --iptables-backend"}, nil
	}
	return DetectBackend(ctx, r), nil
}

// kubeletChains are the chains kubelet (1.17+) creates in the mangle table
// of the backend it uses.
var kubeletChains = regexp.MustCompile(`(?m)^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) `)

var ruleLine = regexp.MustCompile(`(?m)^-`)

// DetectBackend picks the backend the way kube-proxy's iptables-wrapper
// does: the backend whose mangle table holds kubelet's hint or canary
// chain wins (nft checked first, as the common case); failing that, the
// backend with more rules; nft on a tie, including a bare node. Errors from
// the tools only mean "nothing seen there".
func DetectBackend(ctx context.Context, r Runner) Detection {
	save := func(b Backend, fam Family, args ...string) []byte {
		out, _ := r.Run(ctx, nil, b.tool(fam, "save"), args...)
		return out
	}
	for _, fam := range []Family{IPv4, IPv6} {
		if kubeletChains.Match(save(BackendNFT, fam, "-t", "mangle")) {
			return Detection{BackendNFT, fmt.Sprintf("kubelet's chains found in the %s nft mangle table", fam)}
		}
	}
	// Not "-t mangle" for legacy: that would create the table.
	legacy := [][]byte{save(BackendLegacy, IPv4), save(BackendLegacy, IPv6)}
	for i, fam := range []Family{IPv4, IPv6} {
		if kubeletChains.Match(legacy[i]) {
			return Detection{BackendLegacy, fmt.Sprintf("kubelet's chains found in the %s legacy mangle table", fam)}
		}
	}
	nft := save(BackendNFT, IPv4)
	nft = append(nft, save(BackendNFT, IPv6)...)
	nLegacy := len(ruleLine.FindAllIndex(bytes.Join(legacy, nil), -1))
	nNFT := len(ruleLine.FindAllIndex(nft, -1))
	if nLegacy > nNFT {
		return Detection{BackendLegacy, fmt.Sprintf("no kubelet chains; legacy has more rules (%d) than nft (%d)", nLegacy, nNFT)}
	}
	return Detection{BackendNFT, fmt.Sprintf("no kubelet chains; nft has as many rules or more (%d) than legacy (%d)", nNFT, nLegacy)}
}
