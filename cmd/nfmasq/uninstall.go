package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/rules"
)

// commandRunner runs the iptables and ipset tools for uninstall; tests
// point it into a network namespace.
var commandRunner rules.Runner = rules.ExecRunner{}

func newUninstallCmd() *cobra.Command {
	var (
		backend    string
		enableIPv6 bool
	)
	cmd := &cobra.Command{
		Use:   "uninstall [flags]",
		Short: "Remove every iptables jump, chain and ipset nfmasq created on this node",
		Long: `Remove every jump into nfmasq's chains (every copy), the chains themselves
in the mangle and nat tables of both address families, and nfmasq's ipsets.
Whatever part of them exists is removed; nothing else is touched. With
--iptables-backend auto both backends are cleaned, since a node may have
switched between them. Stop the agent first: a running agent restores its
rules at the next resync.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b, err := rules.ParseBackend(backend)
			if err != nil {
				return &exitError{code: exitConfig, err: fmt.Errorf("--iptables-backend: %w", err)}
			}
			backends := []rules.Backend{b}
			if b == "" {
				backends = []rules.Backend{rules.BackendNFT, rules.BackendLegacy}
			}
			if err := rules.UninstallBackends(cmd.Context(), commandRunner, backends); err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "nfmasq: removed every nfmasq jump, chain and ipset (backends: %v; IPv4 and IPv6)\n", backends)
			return nil
		},
	}
	cmd.Flags().StringVar(&backend, "iptables-backend", "auto", "iptables backend to clean: auto (both), nft or legacy")
	// The agent's DaemonSet arguments include --enable-ipv6; accepting it
	// lets a cleanup job reuse them. Both families are always cleaned.
	cmd.Flags().BoolVar(&enableIPv6, "enable-ipv6", false, "accepted for symmetry with the agent; both families are always cleaned")
	return cmd
}
