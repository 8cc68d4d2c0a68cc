package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/nfmasq/nfmasq/internal/agent"
	"github.com/nfmasq/nfmasq/internal/mark"
	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/nat"
)

// dataplaneFlags are the flags that shape the kernel rule set. `nfmasq
// rules` and `nfmasq agent` register the same set, so the printed payload
// is the one the agent installs given the same arguments.
type dataplaneFlags struct {
	podCIDRs       []string
	markMask       string
	queueNum       uint16
	queues         uint16
	randomFully    bool
	toPorts        string
	ipsetThreshold int
	backend        string
}

func (d *dataplaneFlags) register(fs *pflag.FlagSet) {
	fs.StringSliceVar(&d.podCIDRs, "pod-cidr", nil,
		"pod CIDR of this node, IPv4 or IPv6 (repeatable or comma-separated); only traffic from these ranges is queued or masqueraded")
	fs.StringVar(&d.markMask, "mark-mask", fmt.Sprintf("%#x", mark.DefaultMask),
		"packet/connection mark bits nfmasq owns (at least 2 bits, clear of kube-proxy's 0xc000 and Calico's 0xffff0000): lowest bit = masquerade, next = passthrough, both = decided by the kernel fallback")
	fs.Uint16Var(&d.queueNum, "queue-num", rules.DefaultQueueNum, "NFQUEUE number (the first one with --queues > 1)")
	fs.Uint16Var(&d.queues, "queues", 1, "number of NFQUEUE queues; more than 1 balances flows over queue-num … queue-num+queues-1")
	fs.BoolVar(&d.randomFully, "random-fully", true, "add --random-fully to MASQUERADE")
	fs.StringVar(&d.toPorts, "to-ports", rules.DefaultToPorts, `source port range of masqueraded TCP, UDP and SCTP flows ("" lets the kernel choose)`)
	fs.IntVar(&d.ipsetThreshold, "ipset-threshold", rules.DefaultIPSetThreshold,
		"the kernel fallback matches up to this many non-masquerade CIDRs with one rule each, and uses an ipset (hash:net) above")
	fs.StringVar(&d.backend, "iptables-backend", "auto", "iptables backend: auto (detect as kube-proxy's iptables-wrapper does), nft or legacy")
}

// dataplane parses the flags. Errors name the flag; RulesConfig says
// when --pod-cidr is missing.
func (d *dataplaneFlags) dataplane() (agent.Dataplane, error) {
	marks, err := mark.Parse(d.markMask)
	if err != nil {
		return agent.Dataplane{}, fmt.Errorf("--mark-mask: %w", err)
	}
	dp := agent.Dataplane{
		Marks:    marks,
		QueueNum: d.queueNum, Queues: d.queues,
		RandomFully: d.randomFully, ToPorts: d.toPorts,
		IPSetThreshold: d.ipsetThreshold,
	}
	for _, s := range d.podCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return agent.Dataplane{}, fmt.Errorf("--pod-cidr: %w", err)
		}
		dp.PodCIDRs = append(dp.PodCIDRs, p)
	}
	return dp, nil
}

// rulesConfig is the rule set the flags and pol give.
func (d *dataplaneFlags) rulesConfig(pol *nat.Policy) (rules.Config, error) {
	dp, err := d.dataplane()
	if err != nil {
		return rules.Config{}, err
	}
	return dp.RulesConfig(pol)
}

func newRulesCmd() *cobra.Command {
	var (
		pf     policyFlags
		df     dataplaneFlags
		mf     masqPolicyFlags
		podIPs []string
	)
	cmd := &cobra.Command{
		Use:   "rules [flags]",
		Short: "Print the iptables and ipset payloads the agent would install, without touching the kernel",
		Long: `Print, for each address family, the ipset restore input (when the kernel
fallback's non-masquerade list is longer than --ipset-threshold) and the
iptables-restore --noflush payload the agent installs on a node that has no
nfmasq state yet. Nothing is read from or written to the kernel; with
--iptables-backend auto the headers name the plain iptables-restore.

With --masquerade-policy and a pod (--pod-ip, --pod-namespace, --pod-labels,
--namespace-labels), the payloads include the kernel fallback of the pod's
MasqueradePolicies: the ipsets of its policy set (its pods, the destinations
it masquerades and keeps, excepts as nomatch entries) and the two rules that
use them, ahead of the node policy.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := renderRules(&pf, &df, &mf, podIPs, cmd.ErrOrStderr())
			if err != nil {
				return &exitError{code: exitConfig, err: err}
			}
			_, err = fmt.Fprint(cmd.OutOrStdout(), out)
			return err
		},
	}
	pf.register(cmd.Flags())
	df.register(cmd.Flags())
	mf.register(cmd.Flags())
	cmd.Flags().StringSliceVar(&podIPs, "pod-ip", nil, "with --masquerade-policy: the pod's addresses (repeatable or comma-separated)")
	return cmd
}

func renderRules(pf *policyFlags, df *dataplaneFlags, mf *masqPolicyFlags, podIPs []string, notices io.Writer) (string, error) {
	b, err := rules.ParseBackend(df.backend)
	if err != nil {
		return "", fmt.Errorf("--iptables-backend: %w", err)
	}
	pol, err := pf.policy(notices)
	if err != nil {
		return "", err
	}
	cfg, err := df.rulesConfig(pol)
	if err != nil {
		return "", err
	}
	switch {
	case len(mf.files) == 0 && len(podIPs) > 0:
		return "", &usageError{errors.New("--pod-ip needs --masquerade-policy")}
	case len(mf.files) > 0 && len(podIPs) == 0:
		return "", &usageError{errors.New("--masquerade-policy needs --pod-ip: the addresses the pod's policy set applies to")}
	}
	all, w, err := mf.load(notices, pf.clusterCIDRs)
	switch {
	case err != nil:
		return "", err
	case all != nil:
		set, err := all.For(w)
		if err != nil {
			return "", err
		}
		pods := map[netip.Addr]*nat.PolicySet{}
		for _, s := range podIPs {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return "", &usageError{fmt.Errorf("--pod-ip: %w", err)}
			}
			pods[a.Unmap()] = set
		}
		cfg.PolicySets = agent.PolicySets(nat.NewWorkloads(pods, nil), cfg.EnableIPv6)
		if err := cfg.Validate(); err != nil {
			return "", err
		}
	}
	return rules.Render(cfg, b)
}
