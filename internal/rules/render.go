package rules

import (
	"fmt"
	"strings"
)

// Render returns, for reading, everything Install would apply to a node
// that has no nfmasq state yet: per family, the `ipset restore` input (when
// the fallback uses a set) and the iptables-restore payload, each under a
// comment line naming the command it is for (the plain iptables-restore
// when b is empty).
func Render(cfg Config, b Backend) (string, error) {
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	var out strings.Builder
	for _, fam := range cfg.families() {
		setInput, err := PlanSet(cfg, fam, nil)
		if err != nil {
			return "", err
		}
		if setInput != nil {
			fmt.Fprintf(&out, "# %s: ipset restore\n%s", fam, setInput)
		}
		if policyInput := PlanPolicySets(cfg, fam, nil); policyInput != nil {
			fmt.Fprintf(&out, "# %s: ipset restore (MasqueradePolicy sets)\n%s", fam, policyInput)
		}
		payload, err := Plan(cfg, fam, "")
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&out, "# %s: %s -w --noflush\n%s", fam, b.tool(fam, "restore"), payload)
	}
	return out.String(), nil
}
