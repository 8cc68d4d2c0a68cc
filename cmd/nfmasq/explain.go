package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/nfmasq/nfmasq/internal/kube"
	"github.com/nfmasq/nfmasq/nat"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/labels"
)

// explainLine is one line of explain's output. The field order and names
// are part of the interface.
type explainLine struct {
	Dst    string `json:"dst"`
	Action string `json:"action,omitempty"`
	Prefix string `json:"prefix"`
	Source string `json:"source,omitempty"`
	Origin string `json:"origin,omitempty"`
	// Conflicting names the MasqueradePolicies that disagreed at the
	// deciding prefix length (Masquerade won).
	Conflicting []string `json:"conflicting,omitempty"`
}

// explainError reports an argument that is not an address.
type explainError struct {
	Dst   string `json:"dst"`
	Error string `json:"error"`
}

func newExplainCmd() *cobra.Command {
	var pf policyFlags
	var mf masqPolicyFlags
	cmd := &cobra.Command{
		Use:   "explain [flags] ADDR...",
		Short: "Print the masquerade decision for each destination address",
		Long: `explain compiles the policy the agent would use (config file, flags, egress
policies) and prints one JSON object per address: the action, the most specific
non-masquerade prefix that matched ("" when none), and where that prefix came
from (config, default, link-local, egress-policy with its origin, cluster,
disable-default-snat, ipv6-disabled; none when nothing matched).

A configuration error exits 2 with the error on stderr. An argument that is not
an IP address gets a line with an "error" field, and explain exits 1 after
handling the others. Warnings and notes go to stderr.

With --masquerade-policy FILE (MasqueradePolicy objects as applied with
kubectl: YAML documents or JSON, several per file) and the pod's identity
(--pod-namespace, --pod-labels, --namespace-labels), explain applies the
per-workload decision rule first: among the policies selecting the pod, the
most specific destination entry containing the address decides (its except
ranges removed; Masquerade wins a tie); otherwise the node policy does.
Cluster ranges are never a policy's. Invalid objects are reported on stderr
and skipped.

With --pod NAMESPACE/NAME, explain reads the pod's labels, its namespace's
labels and the cluster's MasqueradePolicies from the API (in a cluster, or
with --kubeconfig) and decides as the pod's agent does.`,
		Example: `  nfmasq explain 8.8.8.8 10.1.2.3
  nfmasq explain --config ./ip-masq-agent.yaml --enable-ipv6 fd00::1 169.254.169.254
  nfmasq explain --agent=false --disable-default-snat 8.8.8.8
  nfmasq explain --masquerade-policy policies.yaml --pod-namespace pay --pod-labels app=billing --namespace-labels team=payments 203.0.113.7
  nfmasq explain --pod payments/billing-0 --kubeconfig ~/.kube/config 203.0.113.7`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, warnings, err := pf.load()
			if err != nil {
				return &exitError{code: exitConfig, err: err}
			}
			printNotices(cmd.ErrOrStderr(), warnings, p.Notes())
			var mp *nat.MasqueradePolicies
			var workload nat.Workload
			if mf.pod != "" {
				mp, workload, err = mf.fromCluster(cmd, pf.clusterCIDRs)
			} else {
				mp, workload, err = mf.load(cmd.ErrOrStderr(), pf.clusterCIDRs)
			}
			if err != nil {
				return err
			}

			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetEscapeHTML(false)
			bad := 0
			for _, arg := range args {
				dst, err := parseDestination(arg)
				if err != nil {
					bad++
					if err := enc.Encode(explainError{Dst: arg, Error: err.Error()}); err != nil {
						return err
					}
					continue
				}
				d := p.Decide(dst)
				var conflicting []string
				if mp != nil {
					if md, c, err := mp.Decide(workload, dst); err == nil {
						d, conflicting = md, c
					}
				}
				line := explainLine{Dst: dst.String(), Action: d.Action.String(), Source: d.Source.String(), Origin: d.Origin, Conflicting: conflicting}
				if d.Prefix.IsValid() {
					line.Prefix = d.Prefix.String()
				}
				if err := enc.Encode(line); err != nil {
					return err
				}
			}
			if bad > 0 {
				return &exitError{code: exitFailure, err: fmt.Errorf("%d of %d arguments are not IP addresses", bad, len(args))}
			}
			return nil
		},
	}
	pf.register(cmd.Flags())
	pf.registerClusterModel(cmd.Flags())
	cmd.Flags().StringVar(&mf.pod, "pod", "", "decide for this pod NAMESPACE/NAME with the cluster's MasqueradePolicies (needs the API: in a cluster or --kubeconfig)")
	cmd.Flags().StringVar(&mf.kubeconfig, "kubeconfig", "", "with --pod: the kubeconfig to reach the cluster")
	mf.register(cmd.Flags())
	return cmd
}

// masqPolicyFlags model MasqueradePolicies for one pod.
type masqPolicyFlags struct {
	files                      []string
	namespace                  string
	podLabels, namespaceLabels string
	pod, kubeconfig            string // explain only: ask the cluster
}

func (f *masqPolicyFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVar(&f.files, "masquerade-policy", nil, "a file of MasqueradePolicy objects (YAML or JSON; repeatable)")
	fs.StringVar(&f.namespace, "pod-namespace", "", "with --masquerade-policy: the pod's namespace")
	fs.StringVar(&f.podLabels, "pod-labels", "", "with --masquerade-policy: the pod's labels, k=v,k2=v2")
	fs.StringVar(&f.namespaceLabels, "namespace-labels", "", "with --masquerade-policy: the namespace's labels, k=v,k2=v2 (kubernetes.io/metadata.name is added)")
}

// load reads the policies and the pod's identity; a nil set when no
// --masquerade-policy was given. Invalid objects are reported on stderr.
func (f *masqPolicyFlags) load(stderr io.Writer, cluster []string) (*nat.MasqueradePolicies, nat.Workload, error) {
	var w nat.Workload
	if len(f.files) == 0 {
		if f.namespace != "" || f.podLabels != "" || f.namespaceLabels != "" {
			return nil, w, &usageError{errors.New("--pod-namespace, --pod-labels and --namespace-labels need --masquerade-policy")}
		}
		return nil, w, nil
	}
	if f.namespace == "" {
		return nil, w, &usageError{errors.New("--masquerade-policy needs --pod-namespace (and the pod's labels)")}
	}
	var err error
	w.Namespace = f.namespace
	if w.Labels, err = labels.ConvertSelectorToLabelsMap(f.podLabels); err != nil {
		return nil, w, &usageError{fmt.Errorf("--pod-labels %q: %w", f.podLabels, err)}
	}
	if w.NamespaceLabels, err = labels.ConvertSelectorToLabelsMap(f.namespaceLabels); err != nil {
		return nil, w, &usageError{fmt.Errorf("--namespace-labels %q: %w", f.namespaceLabels, err)}
	}
	w.NamespaceLabels["kubernetes.io/metadata.name"] = f.namespace
	var all []nat.MasqueradePolicy
	for _, path := range f.files {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, w, &exitError{code: exitConfig, err: fmt.Errorf("--masquerade-policy: %w", err)}
		}
		ps, errs := nat.ParseMasqueradePolicies(data)
		for _, e := range errs {
			fmt.Fprintf(stderr, "nfmasq: %s: %v (skipped)\n", path, e)
		}
		all = append(all, ps...)
	}
	clusterPrefixes, err := parsePrefixes(cluster)
	if err != nil {
		return nil, w, &exitError{code: exitConfig, err: fmt.Errorf("--cluster-cidr: %w", err)}
	}
	set, err := nat.NewMasqueradePolicies(all, clusterPrefixes)
	if err != nil {
		return nil, w, &exitError{code: exitConfig, err: fmt.Errorf("--masquerade-policy: %w", err)}
	}
	return set, w, nil
}

// fromCluster reads the pod's identity and the cluster's MasqueradePolicies
// (--pod). Invalid policies are reported on stderr, as with files.
func (f *masqPolicyFlags) fromCluster(cmd *cobra.Command, cluster []string) (*nat.MasqueradePolicies, nat.Workload, error) {
	if len(f.files) > 0 || f.namespace != "" || f.podLabels != "" || f.namespaceLabels != "" {
		return nil, nat.Workload{}, &usageError{errors.New("--pod reads the pod and the policies from the cluster: leave out --masquerade-policy, --pod-namespace, --pod-labels and --namespace-labels")}
	}
	client, dyn, err := kube.OptionalClients(f.kubeconfig)
	if err == nil && client == nil {
		err = errors.New("not in a cluster: give --kubeconfig")
	}
	if err != nil {
		return nil, nat.Workload{}, &exitError{code: exitConfig, err: fmt.Errorf("--pod: %w", err)}
	}
	w, ps, errs, err := kube.PodWorkload(cmd.Context(), client, dyn, f.pod)
	if err != nil {
		return nil, w, &exitError{code: exitConfig, err: fmt.Errorf("--pod: %w", err)}
	}
	for _, e := range errs {
		fmt.Fprintf(cmd.ErrOrStderr(), "nfmasq: %v (skipped)\n", e)
	}
	prefixes, err := parsePrefixes(cluster)
	if err != nil {
		return nil, w, &exitError{code: exitConfig, err: fmt.Errorf("--cluster-cidr: %w", err)}
	}
	set, err := nat.NewMasqueradePolicies(ps, prefixes)
	if err != nil {
		return nil, w, &exitError{code: exitConfig, err: err}
	}
	return set, w, nil
}
