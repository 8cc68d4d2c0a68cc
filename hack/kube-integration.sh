#!/usr/bin/env bash
# Runs the Kubernetes integration tests against a real kube-apiserver + etcd
# built by hack/kube-apiserver.sh, and always stops them afterwards.
# CI calls this from .ci/run; extra arguments go to `go test`.
#
#   hack/kube-integration.sh            # go test -race -count=1 ./internal/kube/..., then
#                                       # the agent's MasqueradePolicy e2e test (root)
#   hack/kube-integration.sh -run Pod   # a subset of ./internal/kube/...
#
# A cold build of the binaries takes minutes (see kube-apiserver.sh); they
# are cached outside the repo, so later runs start the server in seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then
	[[ $(id -u) == 0 ]] || { echo "kube-integration.sh: install ${need[*]}" >&2; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

hack/kube-apiserver.sh build
hack/kube-apiserver.sh up
trap 'hack/kube-apiserver.sh down' EXIT
eval "$(hack/kube-apiserver.sh env)"
# NFMASQ_KUBE=1: the integration tests must run, not skip.
NFMASQ_KUBE=1 go test -race -count=1 "$@" ./internal/kube/...
# The agent against this server, in network namespaces: two pods of
# different labels, a policy edit, kill -9, a pod known late. Kernel
# tests need root; under NFMASQ_E2E=1 (CI) a missing root fails them.
if (($# == 0)); then
	NFMASQ_KUBE=1 go test -race -count=1 -run '^TestMasqueradePolicyE2E$' ./cmd/nfmasq/
fi
