// Package netnstest builds throw-away network namespaces for kernel tests
// and for the demo: a pod, a node that forwards, and a remote network,
// joined by veth pairs. Everything a test creates is removed in its
// Cleanup; traffic never leaves the namespaces, because none of them has a
// link to the host's interfaces.
//
// The package shells out to iproute2 (`ip`), with arguments only, never a
// shell. Namespaces are named nfm-<prefix>-<pid>-<n> so parallel tests and
// leftover state from a killed run cannot collide.
//
// An NS is safe for concurrent use: Do runs its function on a dedicated OS
// thread that is discarded afterwards, so a goroutine never returns to the
// scheduler in the wrong namespace.
package netnstest
