// Package packet decodes the IP and transport headers of one packet into a
// reusable Parsed value.
//
// It is the first step of the NFQUEUE hot path and of offline replay, so
// Decode never allocates and never fails with an error: malformed input is
// described by Parsed.Status, and the fields that could still be read (most
// importantly the destination address, which is all a NAT decision needs)
// are filled in. Status.Valid tells whether the packet is well formed as
// far as it was captured.
//
// The decoder is pure Go with no system calls, and reads only the bytes it
// is given: a capture cut short (NFQUEUE's copy range, a pcap snap length)
// is reported as Snapped rather than guessed at.
//
// Ownership and concurrency: Decode does not retain the byte slice; every
// field of Parsed is a copy. A Parsed value belongs to one goroutine at a
// time; reuse one per worker rather than sharing it. FlowKey returns a
// comparable value that may be used as a map key and kept freely.
package packet
