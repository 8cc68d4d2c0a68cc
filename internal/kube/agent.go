package kube

import (
	"context"
	"errors"
	"log/slog"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// OptionalClients returns clients (typed, and dynamic for
// MasqueradePolicies) when running in a cluster or given a kubeconfig, and
// nil when neither: Kubernetes is optional for the agent (pod CIDRs can be
// flags, pod names and MasqueradePolicies are then off).
func OptionalClients(kubeconfig string) (kubernetes.Interface, dynamic.Interface, error) {
	cfg, err := Config(kubeconfig)
	if errors.Is(err, rest.ErrNotInCluster) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	return client, dyn, err
}

// StartMasqueradeWatcher starts the MasqueradePolicy watcher for the pods
// of idx and returns it with whether the CRD is served now (the agent then
// waits for its first list at start). Without a pod index it returns nil:
// the node policy decides every flow.
func StartMasqueradeWatcher(ctx context.Context, client kubernetes.Interface, dyn dynamic.Interface, idx *PodIndex, opts MasqueradeOptions) (*MasqueradeWatcher, bool) {
	log := opts.Logger
	if idx == nil || dyn == nil {
		log.Info("MasqueradePolicies: off (no cluster, or NODE_NAME unset)")
		return nil, false
	}
	w, err := NewMasqueradeWatcher(client, dyn, idx, opts)
	if err != nil {
		log.Warn("MasqueradePolicies: off", "err", err)
		return nil, false
	}
	served := false
	if rs, err := client.Discovery().ServerResourcesForGroupVersion(MasqueradePolicyResource.GroupVersion().String()); err == nil {
		for _, r := range rs.APIResources {
			served = served || r.Name == MasqueradePolicyResource.Resource
		}
	}
	if !served {
		log.Info("MasqueradePolicies: the masqueradepolicies.nfmasq.io CRD is not installed; the node policy decides until it is")
	}
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Warn("MasqueradePolicies not listed; the node policy decides", "err", err)
		}
	}()
	return w, served
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
