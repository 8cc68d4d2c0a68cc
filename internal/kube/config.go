package kube

import (
	"fmt"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// userAgent names nfmasq in the API server's audit log and metrics.
const userAgent = "nfmasq"

// Config returns the client configuration from the kubeconfig file when one
// is named, else the in-cluster configuration (the pod's service account).
// Outside a cluster with no kubeconfig the error wraps rest.ErrNotInCluster,
// so a caller for which Kubernetes is optional (pod names in flow logs)
// can tell "no cluster" from a broken configuration with errors.Is.
func Config(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig given and not running in a cluster: %w", err)
		}
	}
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = userAgent
	return cfg, nil
}

// WriteKubeconfigFor copies the kubeconfig at src to dst with every
// cluster's server set to server (an address that reaches the same API
// server from another network namespace; the certificate must still
// name its host).
func WriteKubeconfigFor(src, dst, server string) error {
	raw, err := clientcmd.LoadFromFile(src)
	if err != nil {
		return err
	}
	for _, c := range raw.Clusters {
		c.Server = server
	}
	return clientcmd.WriteToFile(*raw, dst)
}
