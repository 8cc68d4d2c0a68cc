package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/replay"
)

func newReplayCmd() *cobra.Command {
	var (
		pf       policyFlags
		pcapPath string
		log      bool
		podCIDRs []string
	)
	cmd := &cobra.Command{
		Use:   "replay --pcap FILE [flags]",
		Short: "Decide the flows of a packet capture offline, as the agent would",
		Long: `replay reads a pcap or pcapng capture, decodes each packet with the agent's
decoder, groups packets into flows (protocol, addresses, ports; one direction
each) and decides the first packet of every flow with the policy the flags
describe, as explain does for one address.

It prints one JSON summary on stdout: records read, IP packets, flows,
decisions by action and by source, skipped records by reason (link types other
than Ethernet, raw IP, Linux cooked v1/v2 and loopback; non-IP frames; packets
the decoder rejects; a record the capture ends in), and records per second.
Every record is counted: records = ip_packets + the skipped ones. With --log,
one JSON decision record per flow precedes the summary.

A capture that cannot be opened or whose file header is not pcap or pcapng, a
configuration error or a bad flag exits 2. A capture cut short is not an error:
the summary counts the last record as truncated and says why reading stopped.`,
		Example: `  nfmasq replay --pcap traffic.pcap
  nfmasq replay --pcap node.pcapng --pod-cidr 10.244.1.0/24 --log
  nfmasq replay --pcap traffic.pcap --config ./ip-masq-agent.yaml --enable-ipv6`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pcapPath == "" {
				return &usageError{errors.New("--pcap is required")}
			}
			opts := replay.Options{}
			for _, s := range podCIDRs {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return &exitError{code: exitConfig, err: fmt.Errorf("--pod-cidr: %w", err)}
				}
				opts.PodCIDRs = append(opts.PodCIDRs, p)
			}
			pol, warnings, err := pf.load()
			if err != nil {
				return &exitError{code: exitConfig, err: err}
			}
			printNotices(cmd.ErrOrStderr(), warnings, pol.Notes())

			if log {
				opts.Log = cmd.OutOrStdout()
			}
			r := replay.New(pol, opts)
			if err := r.ReplayFile(pcapPath); err != nil {
				// A failing log is stdout failing: exit 1. Anything else
				// means the capture could not be read at all (missing,
				// unreadable, not a capture): a bad argument, exit 2.
				if errors.Is(err, replay.ErrFlowLog) {
					return err
				}
				return &exitError{code: exitConfig, err: err}
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetEscapeHTML(false)
			return enc.Encode(r.Summary())
		},
	}
	cmd.Flags().StringVar(&pcapPath, "pcap", "", "capture to replay (pcap or pcapng, optionally gzip-compressed pcap)")
	cmd.Flags().BoolVar(&log, "log", false, "print a JSON decision record for every flow before the summary")
	cmd.Flags().StringSliceVar(&podCIDRs, "pod-cidr", nil,
		"decide only packets from these ranges, as the agent's queue rule does (repeatable or comma-separated); default: every packet")
	pf.register(cmd.Flags())
	pf.registerClusterModel(cmd.Flags())
	return cmd
}
