#!/bin/sh
# Regenerates docs/benchmarks.md: runs the live kernel benchmark
# (bench/live) and writes the results file, the plots and the report.
#
#   sudo bench/run.sh            full run: 11, 1,000, 5,000 and 50,000 CIDRs,
#                                3 repetitions, reload of 100,000 CIDRs
#                                (about 15-25 minutes on 2 cores)
#   sudo bench/run.sh -short     smoke run (< 60 s); its numbers mean nothing, so
#                                it writes to a temporary directory, not docs/
#   sudo bench/run.sh -reps 5 -agent-args "--queues 2"   any bench/live flag
#
# Needs root, iptables, ipset and the Go toolchain. Run it on a quiet
# machine: sender, agent and kernel share the cores, and the report says so.
# Outputs: docs/benchmarks/live.json (every measurement),
# docs/benchmarks/*.png, docs/benchmarks.md.
set -eu

cd "$(dirname "$0")/.."
out=docs/benchmarks
report=docs/benchmarks.md
for arg in "$@"; do
	case $arg in
	-short | --short | -short=true | --short=true)
		out=$(mktemp -d)
		report=$out/benchmarks.md
		;;
	esac
done
mkdir -p "$out"

if [ "$(id -u)" -ne 0 ]; then
	echo "bench/run.sh: needs root (network namespaces, iptables)" >&2
	exit 1
fi

# Built once, run as a binary: `go run` would compile while the first
# dataplane is being measured.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/live" ./bench/live
go build -o "$bin/plot" ./bench/plot

"$bin/live" -out "$out/live.json" "$@"
"$bin/plot" -in "$out/live.json" -dir "$out"
plots=benchmarks
[ "$report" = docs/benchmarks.md ] || plots=.
"$bin/live" -report -in "$out/live.json" -o "$report" -plots "$plots"
echo "bench/run.sh: wrote $report, $out/live.json, $out/newflows.png, $out/connect-cdf.png" >&2
