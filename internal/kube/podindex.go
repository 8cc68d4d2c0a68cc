package kube

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// PodIndex maps the addresses of the pods on one node to their
// "namespace/name", for flow records. It is fed by an informer that lists
// and watches only that node's pods (field selector spec.nodeName), so its
// size is bounded by the node's pod limit, not by the cluster.
//
// Host-network pods are left out: their address is the node's, shared by
// many pods, and naming one of them would be a lie. A pod that has
// finished (Succeeded, Failed) keeps its addresses until it is deleted, so
// that the end records conntrack writes after it exited (30 s later for
// UDP) still name it; a running pod always wins an address over a
// finished one, since the node may have handed the address on.
type PodIndex struct {
	// addrs is the published, immutable snapshot that Lookup reads.
	addrs atomic.Pointer[map[netip.Addr]PodRef]

	// mu serialises the informer's handlers (which client-go already runs
	// one at a time, but the index must not rely on it) and guards pods.
	mu sync.Mutex
	// pods is the index's own view: each pod's key and what it contributes.
	pods map[string]podEntry
	// changed is closed, and replaced, at every publish.
	changed chan struct{}

	node     string
	informer cache.SharedIndexInformer
	factory  informers.SharedInformerFactory
}

// podEntry is what the index keeps of a pod.
type podEntry struct {
	addrs    []netip.Addr
	created  time.Time
	finished bool
	labels   map[string]string
}

// PodRef is what the index tells of the pod behind an address: its
// "namespace/name", namespace and labels (MasqueradePolicy selectors read
// them). Labels must not be modified.
type PodRef struct {
	Key, Namespace string
	Labels         map[string]string
}

// outranks reports whether e, not o, owns an address both claim: a
// running pod over a finished one, then the newer pod (a replaced pod's
// address can be reused before its deletion arrives), then the lower key,
// so that the choice never depends on map order.
func (e podEntry) outranks(key string, o podEntry, oKey string) bool {
	switch {
	case e.finished != o.finished:
		return !e.finished
	case !e.created.Equal(o.created):
		return e.created.After(o.created)
	}
	return key < oKey
}

// NewPodIndex returns an index of the pods on nodeName. It does nothing
// until Run; until the informer has synced, Lookup finds nothing.
// resync is the informer's resync period (0 disables it; the watch alone
// keeps the index current).
func NewPodIndex(client kubernetes.Interface, nodeName string, resync time.Duration) (*PodIndex, error) {
	if nodeName == "" {
		return nil, fmt.Errorf("pod index: node name is empty (set NODE_NAME)")
	}
	selector := fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
	factory := informers.NewSharedInformerFactoryWithOptions(client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = selector }))
	x := &PodIndex{
		pods:     make(map[string]podEntry),
		changed:  make(chan struct{}),
		node:     nodeName,
		factory:  factory,
		informer: factory.Core().V1().Pods().Informer(),
	}
	empty := map[netip.Addr]PodRef{}
	x.addrs.Store(&empty)
	// Keep only what the index reads: a node's pods carry large specs and
	// managed fields that would otherwise sit in the informer's cache.
	if err := x.informer.SetTransform(slimPod); err != nil {
		return nil, fmt.Errorf("pod index: %w", err)
	}
	if _, err := x.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { x.update(obj) },
		UpdateFunc: func(_, obj any) { x.update(obj) },
		DeleteFunc: x.delete,
	}); err != nil {
		return nil, fmt.Errorf("pod index: %w", err)
	}
	return x, nil
}

// Run starts the informer, waits for its first list, and returns; the
// informer keeps running until ctx is done. It fails if ctx ends before
// the first list succeeds.
func (x *PodIndex) Run(ctx context.Context) error {
	x.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), x.informer.HasSynced) {
		return fmt.Errorf("pod index: first list of pods did not complete: %w", context.Cause(ctx))
	}
	return nil
}

// Shutdown waits for the informer's goroutines to end after Run's context
// is done.
func (x *PodIndex) Shutdown() { x.factory.Shutdown() }

// HasSynced reports whether the first list of the node's pods is in the
// index.
func (x *PodIndex) HasSynced() bool { return x.informer.HasSynced() }

// Lookup returns "namespace/name" of the pod with address addr on this
// node, or "" when none is known. It is a map read: no lock, no API call.
func (x *PodIndex) Lookup(addr netip.Addr) string {
	return (*x.addrs.Load())[addr.Unmap()].Key
}

// Pods returns the index's snapshot: every address with its pod. The map
// is never modified; the caller must not modify it either.
func (x *PodIndex) Pods() map[netip.Addr]PodRef { return *x.addrs.Load() }

// Changed returns a channel closed at the index's next change, for a
// reader waiting for an address to appear.
func (x *PodIndex) Changed() <-chan struct{} {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.changed
}

// Len returns the number of addresses in the index.
func (x *PodIndex) Len() int { return len(*x.addrs.Load()) }

func (x *PodIndex) update(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key := pod.Namespace + "/" + pod.Name
	entry := podEntry{
		created:  pod.CreationTimestamp.Time,
		finished: pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed,
		labels:   pod.Labels,
	}
	// The node check repeats the field selector so that a server (or a
	// fake) that ignores it cannot put another node's pods in the index.
	if pod.Spec.NodeName == x.node && !pod.Spec.HostNetwork {
		for _, ip := range pod.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil {
				entry.addrs = append(entry.addrs, a.Unmap())
			}
		}
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	prev, had := x.pods[key]
	if entry.finished && len(entry.addrs) == 0 && had {
		// A finished pod whose status no longer lists its addresses
		// keeps the ones it had, for the records of its last flows.
		entry.addrs = prev.addrs
	}
	if len(entry.addrs) == 0 {
		if !had {
			return
		}
		delete(x.pods, key)
	} else {
		x.pods[key] = entry
	}
	x.publish()
}

func (x *PodIndex) delete(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	key := pod.Namespace + "/" + pod.Name
	if _, had := x.pods[key]; !had {
		return
	}
	delete(x.pods, key)
	x.publish()
}

// publish rebuilds the snapshot from pods. A rebuild per change costs
// O(pods on the node), a few hundred at most, and leaves Lookup a plain
// read of a map nobody writes. x.mu must be held.
func (x *PodIndex) publish() {
	addrs := make(map[netip.Addr]PodRef, len(x.pods))
	for key, e := range x.pods {
		ns, _, _ := strings.Cut(key, "/")
		for _, a := range e.addrs {
			if cur, taken := addrs[a]; taken && !e.outranks(key, x.pods[cur.Key], cur.Key) {
				continue
			}
			addrs[a] = PodRef{Key: key, Namespace: ns, Labels: e.labels}
		}
	}
	x.addrs.Store(&addrs)
	close(x.changed)
	x.changed = make(chan struct{})
}

// slimPod drops every field the index does not read before the informer
// caches the pod.
func slimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown; its pod was slimmed when cached
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:              pod.Name,
			Namespace:         pod.Namespace,
			Labels:            pod.Labels,
			UID:               pod.UID,
			ResourceVersion:   pod.ResourceVersion,
			CreationTimestamp: pod.CreationTimestamp,
		},
		Spec: corev1.PodSpec{
			NodeName:    pod.Spec.NodeName,
			HostNetwork: pod.Spec.HostNetwork,
		},
		Status: corev1.PodStatus{
			Phase:  pod.Status.Phase,
			PodIPs: pod.Status.PodIPs,
		},
	}, nil
}
