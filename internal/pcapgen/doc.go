// Package pcapgen writes synthetic pod-traffic captures for the replay
// benchmarks: a chosen number of flows from pod addresses, each of a
// chosen number of packets, to a mix of internet, non-masquerade and
// link-local destinations, over IPv4 and IPv6, TCP and UDP.
//
// A capture is a pure function of its Config, seed included: the same
// Config writes the same bytes on every machine. Each flow is a function
// of the Config and its index alone (Generator.Flow), so a live benchmark
// can make the same flows, or packets of them (AppendPacket), without a
// file.
//
// # Concurrency and ownership
//
// A Generator is immutable after New and safe for concurrent use.
// AppendPacket writes only to the slice it is given, which the caller
// owns.
package pcapgen
