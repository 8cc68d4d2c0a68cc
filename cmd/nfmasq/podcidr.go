package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nfmasq/nfmasq/internal/kube"
)

// kubeClient returns a client when the agent runs in a cluster or was
// given --kubeconfig, and nil when neither: Kubernetes is optional for the
// agent (pod CIDRs can be flags, pod names are a nicety).
func kubeClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := kube.Config(kubeconfig)
	if errors.Is(err, rest.ErrNotInCluster) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// discoverPodCIDRs reads the node's spec.podCIDRs when --pod-cidr is not
// given.
func discoverPodCIDRs(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	if client == nil {
		return nil, errors.New("no --pod-cidr given, and neither running in a cluster nor given --kubeconfig to read the node's spec.podCIDRs")
	}
	prefixes, err := kube.NodePodCIDRs(ctx, client, os.Getenv("NODE_NAME"))
	if err != nil {
		return nil, fmt.Errorf("no --pod-cidr given: %w", err)
	}
	out := make([]string, len(prefixes))
	for i, p := range prefixes {
		out[i] = p.String()
	}
	return out, nil
}

// startPodIndex starts a node-local pod informer for pod names in flow
// records. Without a cluster, or without NODE_NAME, records carry no pod
// name. The lookup it returns is a map read, never an API call; until the
// first list completes it finds nothing.
func startPodIndex(ctx context.Context, client kubernetes.Interface, log *slog.Logger) podLookup {
	node := os.Getenv("NODE_NAME")
	if client == nil || node == "" {
		log.Info("pod names in flow records: off (no cluster, or NODE_NAME unset)")
		return nil
	}
	idx, err := kube.NewPodIndex(client, node, 0)
	if err != nil {
		log.Warn("pod names in flow records: off", "err", err)
		return nil
	}
	go func() {
		if err := idx.Run(ctx); err != nil {
			log.Warn("pod index did not sync; flow records lack pod names until it does", "err", err)
		}
	}()
	log.Info("pod names in flow records: from the pods of this node", "node", node)
	return func(a netip.Addr) string { return idx.Lookup(a) }
}
