package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/gopacket/gopacket/layers"
	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/pcapgen"
)

// pcapgenSummary is what pcapgen prints: the file and what it holds.
type pcapgenSummary struct {
	File string `json:"file"`
	pcapgen.Stats
}

func newPcapgenCmd() *cobra.Command {
	var (
		out           string
		cfg           pcapgen.Config
		podCIDRs      []string
		nonMasquerade []string
		linkType      string
	)
	cmd := &cobra.Command{
		Use:   "pcapgen --out FILE [flags]",
		Short: "Write a synthetic pod-traffic capture for replay benchmarks",
		Long: `pcapgen writes a pcap of pod traffic: --flows flows from pod addresses, each of
--packets-per-flow packets (TCP: a SYN, then data segments; UDP: datagrams),
interleaved in rounds. Destinations are public addresses (--internet-fraction),
link-local addresses (--link-local-fraction), and the rest addresses inside the
--non-masquerade ranges. The capture depends only on the flags: the same flags
and --seed write the same bytes.

It prints what it wrote as one JSON object: packets, flows, flows by
destination class, family and protocol, and bytes. Bad flag values exit 2.`,
		Example: `  nfmasq pcapgen --out flows.pcap --flows 100000 --packets-per-flow 10
  nfmasq pcapgen --out mix.pcap --flows 5000 --internet-fraction 0.3 --ipv6-fraction 0.5 --seed 7`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return &usageError{errors.New("--out is required")}
			}
			bad := func(err error) error { return &exitError{code: exitConfig, err: err} }
			cfg.PodCIDR4, cfg.PodCIDR6 = netip.Prefix{}, netip.Prefix{}
			for _, s := range podCIDRs {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return bad(fmt.Errorf("--pod-cidr: %w", err))
				}
				family := &cfg.PodCIDR4
				if p.Addr().Is6() {
					family = &cfg.PodCIDR6
				}
				if family.IsValid() {
					return bad(fmt.Errorf("--pod-cidr: %s and %s are of the same family; give one IPv4 and one IPv6 range", *family, p))
				}
				*family = p
			}
			cfg.NonMasquerade = nil
			for _, s := range nonMasquerade {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return bad(fmt.Errorf("--non-masquerade: %w", err))
				}
				cfg.NonMasquerade = append(cfg.NonMasquerade, p)
			}
			switch linkType {
			case "raw":
				cfg.LinkType = layers.LinkTypeRaw
			case "ethernet":
				cfg.LinkType = layers.LinkTypeEthernet
			default:
				return bad(fmt.Errorf("--link-type %q: use raw or ethernet", linkType))
			}
			g, err := pcapgen.New(cfg)
			if err != nil {
				return bad(err)
			}

			f, err := os.Create(out)
			if err != nil {
				return bad(err)
			}
			st, err := g.WritePcap(f)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				// Half a capture would replay as a truncated one; leave none.
				os.Remove(out)
				return fmt.Errorf("write %s: %w", out, err)
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			return enc.Encode(pcapgenSummary{File: out, Stats: st})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&out, "out", "", "capture file to write (pcap)")
	fs.IntVar(&cfg.Flows, "flows", 10000, "number of flows")
	fs.IntVar(&cfg.PacketsPerFlow, "packets-per-flow", 1, "packets in each flow")
	fs.Float64Var(&cfg.InternetFraction, "internet-fraction", 0.5, "fraction of flows to public addresses (masqueraded)")
	fs.Float64Var(&cfg.LinkLocalFraction, "link-local-fraction", 0, "fraction of flows to link-local addresses")
	fs.Float64Var(&cfg.IPv6Fraction, "ipv6-fraction", 0, "fraction of flows over IPv6")
	fs.Float64Var(&cfg.UDPFraction, "udp-fraction", 0.5, "fraction of flows over UDP (the rest TCP)")
	fs.IntVar(&cfg.PayloadSize, "payload-size", 0, "payload bytes per packet (TCP SYNs carry none)")
	fs.IntVar(&cfg.Pods, "pods", 64, "distinct pod addresses per family")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "random seed; the same flags and seed write the same capture")
	fs.StringSliceVar(&podCIDRs, "pod-cidr", []string{pcapgen.DefaultPodCIDR4.String(), pcapgen.DefaultPodCIDR6.String()},
		"ranges of pod source addresses, at most one IPv4 and one IPv6 (a family left out keeps its default)")
	defaults := make([]string, len(pcapgen.DefaultNonMasquerade))
	for i, p := range pcapgen.DefaultNonMasquerade {
		defaults[i] = p.String()
	}
	fs.StringSliceVar(&nonMasquerade, "non-masquerade", defaults,
		"ranges non-masquerade destinations are drawn from, and internet ones avoid (repeatable or comma-separated)")
	fs.StringVar(&linkType, "link-type", "raw", "link type of the capture: raw (LINKTYPE_RAW) or ethernet")
	return cmd
}
