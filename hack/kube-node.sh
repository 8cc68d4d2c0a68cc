#!/usr/bin/env bash
# A real single-node Kubernetes cluster in a network namespace of its own,
# for nfmasq's node tests: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kube-proxy (iptables mode) built from the
# published Go modules (hack/kube-apiserver.sh's module and cache),
# containerd, runc and the CNI plugins from Debian, images built locally.
#
#   hack/kube-node.sh build   install the Debian packages, build the Kubernetes
#                             binaries (no-op when cached)
#   hack/kube-node.sh up      start the node; prints nothing on stdout
#   hack/kube-node.sh image   build the agent image from the Dockerfile, a
#                             test client image, and import both into containerd
#   hack/kube-node.sh env     print exactly three lines: export KUBECONFIG=...,
#                             export NFMASQ_NODE_NETNS=..., export NFMASQ_IMAGE=...
#   hack/kube-node.sh down    stop everything and remove what up made
#   hack/kube-node.sh snapshot  print the machine's own state that up touches
#                             or could leave behind (namespaces, mounts, rules,
#                             links, routes, sysctls, processes, paths): CI
#                             compares it before up and after down
#
# Containment: every process of the node runs in the network namespace
# NFMASQ_NODE_NETNS (entered with nsenter --net: `ip netns exec` remounts
# /sys, which hides the cgroup mounts from kubelet). The machine's own
# namespace gets no address, route or rule; tests attach their remote
# hosts with a veth into the node's namespace. The API server listens on
# the node's address inside that namespace, so kubectl runs there too:
#
#   eval "$(hack/kube-node.sh env)"
#   nsenter --net=/run/netns/$NFMASQ_NODE_NETNS kubectl get nodes
#
# kubelet sets host sysctls (vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops) and writes a few paths outside its root directory;
# up records them and down restores and removes them.
#
# Environment: NFMASQ_KUBE_CACHE (see kube-apiserver.sh), NFMASQ_NODE_NETNS
# (default nfm-node).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "kube-node.sh: $*" >&2; exit 1; }
log() { echo "kube-node.sh: $*" >&2; }

export KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
NETNS=${NFMASQ_NODE_NETNS:-nfm-node}
NODE_NAME=nfmasq-node
NODE_IP=192.168.200.1
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
STATE=/run/nfmasq-node      # certs, configs, sockets, pids, logs
ROOT=/var/lib/nfmasq-node   # etcd, containerd and kubelet data
CACHE=${NFMASQ_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfmasq-kube}
IMAGES=$CACHE/images
AGENT_IMAGE=localhost/nfmasq:dev
CLIENT_IMAGE=localhost/nfmasq-client:dev
PAUSE_IMAGE=localhost/pause:local
BASE_IMAGE=localhost/nfmasq-base:bookworm
GO_IMAGE=localhost/nfmasq-go:bookworm
SOCK=$STATE/containerd/containerd.sock
# Paths kubelet and the CNI plugins write outside their root directories.
OUTSIDE=(/var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni /run/containerd)
HOST_SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)

innode() { nsenter --net="/run/netns/$NETNS" "$@"; }
bin() { echo "$BIN/$1"; }

need_packages() {
	local need=() tool
	for tool in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
		buildah:buildah debootstrap:debootstrap openssl:openssl curl:curl nsenter:util-linux; do
		if [[ ${tool%%:*} == /* ]]; then
			[[ -e ${tool%%:*} ]] || need+=("${tool#*:}")
		else
			command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
		fi
	done
	if ((${#need[@]})); then
		log "installing ${need[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
}

cmd_build() {
	[[ $(id -u) == 0 ]] || die "needs root"
	need_packages
	"$REPO/hack/kube-apiserver.sh" build
}

BIN=$("$REPO/hack/kube-apiserver.sh" bin)

# start NAME CMD...: run CMD in the node's namespace, detached, logging to
# $STATE/NAME.log, its pid in $STATE/NAME.pid.
start() {
	local name=$1
	shift
	setsid nsenter --net="/run/netns/$NETNS" "$@" </dev/null >"$STATE/$name.log" 2>&1 &
	echo $! >"$STATE/$name.pid"
}

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
	local what=$1 deadline=$((SECONDS + $2))
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "$what: not within the deadline (logs in $STATE)"
		sleep 0.2 # polling another process's readiness
	done
}

certs() {
	local d=$STATE/pki
	mkdir -p "$d"
	(
		cd "$d"
		openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=nfmasq-node-ca -keyout ca.key -out ca.crt 2>/dev/null
		cat >san.ext <<-EOF
			subjectAltName = IP:$NODE_IP, IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc
			extendedKeyUsage = serverAuth, clientAuth
		EOF
		openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
		openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out apiserver.crt 2>/dev/null
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	)
	head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/token"
	echo "$(cat "$STATE/token"),nfmasq-node-admin,nfmasq-node-admin,system:masters" >"$STATE/tokens.csv"
	cat >"$STATE/kubeconfig" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: node
		  cluster:
		    server: https://$NODE_IP:6443
		    certificate-authority: $STATE/pki/ca.crt
		users:
		- name: admin
		  user:
		    token: $(cat "$STATE/token")
		contexts:
		- name: node
		  context: {cluster: node, user: admin}
		current-context: node
	EOF
}

configs() {
	mkdir -p "$STATE/containerd" "$STATE/cni/net.d" "$ROOT/containerd" "$ROOT/kubelet" "$ROOT/cni" "$ROOT/pod-logs"
	# CRI: no oom_score_adj changes (this root lacks CAP_SYS_RESOURCE),
	# cgroupfs, CNI from Debian, a bridge config written from the Node's
	# podCIDR once kubelet reports it, and the local pause image.
	cat >"$STATE/containerd/config.toml" <<-EOF
		version = 2
		root = "$ROOT/containerd"
		state = "$STATE/containerd/state"
		[grpc]
		  address = "$SOCK"
		[ttrpc]
		  address = "$SOCK.ttrpc"
		[plugins."io.containerd.grpc.v1.cri"]
		  sandbox_image = "$PAUSE_IMAGE"
		  restrict_oom_score_adj = true
		  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
		    runtime_type = "io.containerd.runc.v2"
		    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
		      SystemdCgroup = false
		  [plugins."io.containerd.grpc.v1.cri".cni]
		    bin_dir = "/usr/lib/cni"
		    conf_dir = "$STATE/cni/net.d"
		    conf_template = "$STATE/cni/template.conflist"
	EOF
	# ipMasq off: nfmasq is the only masquerade on this node.
	cat >"$STATE/cni/template.conflist" <<-EOF
		{
		  "cniVersion": "0.4.0",
		  "name": "nfmasq-node",
		  "plugins": [
		    {
		      "type": "bridge",
		      "bridge": "cni0",
		      "isGateway": true,
		      "ipMasq": false,
		      "hairpinMode": true,
		      "ipam": {
		        "type": "host-local",
		        "dataDir": "$ROOT/cni",
		        "ranges": [[{"subnet": "{{.PodCIDR}}"}]],
		        "routes": [{"dst": "0.0.0.0/0"}]
		      }
		    },
		    {"type": "portmap", "capabilities": {"portMappings": true}}
		  ]
		}
	EOF
	cat >"$STATE/kubelet.yaml" <<-EOF
		apiVersion: kubelet.config.k8s.io/v1beta1
		kind: KubeletConfiguration
		authentication:
		  anonymous: {enabled: false}
		  webhook: {enabled: true}
		  x509: {clientCAFile: $STATE/pki/ca.crt}
		authorization: {mode: AlwaysAllow}
		cgroupDriver: cgroupfs
		failCgroupV1: false
		failSwapOn: false
		containerRuntimeEndpoint: unix://$SOCK
		podLogsDir: $ROOT/pod-logs
		resolvConf: ""
		address: $NODE_IP
		healthzBindAddress: 127.0.0.1
		readOnlyPort: 0
		serializeImagePulls: false
		evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
		imageGCHighThresholdPercent: 100
		imageGCLowThresholdPercent: 99
		registerNode: true
		clusterDomain: cluster.local
		# ConfigMap volumes follow an edit at the next pod sync: 10s here
		# instead of the 1m default keeps the ConfigMap tests short.
		syncFrequency: 10s
	EOF
	cat >"$STATE/kube-proxy.yaml" <<-EOF
		apiVersion: kubeproxy.config.k8s.io/v1alpha1
		kind: KubeProxyConfiguration
		mode: iptables
		clientConnection: {kubeconfig: $STATE/kubeconfig}
		clusterCIDR: $CLUSTER_CIDR
		hostnameOverride: $NODE_NAME
		bindAddress: $NODE_IP
		healthzBindAddress: 127.0.0.1:10256
		metricsBindAddress: 127.0.0.1:10249
		conntrack: {maxPerCore: 0}
	EOF
}

cmd_up() {
	[[ $(id -u) == 0 ]] || die "needs root"
	need_packages
	cmd_build
	if [[ -f $STATE/up ]]; then
		log "already up"
		return
	fi
	cmd_down >/dev/null 2>&1 || true
	local start_s=$SECONDS
	mkdir -p "$STATE" "$ROOT"
	for s in "${HOST_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$STATE/host-sysctls"
	for p in "${OUTSIDE[@]}"; do [[ -e $p ]] && echo "$p"; done >"$STATE/outside-before" || true

	ip netns add "$NETNS"
	ip -n "$NETNS" link set lo up
	# The node's own address on a veth whose peer stays in the namespace
	# too (this kernel has no dummy links): tests add their remote hosts
	# with veths of their own.
	ip -n "$NETNS" link add eth0 type veth peer name eth0-peer
	ip -n "$NETNS" addr add "$NODE_IP/24" dev eth0
	ip -n "$NETNS" link set eth0-peer up
	ip -n "$NETNS" link set eth0 up
	ip -n "$NETNS" route add default dev eth0
	innode sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 2>/dev/null ||
		innode sysctl -qw net.ipv4.ip_forward=1

	certs
	configs

	start etcd "$(bin etcd)" --name node --data-dir "$ROOT/etcd" \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster node=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
	start kube-apiserver "$(bin kube-apiserver)" \
		--advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port 6443 \
		--cert-dir "$STATE/pki" --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
		--client-ca-file "$STATE/pki/ca.crt" --token-auth-file "$STATE/tokens.csv" \
		--authorization-mode Node,RBAC --etcd-servers http://127.0.0.1:2379 \
		--service-cluster-ip-range "$SERVICE_CIDR" \
		--service-account-issuer https://kubernetes.default.svc \
		--service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
		--kubelet-preferred-address-types InternalIP \
		--kubelet-client-certificate "$STATE/pki/apiserver.crt" --kubelet-client-key "$STATE/pki/apiserver.key" \
		--allow-privileged=true --profiling=false
	wait_for "kube-apiserver" 60 innode "$(bin kubectl)" --kubeconfig "$STATE/kubeconfig" get --raw /readyz
	start kube-controller-manager "$(bin kube-controller-manager)" \
		--kubeconfig "$STATE/kubeconfig" --leader-elect=false \
		--allocate-node-cidrs --cluster-cidr "$CLUSTER_CIDR" --node-cidr-mask-size 24 \
		--service-cluster-ip-range "$SERVICE_CIDR" \
		--service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/ca.crt" \
		--use-service-account-credentials --profiling=false
	start kube-scheduler "$(bin kube-scheduler)" --kubeconfig "$STATE/kubeconfig" --leader-elect=false --profiling=false
	start containerd containerd --config "$STATE/containerd/config.toml"
	wait_for "containerd" 30 test -S "$SOCK"
	start kubelet "$(bin kubelet)" --config "$STATE/kubelet.yaml" --kubeconfig "$STATE/kubeconfig" \
		--root-dir "$ROOT/kubelet" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" \
		--cert-dir "$STATE/kubelet-pki"
	start kube-proxy "$(bin kube-proxy)" --config "$STATE/kube-proxy.yaml"
	wait_for "node Ready" 120 bash -c "nsenter --net=/run/netns/$NETNS $(bin kubectl) --kubeconfig $STATE/kubeconfig get node $NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}{.spec.podCIDR}' | grep -q '^True10\\.'"
	touch "$STATE/up"
	log "up in $((SECONDS - start_s))s: node $NODE_NAME Ready in namespace $NETNS ($NODE_IP)"
}

cmd_image() {
	need_packages
	local start_s=$SECONDS
	export STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
	mkdir -p "$IMAGES"
	if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
		if [[ ! -f $IMAGES/bookworm.tar ]]; then
			log "debootstrap bookworm (minbase)"
			rm -rf "$IMAGES/rootfs"
			debootstrap --variant=minbase bookworm "$IMAGES/rootfs" http://deb.debian.org/debian >"$IMAGES/debootstrap.log" 2>&1 ||
				{ tail -20 "$IMAGES/debootstrap.log" >&2; die "debootstrap failed"; }
			tar -C "$IMAGES/rootfs" -cf "$IMAGES/bookworm.tar" .
			rm -rf "$IMAGES/rootfs"
		fi
		local c
		c=$(buildah from scratch)
		buildah add "$c" "$IMAGES/bookworm.tar" / >/dev/null
		buildah config --cmd /bin/bash "$c"
		buildah commit -q "$c" "$BASE_IMAGE" >/dev/null
		buildah rm "$c" >/dev/null
	fi
	if ! buildah inspect --type image "$GO_IMAGE" >/dev/null 2>&1; then
		local c goroot
		goroot=$(go env GOROOT)
		c=$(buildah from --pull-never "$BASE_IMAGE")
		buildah copy "$c" "$goroot" /usr/local/go >/dev/null
		# The module proxy is reached through TLS interception here: the
		# build stage needs the machine's CA bundle.
		buildah copy "$c" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
		buildah config --env PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			--env "GOPROXY=$(go env GOPROXY)" "$c"
		buildah commit -q "$c" "$GO_IMAGE" >/dev/null
		buildah rm "$c" >/dev/null
	fi
	log "building $AGENT_IMAGE from the Dockerfile"
	buildah bud --isolation chroot --pull-never --network host -q \
		--build-arg "GO_IMAGE=$GO_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
		--build-arg "TARGETARCH=$(go env GOARCH)" \
		-t "$AGENT_IMAGE" -f "$REPO/Dockerfile" "$REPO" >/dev/null
	# The pause image: a static pause from hack/pause.
	local dir c
	dir=$(mktemp -d)
	CGO_ENABLED=0 go build -C "$REPO" -trimpath -ldflags "-s -w" -o "$dir/pause" ./hack/pause
	c=$(buildah from scratch)
	buildah copy "$c" "$dir/pause" /pause >/dev/null
	buildah config --entrypoint '["/pause"]' "$c"
	buildah commit -q "$c" "$PAUSE_IMAGE" >/dev/null
	buildah rm "$c" >/dev/null
	# A test client: the same base, bash's /dev/tcp and /dev/udp.
	c=$(buildah from --pull-never "$BASE_IMAGE")
	buildah commit -q "$c" "$CLIENT_IMAGE" >/dev/null
	buildah rm "$c" >/dev/null
	[[ -S $SOCK ]] || die "images built, but the node is not up to import them into: run $0 up"
	local img
	for img in "$AGENT_IMAGE" "$PAUSE_IMAGE" "$CLIENT_IMAGE"; do
		buildah push -q "$img" "oci-archive:$dir/image.tar:$img" >/dev/null
		ctr --address "$SOCK" -n k8s.io images import --all-platforms "$dir/image.tar" >/dev/null
		rm -f "$dir/image.tar"
	done
	rm -rf "$dir"
	log "images imported in $((SECONDS - start_s))s: $AGENT_IMAGE $CLIENT_IMAGE $PAUSE_IMAGE"
}

cmd_env() {
	[[ -f $STATE/up ]] || die "not up: run $0 up"
	echo "export KUBECONFIG=$STATE/kubeconfig"
	echo "export NFMASQ_NODE_NETNS=$NETNS"
	echo "export NFMASQ_IMAGE=$AGENT_IMAGE"
}

stop() {
	local name=$1 pid
	[[ -f $STATE/$name.pid ]] || return 0
	pid=$(cat "$STATE/$name.pid")
	kill "$pid" 2>/dev/null || true
	local i
	for i in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1 # waiting for a process we do not parent to exit
	done
	kill -9 "$pid" 2>/dev/null || true
	rm -f "$STATE/$name.pid"
}

cmd_down() {
	stop kube-proxy
	stop kubelet
	# Every container and its shim: containerd leaves them running.
	if [[ -S $SOCK ]]; then
		local t
		for t in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
			ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
		done
	fi
	stop containerd
	pkill -9 -f "containerd-shim-runc-v2.*$STATE" 2>/dev/null || pkill -9 -f "containerd-shim.*-address $SOCK" 2>/dev/null || true
	stop kube-scheduler
	stop kube-controller-manager
	stop kube-apiserver
	stop etcd
	# Whatever still runs in the namespace.
	if ip netns list 2>/dev/null | grep -qw "$NETNS"; then
		local pids
		pids=$(ip netns pids "$NETNS" 2>/dev/null || true)
		[[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
	fi
	# Mounts under the node's directories, deepest first.
	awk -v a="$ROOT" -v b="$STATE" '$2 ~ "^"a || $2 ~ "^"b || $2 ~ "^/run/containerd" || $2 ~ "^/run/netns/cni-" { print $2 }' /proc/mounts |
		sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
	# Pod network namespaces the CNI plugins made.
	local ns
	for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ { print $1 }'); do ip netns del "$ns" 2>/dev/null || true; done
	ip netns del "$NETNS" 2>/dev/null || true
	# kubelet's cgroups.
	local cg
	for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
		[[ -d $cg ]] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	if [[ -f $STATE/host-sysctls ]]; then
		local kv
		while read -r kv; do sysctl -qw "$kv" || true; done <"$STATE/host-sysctls"
	fi
	local p
	for p in "${OUTSIDE[@]}"; do
		if [[ -e $p ]] && ! grep -qx "$p" "$STATE/outside-before" 2>/dev/null; then rm -rf "$p"; fi
	done
	rm -rf "$STATE" "$ROOT"
	log "down"
}

# cmd_snapshot prints the host's state that a node could leave behind.
cmd_snapshot() {
	echo "## network namespaces"
	ip netns list 2>/dev/null | awk '{ print $1 }' | sort
	echo "## mounts"
	awk '{ print $2 }' /proc/mounts | sort
	local t
	for t in iptables-save ip6tables-save; do
		echo "## $t"
		{ "$t" 2>/dev/null || true; } | { grep -v '^#' || true; } | sed -E 's/\[[0-9]+:[0-9]+\]/[0:0]/'
	done
	echo "## ipsets"
	{ ipset list -n 2>/dev/null || true; } | sort
	echo "## links, addresses, routes"
	ip -o link | awk '{ print $2 }'
	ip -o addr | awk '{ print $2, $4 }'
	ip route
	ip -6 route
	echo "## sysctls"
	sysctl "${HOST_SYSCTLS[@]}" net.ipv4.ip_forward net.netfilter.nf_conntrack_acct 2>/dev/null || true
	echo "## processes (user space)"
	ps -eo pid=,comm=,args= | awk '$3 !~ /^\[/ { print $2 }' | { grep -vxE 'ps|awk|sort|uniq|bash|sh|grep|sed|kube-node.sh' || true; } | sort | uniq
	echo "## paths"
	local p
	for p in "${OUTSIDE[@]}" "$STATE" "$ROOT" /etc/cni /opt/cni; do [[ -e $p ]] && echo "$p"; done
	true
}

case ${1:-} in
snapshot) cmd_snapshot ;;
build) cmd_build ;;
up) cmd_up ;;
image) cmd_image ;;
env) cmd_env ;;
down) cmd_down ;;
*) die "usage: $0 build|up|image|env|down|snapshot" ;;
esac
