// Package nat is nfmasq's policy core: it reads ip-masq-agent's config file
// and GKE's EgressNATPolicy objects, and compiles them, with the agent's
// flags, into a Policy that decides, for each destination, whether a pod's
// flow keeps its address (passthrough) or takes the node's (masquerade).
// MasqueradePolicies refine that per workload: each distinct set of
// policies selecting a pod compiles into a PolicySet, and a Workloads
// snapshot maps the node's pod addresses to their sets.
//
// The package is pure Go: no syscalls, no logging, no global state. Parsing
// returns warnings for the caller to log.
//
// Ownership and concurrency: Config, EgressPolicy and Input are plain
// values owned by the caller. A Policy is immutable once Compile returns it
// and safe for concurrent use by any number of goroutines; the hot path,
// Decide, takes no lock and does not allocate. Every slice a Policy method
// returns is a fresh copy owned by the caller. To reload, compile a new
// Policy and swap the pointer (for example with atomic.Pointer).
// PolicySet and Workloads follow the same rules (their Decide and lookups
// do not allocate), except that the slices PolicySet returns are shared
// and must not be modified.
//
// The semantics are GKE's (see the README): GKE's eleven default ranges
// (or upstream's RFC 1918 ranges), a configured list replacing them,
// link-local kept unless masqLinkLocal says otherwise, cluster ranges never
// masqueraded, egress policies replacing the list on Autopilot, and the
// --disable-default-snat rows of GKE's Standard-cluster table.
package nat
