package agent

import (
	"bytes"
	"fmt"
	"os"
	"slices"

	"github.com/nfmasq/nfmasq/nat"
)

// PolicySource is where a policy comes from: ip-masq-agent's config file,
// EgressNATPolicy files, cluster ranges, and the flags that shape them.
// The agent loads it at every reload; explain, config, rules and replay
// load it once. A PolicySource is not safe for concurrent use.
type PolicySource struct {
	ConfigPath         string
	EnableIPv6         bool
	AllReservedRanges  bool
	Agent              bool // false models a cluster without the masquerade agent
	DisableDefaultSNAT bool
	EgressPolicyFiles  []string
	ClusterCIDRs       []string

	// last is the last successful load, returned again while the files
	// hold the same bytes: the agent reloads at every resync and on
	// every event in the config directory, and a 100,000-CIDR policy
	// costs about 50 ms of CPU to rebuild.
	last *loaded
}

// loaded is a load's result and the inputs and bytes it was built from.
type loaded struct {
	inputs   string
	config   []byte // nil: not read (without the agent)
	egress   [][]byte
	policy   *nat.Policy
	warnings []string
}

// same reports whether the inputs are those l was built from.
func (l *loaded) same(inputs string, config []byte, egress [][]byte) bool {
	return l != nil && l.inputs == inputs && bytes.Equal(l.config, config) && (l.config == nil) == (config == nil) &&
		slices.EqualFunc(l.egress, egress, bytes.Equal)
}

// Load reads the config file and egress policy files and compiles the
// Policy. The warnings are for the operator: unknown config keys, a
// missing config file, skipped egress objects. Notes on flags that had no
// effect are in the Policy's Notes. An error means no Policy: a bad config
// file, an unreadable egress policy file, a bad cluster range.
func (s *PolicySource) Load() (*nat.Policy, []string, error) {
	// Without the agent nobody reads the config file, so neither do we: its
	// errors would not matter either.
	var config []byte
	var configErr error
	if s.Agent {
		config, configErr = os.ReadFile(s.ConfigPath)
	}
	egress := make([][]byte, len(s.EgressPolicyFiles))
	for i, path := range s.EgressPolicyFiles {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("--egress-policy: %w", err)
		}
		egress[i] = data
	}
	inputs := fmt.Sprintf("%q %t %t %t %t %q %q", s.ConfigPath, s.EnableIPv6, s.AllReservedRanges, s.Agent, s.DisableDefaultSNAT, s.EgressPolicyFiles, s.ClusterCIDRs)
	if configErr == nil && s.last.same(inputs, config, egress) {
		return s.last.policy, slices.Clone(s.last.warnings), nil
	}

	var warnings []string
	in := nat.Input{
		Config:             nat.DefaultConfig(s.AllReservedRanges),
		EnableIPv6:         s.EnableIPv6,
		AllReservedRanges:  s.AllReservedRanges,
		NoAgent:            !s.Agent,
		DisableDefaultSNAT: s.DisableDefaultSNAT,
		UseEgressPolicies:  len(s.EgressPolicyFiles) > 0,
	}
	if s.Agent {
		cfg, cfgWarnings, err := nat.ConfigFile(s.ConfigPath, config, configErr, nat.ParseOptions{
			AllReservedRanges: s.AllReservedRanges,
			EnableIPv6:        s.EnableIPv6,
		})
		if err != nil {
			return nil, nil, err
		}
		in.Config = cfg
		for _, w := range cfgWarnings {
			warnings = append(warnings, w.String())
		}
	}

	definedIn := map[string]string{}
	for i, path := range s.EgressPolicyFiles {
		policies, errs := nat.ParseEgressPolicies(egress[i])
		for _, err := range errs {
			warnings = append(warnings, fmt.Sprintf("%s: %v; skipped", path, err))
		}
		for _, p := range policies {
			// Names are unique in a cluster; two files defining one name are
			// two versions of one object, and only one can be in force.
			if first, dup := definedIn[p.Name]; dup {
				warnings = append(warnings, fmt.Sprintf("%s: %s %q is also defined in %s; skipped", path, nat.EgressPolicyKind, p.Name, first))
				continue
			}
			definedIn[p.Name] = path
			in.EgressPolicies = append(in.EgressPolicies, p)
		}
	}

	for _, c := range s.ClusterCIDRs {
		p, err := nat.ParseCIDR(c)
		if err != nil {
			return nil, nil, fmt.Errorf("--cluster-cidr: %w", err)
		}
		in.ClusterCIDRs = append(in.ClusterCIDRs, p)
	}

	p, err := nat.Compile(in)
	if err != nil {
		return nil, nil, err
	}
	// A missing file (configErr set, config nil) is not remembered: it
	// costs nothing to load again.
	if configErr == nil {
		s.last = &loaded{inputs: inputs, config: config, egress: egress, policy: p, warnings: slices.Clone(warnings)}
	}
	return p, warnings, nil
}
