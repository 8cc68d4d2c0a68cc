// Package rules owns nfmasq's kernel rule set: the iptables chains that
// send the first packet of each pod flow to NFQUEUE, save the agent's
// decision from that packet's mark in the connmark, masquerade by
// connmark, and decide by themselves (the kernel fallback) whatever the
// agent did not decide. It knows nothing about YAML or the nat package: its input
// is a Config of plain prefixes and numbers.
//
// The rule set is a static, owned set. Our chains are rewritten whole by
// one `iptables-restore --noflush -w` payload per family (declaring a
// chain in such a payload flushes only that chain, inside the same
// transaction); the only lines that touch chains we do not own are the
// jumps into ours, and those are added only when missing, so a restart
// produces a byte-identical rule set. Long non-masquerade lists go into an
// ipset, refilled through a temporary set and an atomic swap.
//
// The pure half (Plan, Verify, PlanUninstall, PlanSet, VerifySet, Render)
// turns a Config and the text of `iptables-save` into payloads; it is
// deterministic and safe for concurrent use. The Installer runs the tools
// through a Runner; it holds no state besides its fields and may be used
// from several goroutines, but two installs racing on one node are ordered
// only by the xtables lock, so callers serialise Install, Check and
// Uninstall.
package rules
