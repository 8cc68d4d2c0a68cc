// Command plot draws the PNG figures of docs/benchmarks.md from a results
// file of bench/live: new flows per second against the number of
// non-masquerade CIDRs for the three dataplanes, and the CDF of TCP
// connect times.
//
//	go run ./bench/plot -in docs/benchmarks/live.json -dir docs/benchmarks
//
// It reads only the fields it draws, so it does not depend on bench/live
// (a main package) and keeps working as that file grows fields. It is a
// single-goroutine program; nothing is shared.
package main
