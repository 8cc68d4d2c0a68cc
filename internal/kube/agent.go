package kube

import (
	"context"
	"errors"
	"log/slog"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// OptionalClient returns a client when running in a cluster or given a
// kubeconfig, and nil when neither: Kubernetes is optional for the agent
// (pod CIDRs can be flags, pod names are a nicety).
func OptionalClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := Config(kubeconfig)
	if errors.Is(err, rest.ErrNotInCluster) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// StartPodIndex starts a pod informer for the node's pods, for pod names
// in flow records, and returns the index. Without a client or a node name
// it returns nil: records carry no pod name. Until the first list
// completes the index finds nothing.
func StartPodIndex(ctx context.Context, client kubernetes.Interface, node string, log *slog.Logger) *PodIndex {
	if client == nil || node == "" {
		log.Info("pod names in flow records: off (no cluster, or NODE_NAME unset)")
		return nil
	}
	idx, err := NewPodIndex(client, node, 0)
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
	return idx
}
