#!/usr/bin/env bash
# A real kube-apiserver (with etcd) on 127.0.0.1 for nfmasq's integration
# tests, built from the published Go modules rather than downloaded.
#
#   hack/kube-apiserver.sh build   build kube-apiserver and etcd into the cache (no-op when cached)
#   hack/kube-apiserver.sh up      build if needed, start both, wait for /readyz, write a kubeconfig
#   hack/kube-apiserver.sh down    stop both and remove the run directory
#   hack/kube-apiserver.sh env     print "export KUBECONFIG=..." for a running server
#   hack/kube-apiserver.sh bin     print the directory the binaries are cached in
#
# Typical use (this is what CI runs):
#   hack/kube-apiserver.sh up
#   eval "$(hack/kube-apiserver.sh env)"
#   NFMASQ_KUBE=1 go test -race ./internal/kube/...
#   hack/kube-apiserver.sh down
#
# Environment:
#   KUBE_VERSION        k8s.io/kubernetes version; default: v1.X.Y matching the
#                       repo's k8s.io/client-go v0.X.Y, so server and client agree.
#   NFMASQ_KUBE_CACHE   binary cache; default ${XDG_CACHE_HOME:-$HOME/.cache}/nfmasq-kube.
#                       Binaries live in $NFMASQ_KUBE_CACHE/$KUBE_VERSION/bin.
#   NFMASQ_KUBE_RUN     run directory (certs, etcd data, logs, pids, kubeconfig);
#                       default ${TMPDIR:-/tmp}/nfmasq-kube-$UID.
#   NFMASQ_KUBE_PORT    apiserver secure port; default 6444. etcd uses PORT+1 and PORT+2.
#   KUBE_COMMANDS       the k8s.io/kubernetes commands `build` builds besides etcd;
#                       default kube-apiserver. hack/kube-node.sh adds the node's
#                       (kubelet, kube-proxy, ...) to the same module and cache.
#
# Why a scratch module: k8s.io/kubernetes replaces each k8s.io/* staging
# module with a directory inside its own repository, and replace directives
# of a dependency are ignored, so a module depending on k8s.io/kubernetes
# must map every staging module to its published v0.X.Y itself. etcd comes
# from go.etcd.io/etcd/server/v3 at the version kubernetes requires, built
# in the same module so the two share one dependency graph.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "kube-apiserver.sh: $*" >&2; exit 1; }
log() { echo "kube-apiserver.sh: $*" >&2; }

client_go_version() {
	awk '$1 == "k8s.io/client-go" { print $2; exit }' "$REPO/go.mod"
}

staging=$(client_go_version)
[[ $staging == v0.* ]] || die "cannot read k8s.io/client-go's version from $REPO/go.mod"
KUBE_VERSION=${KUBE_VERSION:-v1.${staging#v0.}}
staging=v0.${KUBE_VERSION#v1.} # the staging modules are published as v0.X.Y for kubernetes v1.X.Y

CACHE=${NFMASQ_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfmasq-kube}
SRC=$CACHE/$KUBE_VERSION/src
BIN=$CACHE/$KUBE_VERSION/bin
RUN=${NFMASQ_KUBE_RUN:-${TMPDIR:-/tmp}/nfmasq-kube-$(id -u)}
PORT=${NFMASQ_KUBE_PORT:-6444}
ETCD_CLIENT_PORT=$((PORT + 1))
ETCD_PEER_PORT=$((PORT + 2))
TOKEN_USER=nfmasq-test

KUBE_COMMANDS=${KUBE_COMMANDS:-kube-apiserver}

# built reports whether every command asked for is in the cache.
built() {
	local c
	[[ -x $BIN/etcd ]] || return 1
	for c in $KUBE_COMMANDS; do
		[[ -x $BIN/$c && -f $BIN/.complete-$c ]] || return 1
	done
}

cmd_build() {
	if built; then
		log "cached: $BIN ($KUBE_COMMANDS, etcd; $("$BIN/kube-apiserver" --version))"
		return
	fi
	command -v go >/dev/null || die "go is not on PATH"
	local start=$SECONDS
	mkdir -p "$SRC/cmd/etcd" "$BIN"
	cd "$SRC"
	# The scratch module must not pick up the repo's workspace or flags.
	export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0

	local kmod
	kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | awk -F'"' '$2 == "GoMod" { print $4 }')
	[[ -f $kmod ]] || die "cannot download k8s.io/kubernetes@$KUBE_VERSION"
	local etcd_version
	etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$kmod")
	[[ -n $etcd_version ]] || die "k8s.io/kubernetes@$KUBE_VERSION does not name go.etcd.io/etcd/server/v3"

	{
		echo "module nfmasq.local/kube-build"
		echo
		echo "go $(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/')"
		echo
		echo "require ("
		echo "	k8s.io/kubernetes $KUBE_VERSION"
		echo "	go.etcd.io/etcd/server/v3 $etcd_version"
		echo ")"
		echo
		echo "replace ("
		awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, v }' "$kmod"
		echo ")"
	} >go.mod
	{
		echo "//go:build tools"
		echo
		echo "// Package tools pins the commands built from this module."
		echo "package tools"
		echo
		echo "import ("
		for c in $KUBE_COMMANDS; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
		echo ")"
	} >tools.go
	cat >cmd/etcd/main.go <<-'EOF'
		// Command etcd is etcd's own main, built from go.etcd.io/etcd/server/v3.
		package main

		import (
			"os"

			"go.etcd.io/etcd/server/v3/etcdmain"
		)

		func main() { etcdmain.Main(os.Args) }
	EOF

	log "resolving modules for kubernetes $KUBE_VERSION (staging $staging), etcd $etcd_version: $KUBE_COMMANDS"
	# Staging modules that the commands do not import may be unpublished;
	# tidy only needs the ones in the import graph.
	go mod tidy -e >tidy.log 2>&1 || { cat tidy.log >&2; die "go mod tidy failed"; }

	local minor=${KUBE_VERSION#v1.}
	minor=${minor%%.*}
	local ldflags="-s -w" key val
	# gitCommit is left empty: the module proxy does not say which commit a
	# version is, and an empty field is better than the "$Format" default.
	for kv in "gitVersion=$KUBE_VERSION" gitMajor=1 "gitMinor=$minor" gitCommit= gitTreeState=clean \
		"buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
		key=${kv%%=*} val=${kv#*=}
		ldflags+=" -X k8s.io/component-base/version.$key=$val -X k8s.io/client-go/pkg/version.$key=$val"
	done
	local pkgs=() c
	for c in $KUBE_COMMANDS; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
	log "building $KUBE_COMMANDS"
	# One go build: the commands share most of their packages.
	go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}"
	if [[ ! -x $BIN/etcd ]]; then
		log "building etcd"
		go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" ./cmd/etcd
	fi
	for c in $KUBE_COMMANDS; do touch "$BIN/.complete-$c"; done
	log "built in $((SECONDS - start))s: $KUBE_COMMANDS ($("$BIN/kube-apiserver" --version)), etcd $etcd_version"
}

# certs writes a CA and serving certificates for etcd and the apiserver (all
# for 127.0.0.1), and the service-account signing key.
certs() {
	local d=$RUN/pki
	mkdir -p "$d"
	(
		cd "$d"
		openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=nfmasq-test-ca \
			-keyout ca.key -out ca.crt 2>/dev/null
		cat >san.ext <<-EOF
			subjectAltName = IP:127.0.0.1, DNS:localhost, IP:10.96.0.1, DNS:kubernetes.default.svc
			extendedKeyUsage = serverAuth, clientAuth
		EOF
		local name
		for name in apiserver etcd; do
			openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" \
				-keyout "$name.key" -out "$name.csr" 2>/dev/null
			openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
				-days 2 -extfile san.ext -out "$name.crt" 2>/dev/null
		done
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	)
}

healthy() {
	curl -fsS --max-time 2 --cacert "$RUN/pki/ca.crt" -H "Authorization: Bearer $(cat "$RUN/token")" \
		"https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}

running() {
	[[ -f $RUN/$1.pid ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null
}

cmd_up() {
	command -v openssl >/dev/null || die "openssl is needed for the test certificates"
	command -v curl >/dev/null || die "curl is needed to wait for /readyz"
	cmd_build
	if running kube-apiserver && healthy; then
		log "already up: $RUN/kubeconfig"
		return
	fi
	cmd_down >/dev/null 2>&1 || true
	local start=$SECONDS
	mkdir -p "$RUN"
	certs
	head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN/token"
	echo "$(cat "$RUN/token"),$TOKEN_USER,$TOKEN_USER,system:masters" >"$RUN/tokens.csv"

	# --allow-privileged as on every real cluster (kubeadm, GKE): the
	# agent's node-prep init container is privileged, and the API server
	# rejects such a pod template otherwise.
	# No kube-controller-manager runs, so nothing creates the "default"
	# service accounts that the ServiceAccount admission plugin demands of
	# every pod: it is off, as are the webhook plugins (no webhooks here).
	# setsid: the servers outlive this script and must not get the caller's
	# terminal signals; down stops them by the recorded pid.
	setsid "$BIN/etcd" \
		--name nfmasq-test \
		--data-dir "$RUN/etcd" \
		--listen-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
		--advertise-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "nfmasq-test=http://127.0.0.1:$ETCD_PEER_PORT" \
		--cert-file "$RUN/pki/etcd.crt" --key-file "$RUN/pki/etcd.key" \
		--client-cert-auth --trusted-ca-file "$RUN/pki/ca.crt" \
		--unsafe-no-fsync --quota-backend-bytes 1073741824 \
		--log-level warn \
		</dev/null >"$RUN/etcd.log" 2>&1 &
	echo $! >"$RUN/etcd.pid"

	setsid "$BIN/kube-apiserver" \
		--bind-address 127.0.0.1 \
		--advertise-address 127.0.0.1 \
		--secure-port "$PORT" \
		--cert-dir "$RUN/pki" \
		--tls-cert-file "$RUN/pki/apiserver.crt" --tls-private-key-file "$RUN/pki/apiserver.key" \
		--client-ca-file "$RUN/pki/ca.crt" \
		--token-auth-file "$RUN/tokens.csv" \
		--authorization-mode RBAC \
		--etcd-servers "https://127.0.0.1:$ETCD_CLIENT_PORT" \
		--etcd-cafile "$RUN/pki/ca.crt" --etcd-certfile "$RUN/pki/apiserver.crt" --etcd-keyfile "$RUN/pki/apiserver.key" \
		--service-cluster-ip-range 10.96.0.0/16 \
		--service-account-issuer https://kubernetes.default.svc \
		--service-account-key-file "$RUN/pki/sa.pub" \
		--service-account-signing-key-file "$RUN/pki/sa.key" \
		--endpoint-reconciler-type none \
		--allow-privileged=true \
		--disable-admission-plugins ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
		--enable-priority-and-fairness=false \
		--profiling=false \
		</dev/null >"$RUN/kube-apiserver.log" 2>&1 &
	echo $! >"$RUN/kube-apiserver.pid"

	local deadline=$((SECONDS + ${NFMASQ_KUBE_READY_TIMEOUT:-60}))
	until healthy; do
		running etcd || { tail -20 "$RUN/etcd.log" >&2; die "etcd exited"; }
		running kube-apiserver || { tail -40 "$RUN/kube-apiserver.log" >&2; die "kube-apiserver exited"; }
		((SECONDS < deadline)) || { tail -40 "$RUN/kube-apiserver.log" >&2; die "kube-apiserver not ready in time"; }
		sleep 0.2 # polling an external process's readiness; nothing to wait on instead
	done

	cat >"$RUN/kubeconfig" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: nfmasq-test
		  cluster:
		    server: https://127.0.0.1:$PORT
		    certificate-authority: $RUN/pki/ca.crt
		users:
		- name: $TOKEN_USER
		  user:
		    token: $(cat "$RUN/token")
		contexts:
		- name: nfmasq-test
		  context:
		    cluster: nfmasq-test
		    user: $TOKEN_USER
		current-context: nfmasq-test
	EOF
	log "ready in $((SECONDS - start))s: KUBECONFIG=$RUN/kubeconfig (logs in $RUN)"
}

stop() {
	local name=$1 pid
	[[ -f $RUN/$name.pid ]] || return 0
	pid=$(cat "$RUN/$name.pid")
	if kill -0 "$pid" 2>/dev/null; then
		kill "$pid"
		local i
		for i in $(seq 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1 # waiting for a process we do not parent to exit
		done
		kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
	fi
	rm -f "$RUN/$name.pid"
}

cmd_down() {
	stop kube-apiserver
	stop etcd
	rm -rf "$RUN"
	log "down"
}

cmd_env() {
	[[ -f $RUN/kubeconfig ]] || die "not up (no $RUN/kubeconfig); run: $0 up"
	echo "export KUBECONFIG=$RUN/kubeconfig"
}

case ${1:-} in
build) cmd_build ;;
bin) echo "$BIN" ;;
up) cmd_up ;;
down) cmd_down ;;
env) cmd_env ;;
*) die "usage: $0 build|bin|up|down|env" ;;
esac
