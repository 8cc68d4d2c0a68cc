package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
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

// EnsureCRD creates the CustomResourceDefinition in crdJSON unless it
// exists, and waits up to timeout until res is served (the test API
// servers of the e2e test and the benchmark).
func EnsureCRD(ctx context.Context, dyn dynamic.Interface, crdJSON []byte, res schema.GroupVersionResource, timeout time.Duration) error {
	obj := &unstructured.Unstructured{}
	if err := json.Unmarshal(crdJSON, &obj.Object); err != nil {
		return err
	}
	crds := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	if _, err := dyn.Resource(crds).Create(ctx, obj, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		_, err := dyn.Resource(res).List(ctx, metav1.ListOptions{Limit: 1})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not served after %v: %w", res.GroupResource(), timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond): // a CRD is served within a second or so
		}
	}
}

// CreateRunningPod creates a pod bound to node and reports it Running with
// addresses ips, as kubelet would: for API servers without a kubelet (the
// integration and e2e tests, the benchmark).
func CreateRunningPod(ctx context.Context, client kubernetes.Interface, ns, name, node string, labels map[string]string, ips ...netip.Addr) (*corev1.Pod, error) {
	pods := client.CoreV1().Pods(ns)
	pod, err := pods.Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	pod.Status.Phase = corev1.PodRunning
	for _, ip := range ips {
		pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	if len(ips) > 0 {
		pod.Status.PodIP = ips[0].String()
	}
	return pods.UpdateStatus(ctx, pod, metav1.UpdateOptions{})
}
