// Command live is the live benchmark of nfmasq's dataplane through the
// kernel (issue 5): in throw-away network namespaces (pod → node →
// remote, internal/sandbox) it measures, in one run and on the same
// topology, the nfmasq agent against the two kernel-only dataplanes a user
// would run instead — ip-masq-agent's chain of one rule per CIDR, and one
// rule over an ipset hash:net — for several sizes of the non-masquerade
// list:
//
//   - new flows per second with every flow decided (a rate search over
//     paced bursts of UDP first packets from a packet socket in the pod;
//     a burst fails on any loss, any flow the agent did not decide —
//     fallback chain counter, kernel queue drops, skipped packet ids — and
//     any arrival that was not masqueraded), and the unpaced rate;
//   - established TCP throughput through the node;
//   - TCP connect time (the SYN is the first packet), whose difference to
//     the kernel-only anchors is the agent's added latency;
//   - the agent's reload of a large config under a steady flow load.
//
// Results go to a JSON file after every sample; `-report` turns one into
// docs/benchmarks.md (bench/run.sh does both, and bench/plot draws the
// figures). `-short` runs every measurement once with tiny bursts, for CI.
//
//	sudo go run ./bench/live -out live.json
//	go run ./bench/live -report -in live.json -o docs/benchmarks.md
//
// It needs root, iptables, ipset and (unless -agent names a binary) the Go
// toolchain to build cmd/nfmasq. Traffic never leaves the namespaces it
// creates, and the host's rules are never touched.
//
// # Concurrency and ownership
//
// The benchmark is sequential: one dataplane at a time, one measurement
// at a time, driven from the main goroutine (which is locked to its
// thread: the agent's parent-death signal follows that thread). The
// goroutines it starts — the remote's servers, the arrival clock polling
// the remote's packet counter, the load during a reload — belong to the
// bench and end before it returns.
package main
