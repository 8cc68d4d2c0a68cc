package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Chain names. Every chain nfmasq creates starts with ChainPrefix, which is
// how Plan and PlanUninstall recognise ours (including chains of an older
// layout that must go).
const (
	ChainPrefix = "NFMASQ-"
	// ChainForward (mangle) queues undecided pod packets.
	ChainForward = "NFMASQ-FORWARD"
	// ChainPostrouting exists in mangle (save the decision in the
	// connmark) and in nat (apply the decision).
	ChainPostrouting = "NFMASQ-POSTROUTING"
	// ChainFallback (nat) decides what the agent did not.
	ChainFallback = "NFMASQ-FALLBACK"
	// ChainMasquerade (nat) is the one place MASQUERADE is spelt out:
	// --to-ports needs a protocol with ports, so it takes one rule per
	// protocol plus a portless rule for the rest (ICMP).
	ChainMasquerade = "NFMASQ-MASQUERADE"
)

// The payload is written in exactly the form iptables-save prints it back
// (marks as 0x…/0x…, matches in this order, comments quoted), so that
// Verify can compare text with text. The kernel tests check that
// assumption against both iptables backends.

// chain is one of our chains with its rules, each the text after
// "-A <chain> ".
type chain struct {
	name  string
	rules []string
}

// jump is the one rule in a built-in chain that enters one of ours.
type jump struct {
	from, to string
	spec     string // text after "-A <from> "
	insert   bool   // -I <from> 1 rather than -A <from>
}

// table is what nfmasq owns in one table.
type table struct {
	name   string
	chains []chain
	jumps  []jump
}

// layout returns the rule set the Config asks for in one family, tables in
// payload order. The Config must be valid.
func layout(cfg *Config, fam Family) []table {
	pods := cfg.podCIDRs(fam)
	m := cfg.Mark
	var tables []table

	if cfg.QueueEnabled {
		masked := func(v uint32) string { return fmt.Sprintf("%#x/%#x", v, m.Mask) }
		var forward []string
		for _, p := range pods {
			if cfg.QueuePaused {
				break
			}
			forward = append(forward, join("-s", p.String(), "-m connmark --mark", masked(0),
				comment("undecided pod flow: first packet to the agent"), "-j NFQUEUE", queueTarget(cfg), "--queue-bypass"))
		}
		// The decision lives in the connmark only. The verdict's packet
		// mark is saved there in mangle POSTROUTING, which runs before nat
		// POSTROUTING, so nat reads the connmark too; later packets are
		// never marked, so an established packet meets no rule target
		// (an earlier layout restored the connmark into every packet's
		// mark in PREROUTING, a target call per packet on the node, and
		// saved it back per pod packet). A flow that inherits a connmark
		// (a related flow of a conntrack helper) keeps its master's
		// decision, as it did then.
		connmask := fmt.Sprintf("--nfmask %#x --ctmask %#x", m.Mask, m.Mask)
		tables = append(tables, table{
			name: "mangle",
			chains: []chain{
				{ChainForward, forward},
				{ChainPostrouting, []string{join("-m mark ! --mark", masked(0),
					comment("save the decision in the connmark"), "-j CONNMARK --save-mark", connmask)}},
			},
			jumps: []jump{
				{from: "FORWARD", to: ChainForward, insert: true,
					spec: join(comment("queue undecided pod flows"), "-j", ChainForward)},
				{from: "POSTROUTING", to: ChainPostrouting, insert: true,
					spec: join(comment("save flow decisions"), "-j", ChainPostrouting)},
			},
		})

		post := []string{
			join("-m connmark --mark", masked(m.Masquerade), comment("the agent decided masquerade"), "-j", ChainMasquerade),
			join("-m connmark --mark", masked(m.Passthrough), comment("the agent decided passthrough"), "-j RETURN"),
		}
		tables = append(tables, natTable(cfg, fam, pods, post,
			[]string{join(comment("later packets skip the queue: the kernel decided"),
				"-j CONNMARK --set-xmark", masked(m.Fallback))}))
		return tables
	}
	// Kernel-only: no queue, no marks, nothing in mangle.
	return append(tables, natTable(cfg, fam, pods, nil, nil))
}

// natTable returns the nat half: our POSTROUTING chain (head, then pod
// traffic to the fallback), the fallback (head, then the non-masquerade
// destinations, then masquerade) and the masquerade chain.
func natTable(cfg *Config, fam Family, pods []netip.Prefix, postHead, fallbackHead []string) table {
	post := postHead
	for _, p := range pods {
		post = append(post, join("-s", p.String(), comment("undecided pod flow to the kernel fallback"), "-j", ChainFallback))
	}

	fallback := append(slices.Clone(fallbackHead), policyRules(cfg, fam)...)
	list := cfg.nonMasquerade(fam)
	switch {
	case hasDefaultRoute(list):
		fallback = append(fallback, join(comment("non-masquerade: every destination"), "-j RETURN"))
	case cfg.usesSet(fam):
		fallback = append(fallback, join("-m set --match-set", SetName(fam), "dst",
			comment("non-masquerade destination"), "-j RETURN"))
	default:
		for _, p := range list {
			fallback = append(fallback, join("-d", p.String(), comment("non-masquerade destination"), "-j RETURN"))
		}
	}
	fallback = append(fallback, join(comment("masquerade every other destination"), "-j", ChainMasquerade))

	return table{
		name: "nat",
		chains: []chain{
			{ChainPostrouting, post},
			{ChainFallback, fallback},
			{ChainMasquerade, masqueradeRules(cfg)},
		},
		jumps: []jump{{from: "POSTROUTING", to: ChainPostrouting,
			spec: join("-m addrtype ! --dst-type LOCAL", comment("masquerade decisions for non-local destinations"), "-j", ChainPostrouting)}},
	}
}

func masqueradeRules(cfg *Config) []string {
	target := "-j MASQUERADE"
	var opts []string
	if cfg.ToPorts != "" {
		opts = append(opts, "--to-ports", cfg.ToPorts)
	}
	if cfg.RandomFully {
		opts = append(opts, "--random-fully")
	}
	var out []string
	if cfg.ToPorts != "" {
		// MASQUERADE refuses --to-ports without a protocol that has ports.
		for _, proto := range []string{"tcp", "udp", "sctp"} {
			out = append(out, join("-p", proto, comment("masquerade"), target, join(opts...)))
		}
	}
	rest := []string{comment("masquerade"), target}
	if cfg.RandomFully {
		rest = append(rest, "--random-fully")
	}
	return append(out, join(rest...))
}

func queueTarget(cfg *Config) string {
	if cfg.Queues > 1 {
		return fmt.Sprintf("--queue-balance %d:%d", cfg.QueueNum, int(cfg.QueueNum)+int(cfg.Queues)-1)
	}
	return fmt.Sprintf("--queue-num %d", cfg.QueueNum)
}

// comment returns a comment match. iptables-save quotes any value holding
// characters other than letters, digits, '-' and '_'; every one of ours
// holds "nfmasq: ", so writing it quoted keeps payload and save identical.
func comment(s string) string { return `-m comment --comment "nfmasq: ` + s + `"` }

func join(parts ...string) string {
	var b strings.Builder
	for _, p := range parts {
		if p == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(p)
	}
	return b.String()
}
