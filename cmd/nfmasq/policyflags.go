package main

import (
	"fmt"
	"io"
	"net/netip"

	"github.com/spf13/pflag"

	"github.com/nfmasq/nfmasq/internal/agent"
	"github.com/nfmasq/nfmasq/nat"
)

// policyFlags are the flags that decide the masquerade policy, shared by
// every command that builds one (explain, config, agent, rules, replay).
// Register them, parse, then load; source is what the agent reloads.
type policyFlags struct {
	configPath         string
	enableIPv6         bool
	allReservedRanges  bool
	agent              bool
	disableDefaultSNAT bool
	egressPolicyFiles  []string
	clusterCIDRs       []string
}

// source is the policy source the flags describe.
func (f *policyFlags) source() *agent.PolicySource {
	return &agent.PolicySource{
		ConfigPath:         f.configPath,
		EnableIPv6:         f.enableIPv6,
		AllReservedRanges:  f.allReservedRanges,
		Agent:              f.agent,
		DisableDefaultSNAT: f.disableDefaultSNAT,
		EgressPolicyFiles:  f.egressPolicyFiles,
		ClusterCIDRs:       f.clusterCIDRs,
	}
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

// load compiles the policy the flags describe (agent.PolicySource.Load).
func (f *policyFlags) load() (*nat.Policy, []string, error) { return f.source().Load() }

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
