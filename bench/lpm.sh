#!/usr/bin/env bash
# Compares nat/lpm with bart and netipx: runs the package's benchmarks
# -count times (default 5) in one go test run and prints medians and ratios.
#
#   bench/lpm.sh                 # all sets, 5 runs
#   COUNT=10 BENCHTIME=2s bench/lpm.sh
#   RAW=out.txt bench/lpm.sh     # keep the raw go test output
#
# Times are CPU time per lookup (cpu-ns/op: process user+system time, so a
# descheduled benchmark on a shared machine is not charged); wall ns/op is
# in the raw output. Memory is the heap a built structure keeps (HeapAlloc
# difference around building it, GC on both sides). If benchstat can be
# run (go run golang.org/x/perf/cmd/benchstat), its table follows ours.
set -euo pipefail
cd "$(dirname "$0")/.."

count=${COUNT:-5}
benchtime=${BENCHTIME:-1s}
raw=${RAW:-$(mktemp)}

go test ./nat/lpm -run '^$' -bench "${BENCH:-.}" -count "$count" -benchtime "$benchtime" >"$raw"

awk -v count="$count" '
function median(key,    n, i, j, t, a) {
	n = cnt[key]
	if (n == 0) return ""
	for (i = 1; i <= n; i++) a[i] = val[key, i]
	for (i = 2; i <= n; i++) {            # insertion sort; mawk has no asort
		t = a[i]
		for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
		a[j + 1] = t
	}
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function add(key, v) { cnt[key]++; val[key, cnt[key]] = v }
function fmt(x) { return x == "" ? "-" : sprintf("%.2f", x) }
function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
/^Benchmark(Lookup|Compile)\// {
	split($1, p, "/")
	bench = p[1]; sub(/^Benchmark/, "", bench)
	set = p[2]; sub(/^set=/, "", set)
	impl = p[3]; sub(/^impl=/, "", impl); sub(/-[0-9]+$/, "", impl)
	if (!(set in seen)) { seen[set] = 1; sets[++nsets] = set }
	for (i = 3; i < NF; i += 2) add(bench SUBSEP set SUBSEP impl SUBSEP $(i + 1), $i)
}
END {
	split("lpm bart.Table bart.Lite netipx.IPSet", impls, " ")
	printf "Lookup, CPU ns per lookup over 1M destinations (median of %d)\n", count
	printf "%-10s %7s %10s %10s %12s %7s | %9s %10s | %10s %10s %10s %9s\n", "set", "lpm", "bart.Table", "bart.Lite", "netipx.IPSet", "floor", "lpm/bart", "target", "B lpm", "B bart.T", "B bart.L", "B lpm/L"
	for (s = 1; s <= nsets; s++) {
		set = sets[s]
		for (i = 1; i <= 4; i++) m[impls[i]] = median("Lookup" SUBSEP set SUBSEP impls[i] SUBSEP "cpu-ns/op")
		fl = median("Lookup" SUBSEP set SUBSEP "floor" SUBSEP "cpu-ns/op")
		if (m["lpm"] == "") continue
		bart = m["bart.Table"]
		if (m["bart.Lite"] != "" && (bart == "" || m["bart.Lite"] < bart)) bart = m["bart.Lite"]
		target = set == "gke12" ? "<= 1.00" : (set == "rand100k" ? "<= 0.50" : "")
		for (i = 1; i <= 4; i++) mb[impls[i]] = median("Lookup" SUBSEP set SUBSEP impls[i] SUBSEP "B/table")
		printf "%-10s %7s %10s %10s %12s %7s | %9s %10s | %10d %10d %10d %9s\n", set, fmt(m["lpm"]), fmt(m["bart.Table"]), fmt(m["bart.Lite"]), fmt(m["netipx.IPSet"]), fmt(fl), ratio(m["lpm"], bart), target, mb["lpm"], mb["bart.Table"], mb["bart.Lite"], ratio(mb["lpm"], mb["bart.Lite"])
	}
	print "lpm/bart is against the faster of bart.Table (LPM with value, same question) and bart.Lite"
	print "(membership only); netipx.IPSet answers membership only, it cannot name the matching prefix."
	print ""
	printf "Compile, CPU ms to build from the prefix slice (median of %d; wall ms in brackets)\n", count
	printf "%-10s %18s %18s %18s %18s\n", "set", "lpm", "bart.Table", "bart.Lite", "netipx.IPSet"
	for (s = 1; s <= nsets; s++) {
		set = sets[s]
		line = sprintf("%-10s", set)
		any = 0
		for (i = 1; i <= 4; i++) {
			c = median("Compile" SUBSEP set SUBSEP impls[i] SUBSEP "cpu-ns/op")
			w = median("Compile" SUBSEP set SUBSEP impls[i] SUBSEP "ns/op")
			if (w != "") any = 1
			line = line sprintf(" %18s", c == "" ? "-" : sprintf("%.2f (%.2f)", c / 1e6, w / 1e6))
		}
		if (any) print line
	}
}' "$raw"

if [ -z "${NO_BENCHSTAT:-}" ]; then
	echo
	echo "benchstat (columns by implementation):"
	go run golang.org/x/perf/cmd/benchstat@latest -col '/impl@(bart.Lite lpm bart.Table netipx.IPSet floor)' "$raw" 2>/dev/null ||
		echo "(benchstat not available; set NO_BENCHSTAT=1 to skip)"
fi
[ -n "${RAW:-}" ] || rm -f "$raw"
