// Package deploy holds nfmasq's Kubernetes manifests and gives Go code,
// integration tests in particular, the exact objects that
// `kubectl apply -k deploy/` creates.
//
// The YAML files are the product; this package only reads them. They are
// embedded at build time, so Manifests and Examples read no files at run
// time, keep no state and are safe for concurrent use. Every call returns
// fresh slices that the caller owns.
//
// The tests of this package decode every manifest strictly into the
// k8s.io/api types, run the EgressNATPolicy CRD's schema and CEL rules with
// the API server's own validation code, build the kustomization with
// kustomize, check the Dockerfile, and (as root) check that the
// DaemonSet's capabilities are the ones iptables and ipset need.
package deploy
