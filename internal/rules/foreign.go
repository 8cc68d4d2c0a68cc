package rules

import (
	"context"
	"fmt"
	"regexp"
	"strings"
)

// DefaultIPMasqAgentChain is the chain ip-masq-agent installs in the nat
// table unless its --masq-chain names another.
const DefaultIPMasqAgentChain = "IP-MASQ-AGENT"

// ForeignMasquerade looks for ip-masq-agent's rule layout in both
// backends and both families: a nat chain named chain that POSTROUTING
// jumps to and that holds a MASQUERADE rule. Such a chain masquerades
// whatever nfmasq decided. It returns where it found one ("nft/IPv4",
// ...), nothing when it found none. A backend whose tools are missing or
// fail has nothing to find.
func ForeignMasquerade(ctx context.Context, r Runner, chain string) []string {
	if chain == "" {
		return nil
	}
	q := regexp.QuoteMeta(chain)
	jump := regexp.MustCompile(`(?m)^-A POSTROUTING .*-j ` + q + `( |$)`)
	masq := regexp.MustCompile(`(?m)^-A ` + q + ` .*-j MASQUERADE( |$)`)
	var found []string
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		for _, fam := range []Family{IPv4, IPv6} {
			// Only the nat table; but with legacy naming a table
			// creates it, so legacy is saved whole.
			var args []string
			if b == BackendNFT {
				args = []string{"-t", "nat"}
			}
			out, err := r.Run(ctx, nil, b.tool(fam, "save"), args...)
			if err != nil {
				continue
			}
			nat := natSection(string(out))
			if jump.MatchString(nat) && masq.MatchString(nat) {
				found = append(found, fmt.Sprintf("%s/%s", b, fam))
			}
		}
	}
	return found
}

// natSection returns the nat table's part of an iptables-save dump.
func natSection(save string) string {
	start := strings.Index(save, "\n*nat\n")
	if start < 0 {
		if !strings.HasPrefix(save, "*nat\n") {
			return ""
		}
	} else {
		save = save[start+1:]
	}
	if end := strings.Index(save, "\nCOMMIT"); end >= 0 {
		save = save[:end+1]
	}
	return save
}

// ForeignMasquerade is the package function on the installer's runner.
func (in *Installer) ForeignMasquerade(ctx context.Context, chain string) []string {
	return ForeignMasquerade(ctx, in.Runner, chain)
}
