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
# It starts the test kube-apiserver (hack/kube-apiserver.sh) for the
# MasqueradePolicy variant and stops it at the end.
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

# The MasqueradePolicy variant needs an API server: the test one of the
# Kubernetes integration tests (built once, cached; NFMASQ_BENCH_KUBE=0
# skips the variant).
kube=""
if [ "${NFMASQ_BENCH_KUBE:-1}" != 0 ]; then
	hack/kube-apiserver.sh build >&2
	hack/kube-apiserver.sh up >&2
	trap 'hack/kube-apiserver.sh down >&2; rm -rf "$bin"' EXIT
	kube=$(hack/kube-apiserver.sh env | sed -n 's/^export KUBECONFIG=//p')
fi

"$bin/live" -out "$out/live.json" ${kube:+-kubeconfig "$kube"} "$@"
"$bin/plot" -in "$out/live.json" -dir "$out"
plots=benchmarks
[ "$report" = docs/benchmarks.md ] || plots=.
"$bin/live" -report -in "$out/live.json" -o "$report" -plots "$plots"
echo "bench/run.sh: wrote $report, $out/live.json, $out/newflows.png, $out/connect-cdf.png" >&2
