package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/demo"
)

func newDemoCmd() *cobra.Command {
	var keepLog string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the agent in a throw-away sandbox of network namespaces and show its decisions (root)",
		Long: `Build a sandbox of network namespaces (a pod, a node, an "internal" host in
10.0.0.0/8 and an "internet" host outside every non-masquerade range), run
the agent in the node on the built-in default policy, send TCP and UDP from
the pod to both hosts, and print each decision beside the source address
each host saw, the flow log, and nfmasq who naming the pod behind the
node address and port the internet host saw. Everything is removed on
exit, Ctrl-C included; no traffic leaves the sandbox.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			self, err := os.Executable()
			if err != nil {
				return err
			}
			return demo.Run(cmd.Context(), self, cmd.OutOrStdout(), keepLog)
		},
	}
	cmd.Flags().StringVar(&keepLog, "flow-log", "", "keep the demo's flow log in this file (to try nfmasq who on it)")
	return cmd
}
