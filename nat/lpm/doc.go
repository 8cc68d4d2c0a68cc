// Package lpm is a compiled longest-prefix-match table for IP prefixes.
//
// Compile flattens the prefixes of each address family into sorted,
// non-overlapping address ranges, each labelled with the most specific
// prefix that covers it, and indexes those ranges with a shallow multibit
// trie: a direct-indexed root on the top bits of the address, whose slots
// hold either the answer itself, a short sorted block of ranges scanned
// linearly, or (only where ranges crowd together) a 256-way child node.
// Most lookups therefore cost one or two memory reads, however many
// prefixes were compiled. The design and its measurements are described in
// lpm.go and bench_test.go.
//
// Ownership and concurrency: Compile copies what it needs and does not
// retain the caller's slice. A Table is immutable once Compile returns, so
// it is safe for concurrent use by any number of goroutines without
// locking; to change the set, compile a new Table and swap the pointer.
// Lookup never allocates.
package lpm
