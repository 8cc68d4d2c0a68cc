# nfmasq: one image for the agent (DaemonSet) and the egress controller.
#
#   docker build --build-arg VERSION=v0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     -t REGISTRY/nfmasq:v0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 ...   (cross-compiles, no emulation)
#
# Both bases are pinned by tag and by the digest of their multi-arch index.
# The digests come from public references to these tags; no container engine
# was available to pull them where this file was written. Re-pin both lines
# together with `docker buildx imagetools inspect IMAGE:TAG`. The builder's Go
# must be at least go.mod's go line (deploy/dockerfile_test.go checks this
# and the rest of this file's promises).
ARG GO_IMAGE=golang:1.26.8-bookworm@sha256:a688600ca24f8a4d3ca77f95b0dd40704a9fc787c826660eb7ba0b641b8b175d
ARG BASE_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

FROM --platform=$BUILDPLATFORM ${GO_IMAGE} AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
# Static: the final image needs no libc of a particular version, and the
# controller runs it as any user. GOTOOLCHAIN=local: never download another
# Go in the middle of a build.
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/nfmasq ./cmd/nfmasq

FROM ${BASE_IMAGE}
ARG VERSION=dev
ARG REVISION=unknown
# The versions the project's Debian 12 machines run and its kernel tests
# exercise. Bookworm ships exactly these; a Debian security update would
# make the install fail loudly rather than change the tools silently.
ARG IPTABLES_VERSION=1.8.9-2
ARG IPSET_VERSION=7.17-1
LABEL org.opencontainers.image.title="nfmasq" \
      org.opencontainers.image.description="Kubernetes node agent replacing ip-masq-agent: per-flow masquerade decisions over NFQUEUE with a kernel fallback" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nfmasq/nfmasq" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# Exactly the kernel tools the agent runs: iptables provides both backends
# (iptables-nft and iptables-legacy, each with -save and -restore, for IPv4
# and IPv6; the agent picks the node's backend as kube-proxy's wrapper
# does), ipset holds long CIDR lists. Nothing recommended comes along.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables=${IPTABLES_VERSION} \
        ipset=${IPSET_VERSION} \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/nfmasq /usr/local/bin/nfmasq
# No USER: the agent needs uid 0 for netlink and iptables, and the DaemonSet
# drops every capability except NET_ADMIN and NET_RAW. The controller's
# Deployment runs this same image as uid 65532 with no capabilities.
ENTRYPOINT ["/usr/local/bin/nfmasq"]
