// Package agent is nfmasq's node agent: the control loop around the
// NFQUEUE dataplane. Run installs the rule set, binds the queue, and
// keeps both in line with the config (ip-masq-agent's file, EgressNATPolicy
// files, flags) until its context ends; then it hands new flows to the
// kernel fallback and leaves the rules in place.
//
// Contracts:
//   - A bad config keeps the last good policy and its rules; every failure
//     is counted (nfmasq_config_reload_failures_total), each distinct
//     error logged once.
//   - A changed policy decides the next queued packet at once; the
//     fallback rules follow, and a failed install is retried at every
//     resync. The applied generation moves once the rules are in and the
//     conntrack entries of flows whose decision changed are deleted.
//   - Rules changed by another process are restored at the next resync.
//   - Every flow record names the policy (hash and generation) that
//     decided it; nothing on the audit path blocks a verdict.
//
// The kernel seams (rule set, conntrack, clock, pod names) are Deps; with
// rules.Fake and an in-memory conntrack table the control loop's logic
// runs in tests without root. The dataplane reads only the policy
// pointer; everything else belongs to Run's goroutine.
package agent
