package main

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/conntrack"
)

// enableAccounting turns on the conntrack sysctls of the caller's network
// namespace; tests replace it to reach the outcomes a kernel here cannot
// produce (no conntrack module, a read-only /proc/sys).
var enableAccounting = func() ([]string, error) { return conntrack.EnableAccounting(0) }

func newNodePrepCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "node-prep",
		Short: "Turn on the node's conntrack accounting, timestamps and events for flow-end records",
		Long: `Set net.netfilter.nf_conntrack_acct, nf_conntrack_timestamp and
nf_conntrack_events to 1 in the current network namespace where they are
not already, and say which ones changed. Flow-end records need them: byte
and packet counts, start and stop times, and a destroy event for every
flow.

The agent tries this itself, but container runtimes mount /proc/sys
read-only in every container that is not privileged, whatever its
capabilities. So the DaemonSet runs this command as a privileged init
container in the node's network namespace (hostNetwork), and the agent
stays unprivileged. The settings last until the node reboots.

When the conntrack module is not loaded yet (no sysctls to set) this is a
warning, not a failure: the agent's rules load the module, and the agent
then reports that flow-end records lack counters.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			changed, err := enableAccounting()
			// Those set before a failure stay set; say so either way.
			if len(changed) > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "nfmasq node-prep: set to 1: %s\n", strings.Join(changed, " "))
			}
			switch {
			case errors.Is(err, fs.ErrNotExist):
				fmt.Fprintf(cmd.ErrOrStderr(), "nfmasq node-prep: warning: %v: conntrack is not loaded on this node yet; "+
					"the agent's rules load it, and flow-end records lack counters and times until node-prep runs again\n", err)
			case err != nil:
				return &exitError{code: exitFailure, err: fmt.Errorf("node-prep: %w", err)}
			case len(changed) == 0:
				fmt.Fprintln(cmd.OutOrStdout(), "nfmasq node-prep: conntrack accounting, timestamps and events were already on")
			}
			return nil
		},
	}
}
