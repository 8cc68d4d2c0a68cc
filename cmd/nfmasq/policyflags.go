package main

import (
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"

	"github.com/spf13/pflag"

	"github.com/nfmasq/nfmasq/nat"
)

// policyFlags are the flags that decide the masquerade policy, shared by
// every command that builds one (explain, config, agent, rules). Register
// them, parse, then call load; load may be called again to reload.
type policyFlags struct {
	configPath         string
	enableIPv6         bool
	allReservedRanges  bool
	agent              bool
	disableDefaultSNAT bool
	egressPolicyFiles  []string
	clusterCIDRs       []string

	// last is the last successful load, returned again while the files
	// hold the same bytes: the agent reloads at every resync and on
	// every event in the config directory, and a 100,000-CIDR policy
	// costs about 50 ms of CPU to rebuild.
	last *loaded
}

// loaded is a load's result and the flags and bytes it was built from.
type loaded struct {
	flags    string
	config   []byte // nil: not read (without the agent)
	egress   [][]byte
	policy   *nat.Policy
	warnings []string
}

// same reports whether the inputs are those l was built from.
func (l *loaded) same(flags string, config []byte, egress [][]byte) bool {
	return l != nil && l.flags == flags && bytes.Equal(l.config, config) && (l.config == nil) == (config == nil) &&
		slices.EqualFunc(l.egress, egress, bytes.Equal)
}

// register adds the flags every policy-building command has.
func (f *policyFlags) register(fs *pflag.FlagSet) {
	f.agent = true
	fs.StringVar(&f.configPath, "config", nat.DefaultConfigPath,
		"ip-masq-agent config file (YAML or JSON); a missing file means the defaults")
	fs.BoolVar(&f.enableIPv6, "enable-ipv6", false,
		"accept IPv6 CIDRs and masquerade IPv6 (without it IPv6 is never masqueraded)")
	fs.BoolVar(&f.allReservedRanges, "nomasq-all-reserved-ranges", true,
		"default to GKE's 11 non-masquerade ranges; false gives ip-masq-agent's RFC 1918 ranges")
	fs.StringArrayVar(&f.egressPolicyFiles, "egress-policy", nil,
		"file of EgressNATPolicy objects (repeatable); their destinations replace the config file's list, as on Autopilot")
	fs.StringSliceVar(&f.clusterCIDRs, "cluster-cidr", nil,
		"cluster range (pods, services, nodes) never masqueraded (repeatable, or comma-separated)")
}

// registerClusterModel adds the flags that describe a cluster rather than
// the agent (explain, config): whether the masquerade agent runs at all,
// and GKE's --disable-default-snat.
func (f *policyFlags) registerClusterModel(fs *pflag.FlagSet) {
	fs.BoolVar(&f.agent, "agent", true,
		"model a cluster with the masquerade agent; false models one without the DaemonSet")
	fs.BoolVar(&f.disableDefaultSNAT, "disable-default-snat", false,
		"model a cluster created with --disable-default-snat (no effect while the agent runs, as on GKE)")
}

// load reads the config file and egress policy files and compiles the
// Policy. The warnings are for the operator: unknown config keys, a missing
// config file, skipped egress objects. Notes on flags that had no effect are
// in the Policy's Notes. An error means no Policy: a bad config file, an
// unreadable egress policy file, a bad --cluster-cidr.
func (f *policyFlags) load() (*nat.Policy, []string, error) {
	// Without the agent nobody reads the config file, so neither do we: its
	// errors would not matter either.
	var config []byte
	var configErr error
	if f.agent {
		config, configErr = os.ReadFile(f.configPath)
	}
	egress := make([][]byte, len(f.egressPolicyFiles))
	for i, path := range f.egressPolicyFiles {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("--egress-policy: %w", err)
		}
		egress[i] = data
	}
	flags := fmt.Sprintf("%q %t %t %t %t %q %q", f.configPath, f.enableIPv6, f.allReservedRanges, f.agent, f.disableDefaultSNAT, f.egressPolicyFiles, f.clusterCIDRs)
	if configErr == nil && f.last.same(flags, config, egress) {
		return f.last.policy, slices.Clone(f.last.warnings), nil
	}

	var warnings []string
	in := nat.Input{
		Config:             nat.DefaultConfig(f.allReservedRanges),
		EnableIPv6:         f.enableIPv6,
		AllReservedRanges:  f.allReservedRanges,
		NoAgent:            !f.agent,
		DisableDefaultSNAT: f.disableDefaultSNAT,
		UseEgressPolicies:  len(f.egressPolicyFiles) > 0,
	}
	if f.agent {
		cfg, cfgWarnings, err := nat.ConfigFile(f.configPath, config, configErr, nat.ParseOptions{
			AllReservedRanges: f.allReservedRanges,
			EnableIPv6:        f.enableIPv6,
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
	for i, path := range f.egressPolicyFiles {
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

	for _, s := range f.clusterCIDRs {
		p, err := nat.ParseCIDR(s)
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
		f.last = &loaded{flags: flags, config: config, egress: egress, policy: p, warnings: slices.Clone(warnings)}
	}
	return p, warnings, nil
}

// policy is load for commands that print their warnings and notes on w and
// have nothing else to do with them.
func (f *policyFlags) policy(w io.Writer) (*nat.Policy, error) {
	p, warnings, err := f.load()
	if err != nil {
		return nil, err
	}
	printNotices(w, warnings, p.Notes())
	return p, nil
}

// printNotices writes load's warnings and a Policy's notes for the
// operator.
func printNotices(w io.Writer, warnings, notes []string) {
	for _, s := range warnings {
		fmt.Fprintf(w, "warning: %s\n", s)
	}
	for _, s := range notes {
		fmt.Fprintf(w, "note: %s\n", s)
	}
}

// parseDestination parses an explain argument: one IP address, as a packet
// carries it (no zone).
func parseDestination(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	if a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("address %q has a zone; packets carry none", s)
	}
	return a, nil
}
