package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"
)

func newConfigCmd() *cobra.Command {
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "config [flags]",
		Short: "Print the effective configuration as JSON",
		Long: `config prints the configuration the agent would run with, as one JSON object in
the config file's own keys: nonMasqueradeCIDRs after defaults, egress policies
and cluster ranges (canonical; link-local is governed by masqLinkLocal and
masqLinkLocalIPv6), masqLinkLocal, masqLinkLocalIPv6, resyncInterval and
cidrLimit. Without --egress-policy, --cluster-cidr and --agent=false the output
is itself a config file that reads back the same; cidrLimit applies to the
file's own list, so cluster ranges and egress policies may exceed it.

A configuration error exits 2 with the error on stderr. Warnings and notes go
to stderr.`,
		Example: `  nfmasq config --config /etc/config/ip-masq-agent
  nfmasq config --egress-policy policies.yaml --cluster-cidr 10.244.0.0/14`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, warnings, err := pf.load()
			if err != nil {
				return &exitError{code: exitConfig, err: err}
			}
			printNotices(cmd.ErrOrStderr(), warnings, p.Notes())
			out, err := json.Marshal(p.Effective())
			if err != nil {
				return fmt.Errorf("encode config: %w", err)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s\n", out)
			return err
		},
	}
	pf.register(cmd.Flags())
	pf.registerClusterModel(cmd.Flags())
	return cmd
}
