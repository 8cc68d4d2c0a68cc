package kube

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ErrNodeNameUnset is returned by NodePodCIDRs when NODE_NAME is empty, so
// there is no Node to read.
var ErrNodeNameUnset = errors.New("no --pod-cidr given and NODE_NAME is not set (set it from the downward API, fieldPath spec.nodeName)")

// ErrNoPodCIDRs matches (errors.Is) the error NodePodCIDRs returns for a
// Node that has no pod CIDRs assigned.
var ErrNoPodCIDRs = errors.New("node has no spec.podCIDRs")

// noPodCIDRsError words the refusal to start for one node while still
// matching ErrNoPodCIDRs.
type noPodCIDRsError struct{ node string }

func (e noPodCIDRsError) Error() string {
	return fmt.Sprintf("no --pod-cidr given and node %s has no spec.podCIDRs", e.node)
}

func (e noPodCIDRsError) Is(target error) bool { return target == ErrNoPodCIDRs }

// NodePodCIDRs returns the pod CIDRs of the named Node: spec.podCIDRs, or
// spec.podCIDR on a cluster that only sets the older single field. They
// come back canonical, in the Node's order (the primary family first).
// A missing Node is an API NotFound error (apierrors.IsNotFound); every
// message says that --pod-cidr is the way round it.
func NodePodCIDRs(ctx context.Context, client kubernetes.Interface, nodeName string) ([]netip.Prefix, error) {
	if nodeName == "" {
		return nil, ErrNodeNameUnset
	}
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("no --pod-cidr given and node %s cannot be read: %w", nodeName, err)
	}
	texts := node.Spec.PodCIDRs
	if len(texts) == 0 && node.Spec.PodCIDR != "" {
		texts = []string{node.Spec.PodCIDR}
	}
	if len(texts) == 0 {
		return nil, noPodCIDRsError{node: nodeName}
	}
	prefixes := make([]netip.Prefix, 0, len(texts))
	for i, s := range texts {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("node %s: spec.podCIDRs[%d]: %w", nodeName, i, err)
		}
		prefixes = append(prefixes, p.Masked())
	}
	return prefixes, nil
}
