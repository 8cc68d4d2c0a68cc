package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"
)

// explainLine is one line of explain's output. The field order and names
// are part of the interface.
type explainLine struct {
	Dst    string `json:"dst"`
	Action string `json:"action,omitempty"`
	Prefix string `json:"prefix"`
	Source string `json:"source,omitempty"`
	Origin string `json:"origin,omitempty"`
}

// explainError reports an argument that is not an address.
type explainError struct {
	Dst   string `json:"dst"`
	Error string `json:"error"`
}

func newExplainCmd() *cobra.Command {
	var pf policyFlags
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
handling the others. Warnings and notes go to stderr.`,
		Example: `  nfmasq explain 8.8.8.8 10.1.2.3
  nfmasq explain --config ./ip-masq-agent.yaml --enable-ipv6 fd00::1 169.254.169.254
  nfmasq explain --agent=false --disable-default-snat 8.8.8.8`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, warnings, err := pf.load()
			if err != nil {
				return &exitError{code: exitConfig, err: err}
			}
			printNotices(cmd.ErrOrStderr(), warnings, p.Notes())

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
				line := explainLine{Dst: dst.String(), Action: d.Action.String(), Source: d.Source.String(), Origin: d.Origin}
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
	return cmd
}
