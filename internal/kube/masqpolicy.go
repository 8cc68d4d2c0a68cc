package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/nfmasq/nfmasq/nat"
)

// MasqueradePolicyResource is the MasqueradePolicy CRD's resource.
var MasqueradePolicyResource = schema.GroupVersionResource{Group: nat.MasqueradePolicyGroup, Version: nat.MasqueradePolicyVersion, Resource: "masqueradepolicies"}

// MasqueradePolicy condition types (besides ConditionValid) and reasons.
const (
	ConditionConflicting = "Conflicting"
	ReasonAccepted       = "Accepted"
	ReasonInvalid        = "Invalid"
	ReasonTie            = "TiesWithAnotherPolicy"
	ReasonNoTie          = "NoTie"
	// AgentFieldManager names the agent's writes (policy status).
	AgentFieldManager = "nfmasq-agent"
)

// namespaceNameLabel is the label the API server sets on every namespace.
const namespaceNameLabel = "kubernetes.io/metadata.name"

// MasqueradeOptions configure a MasqueradeWatcher.
type MasqueradeOptions struct {
	// PodCIDRs are the node's pod ranges: a source there that no known pod
	// has waits for its identity while policies exist.
	PodCIDRs []netip.Prefix
	// ClusterCIDRs are never decided by a policy.
	ClusterCIDRs []netip.Prefix
	// Node names the agent in its events.
	Node string
	// StatusJitter bounds the random delay before status writes (0:
	// DefaultStatusJitter; negative: none).
	StatusJitter time.Duration
	// Recorder receives Warning events; nil makes one on the cluster.
	Recorder record.EventRecorder
	Logger   *slog.Logger
}

// MasqueradeWatcher turns the cluster's MasqueradePolicies, namespaces and
// the node's pods (a PodIndex) into the per-pod decisions the queue reads
// (nat.Workloads), and reports each policy's verdict in its status.
//
// Policies are compiled again only when a policy changes; a pod or
// namespace change looks up the compiled set of each pod, which is shared
// by every pod the same policies select, so a label change costs a map
// rebuild, not a compile.
type MasqueradeWatcher struct {
	client   kubernetes.Interface
	policies dynamic.NamespaceableResourceInterface
	pods     *PodIndex
	opts     MasqueradeOptions
	log      *slog.Logger
	recorder record.EventRecorder

	dynFactory     dynamicinformer.DynamicSharedInformerFactory
	policyInformer cache.SharedIndexInformer
	factory        informers.SharedInformerFactory
	nsInformer     cache.SharedIndexInformer
	kick           chan struct{}
	verdictCh      chan policyVerdict

	cur      atomic.Pointer[nat.Workloads]
	compiled atomic.Pointer[nat.MasqueradePolicies]
	invalid  atomic.Int64
	mu       sync.Mutex
	changed  chan struct{}
	synced   atomic.Bool
	// Owned by Run's goroutine: the policies' names with generations and
	// with resource versions at the last compile or status check, and
	// the verdicts of the last compile.
	generations, versions string
	verdicts              map[string]error
	conflicts             map[string][]nat.Conflict
	statusErr             string // last status write error logged
}

// NewMasqueradeWatcher prepares a watcher; Run starts it.
func NewMasqueradeWatcher(client kubernetes.Interface, dyn dynamic.Interface, pods *PodIndex, opts MasqueradeOptions) (*MasqueradeWatcher, error) {
	if pods == nil {
		return nil, fmt.Errorf("MasqueradePolicies need the node's pods (NODE_NAME)")
	}
	w := &MasqueradeWatcher{
		client:    client,
		policies:  dyn.Resource(MasqueradePolicyResource),
		pods:      pods,
		opts:      opts,
		log:       opts.Logger,
		recorder:  opts.Recorder,
		kick:      make(chan struct{}, 1),
		verdictCh: make(chan policyVerdict, 1),
		changed:   make(chan struct{}),
	}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	if w.opts.StatusJitter == 0 {
		w.opts.StatusJitter = DefaultStatusJitter
	}
	w.dynFactory = dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	w.policyInformer = w.dynFactory.ForResource(MasqueradePolicyResource).Informer()
	w.factory = informers.NewSharedInformerFactory(client, 0)
	w.nsInformer = w.factory.Core().V1().Namespaces().Informer()
	// Selectors read a namespace's labels only.
	if err := w.nsInformer.SetTransform(func(obj any) (any, error) {
		ns, ok := obj.(*corev1.Namespace)
		if !ok {
			return obj, nil
		}
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Name, Labels: ns.Labels, ResourceVersion: ns.ResourceVersion}}, nil
	}); err != nil {
		return nil, err
	}
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.poke() },
		UpdateFunc: func(any, any) { w.poke() },
		DeleteFunc: func(any) { w.poke() },
	}
	for _, inf := range []cache.SharedIndexInformer{w.policyInformer, w.nsInformer} {
		if _, err := inf.AddEventHandler(poke); err != nil {
			return nil, err
		}
	}
	return w, nil
}

func (w *MasqueradeWatcher) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Workloads returns the per-pod decisions in force: nil until the
// policies and namespaces were listed once.
func (w *MasqueradeWatcher) Workloads() *nat.Workloads { return w.cur.Load() }

// Policies returns the valid policies compiled last (nil before).
func (w *MasqueradeWatcher) Policies() *nat.MasqueradePolicies { return w.compiled.Load() }

// Invalid returns how many policies were skipped as invalid at the last
// compile.
func (w *MasqueradeWatcher) Invalid() int { return int(w.invalid.Load()) }

// Changed returns a channel closed at the next publish of Workloads.
func (w *MasqueradeWatcher) Changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changed
}

// Run lists and watches until ctx is done. It returns an error only when
// the first list does not complete (the CRD is missing, say) before ctx
// ends; until then Workloads is nil and the node policy decides alone.
func (w *MasqueradeWatcher) Run(ctx context.Context) error {
	if w.recorder == nil {
		b := record.NewBroadcaster(record.WithContext(ctx))
		b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: w.client.CoreV1().Events("")})
		w.recorder = b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: AgentFieldManager, Host: w.opts.Node})
		defer b.Shutdown()
	}
	defer w.dynFactory.Shutdown()
	defer w.factory.Shutdown()
	w.dynFactory.Start(ctx.Done())
	w.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), w.policyInformer.HasSynced, w.nsInformer.HasSynced, w.pods.HasSynced) {
		return fmt.Errorf("MasqueradePolicies: first list did not complete (is the masqueradepolicies.nfmasq.io CRD installed?): %w", context.Cause(ctx))
	}
	w.synced.Store(true)
	go w.writeStatuses(ctx)
	for {
		podsChanged := w.pods.Changed()
		w.rebuild()
		select {
		case <-ctx.Done():
			return nil
		case <-w.kick:
		case <-podsChanged:
		}
	}
}

// rebuild publishes the decisions for the current policies, namespaces and
// pods, compiling the policies again only when one changed.
func (w *MasqueradeWatcher) rebuild() {
	objs := w.policyInformer.GetStore().List()
	all := w.compile(objs)
	nsLabels := map[string]labels.Set{}
	for _, obj := range w.nsInformer.GetStore().List() {
		if ns, ok := obj.(*corev1.Namespace); ok {
			set := labels.Set(maps.Clone(ns.Labels))
			if set == nil {
				set = labels.Set{}
			}
			set[namespaceNameLabel] = ns.Name
			nsLabels[ns.Name] = set
		}
	}
	pods := map[netip.Addr]*nat.PolicySet{}
	for addr, ref := range w.pods.Pods() {
		nl, ok := nsLabels[ref.Namespace]
		if !ok {
			continue // its namespace is not known yet: so neither is the pod
		}
		set, err := all.For(nat.Workload{Namespace: ref.Namespace, Labels: ref.Labels, NamespaceLabels: nl})
		if err != nil {
			w.log.Error("MasqueradePolicies: compiling a pod's policies failed; the node policy decides for it", "pod", ref.Key, "err", err)
		}
		pods[addr] = set
	}
	var hold []netip.Prefix
	if all.Len() > 0 {
		hold = w.opts.PodCIDRs
	}
	w.cur.Store(nat.NewWorkloads(pods, hold))
	w.mu.Lock()
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

// compile parses the policies and writes their status when they changed
// since the last compile; otherwise it returns the compiled set as is.
func (w *MasqueradeWatcher) compile(objs []any) *nat.MasqueradePolicies {
	var us []*unstructured.Unstructured
	for _, o := range objs {
		if u, ok := o.(*unstructured.Unstructured); ok {
			us = append(us, u)
		}
	}
	slices.SortFunc(us, func(a, b *unstructured.Unstructured) int { return strings.Compare(a.GetName(), b.GetName()) })
	var gens, rvs strings.Builder
	for _, u := range us {
		fmt.Fprintf(&gens, "%s@%d,", u.GetName(), u.GetGeneration())
		fmt.Fprintf(&rvs, "%s@%s,", u.GetName(), u.GetResourceVersion())
	}
	// A spec change (a new generation) compiles again; a status write by
	// another agent (a new resource version only) just checks statuses.
	if cur := w.compiled.Load(); cur != nil && gens.String() == w.generations {
		if rvs.String() != w.versions {
			w.versions = rvs.String()
			w.judged(w.verdicts, w.conflicts)
		}
		return cur
	}
	w.generations, w.versions = gens.String(), rvs.String()

	var valid []nat.MasqueradePolicy
	verdicts := map[string]error{}
	for _, u := range us {
		p, err := ParsePolicyObject(u)
		verdicts[u.GetName()] = err
		if err == nil {
			valid = append(valid, p)
		}
	}
	all, err := nat.NewMasqueradePolicies(valid, w.opts.ClusterCIDRs)
	if err != nil { // names are unique in the API: cannot happen
		w.log.Error("MasqueradePolicies", "err", err)
		all, _ = nat.NewMasqueradePolicies(nil, w.opts.ClusterCIDRs)
	}
	w.compiled.Store(all)
	w.invalid.Store(int64(len(us) - len(valid)))
	w.verdicts, w.conflicts = verdicts, all.Conflicts()
	w.judged(w.verdicts, w.conflicts)
	w.log.Info("MasqueradePolicies compiled", "valid", len(valid), "invalid", len(us)-len(valid))
	return all
}

// ParsePolicyObject reads a MasqueradePolicy from the API.
func ParsePolicyObject(u *unstructured.Unstructured) (nat.MasqueradePolicy, error) {
	data, err := json.Marshal(map[string]any{
		"apiVersion": u.GetAPIVersion(),
		"kind":       u.GetKind(),
		"metadata":   map[string]any{"name": u.GetName()},
		"spec":       u.Object["spec"],
	})
	if err != nil {
		return nat.MasqueradePolicy{}, err
	}
	return nat.ParseMasqueradePolicy(data)
}

// policyVerdict is what the statuses must say: per policy, why it is invalid
// (nil: valid) and what it ties with.
type policyVerdict struct {
	invalid   map[string]error
	conflicts map[string][]nat.Conflict
}

// judged hands the latest verdict to the status writer, replacing one it
// has not taken yet.
func (w *MasqueradeWatcher) judged(invalid map[string]error, conflicts map[string][]nat.Conflict) {
	select {
	case <-w.verdictCh:
	default:
	}
	w.verdictCh <- policyVerdict{invalid, conflicts}
}

// DefaultStatusJitter bounds the random delay before an agent writes
// policy statuses. Every agent judges every policy the same; with the
// delay, the first to write settles it and the others, whose informers
// have seen that write by the time their delay ends, write nothing: a
// policy change costs the API server a write per policy, not one per
// node and policy.
const DefaultStatusJitter = 5 * time.Second

// writeStatuses writes each verdict after a random delay, against the
// policies as the informer holds them then, until ctx ends. Writes never
// hold up the decisions: they are published first.
func (w *MasqueradeWatcher) writeStatuses(ctx context.Context) {
	for {
		var v policyVerdict
		select {
		case <-ctx.Done():
			return
		case v = <-w.verdictCh:
		}
		if j := w.opts.StatusJitter; j > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(rand.N(j)):
			}
		}
		for _, o := range w.policyInformer.GetStore().List() {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			invalid, judged := v.invalid[u.GetName()]
			if !judged {
				continue // created since: the next verdict covers it
			}
			w.writeStatus(ctx, u, invalid, v.conflicts[u.GetName()])
		}
	}
}

// writeStatus sets the Valid and Conflicting conditions when they differ
// from the policy's. Every agent computes the same verdict from the same
// objects; the write carries the resourceVersion it read, so of the agents
// that see a change at once one write succeeds, the others get a conflict
// and find the status right at their next look. The one whose write
// succeeded records the Warning event.
func (w *MasqueradeWatcher) writeStatus(ctx context.Context, u *unstructured.Unstructured, invalid error, conflicts []nat.Conflict) {
	valid := metav1.Condition{Type: ConditionValid, Status: metav1.ConditionTrue, Reason: ReasonAccepted,
		Message: "the agents apply this policy", ObservedGeneration: u.GetGeneration()}
	if invalid != nil {
		valid.Status, valid.Reason, valid.Message = metav1.ConditionFalse, ReasonInvalid, invalid.Error()+"; the policy is skipped"
	}
	conflicting := metav1.Condition{Type: ConditionConflicting, Status: metav1.ConditionFalse, Reason: ReasonNoTie,
		Message: "no other policy lists one of its destinations with the other action for pods it may select", ObservedGeneration: u.GetGeneration()}
	if len(conflicts) > 0 {
		var parts []string
		for _, c := range conflicts {
			parts = append(parts, fmt.Sprintf("%s on %s", c.With, c.CIDR))
		}
		if len(parts) > 8 {
			parts = append(parts[:8], fmt.Sprintf("and %d more", len(parts)-8))
		}
		conflicting.Status, conflicting.Reason = metav1.ConditionTrue, ReasonTie
		conflicting.Message = "ties with " + strings.Join(parts, ", ") + ": for pods both select, Masquerade wins there"
	}
	conds, _ := conditions(u)
	same := func(c metav1.Condition) bool {
		old := meta.FindStatusCondition(conds, c.Type)
		return old != nil && old.Status == c.Status && old.Reason == c.Reason && old.Message == c.Message && old.ObservedGeneration == c.ObservedGeneration
	}
	validChanged, conflictChanged := !same(valid), !same(conflicting)
	if !validChanged && !conflictChanged {
		return
	}
	now := metav1.NewTime(time.Now())
	valid.LastTransitionTime, conflicting.LastTransitionTime = now, now
	meta.SetStatusCondition(&conds, valid)
	meta.SetStatusCondition(&conds, conflicting)
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": u.GetResourceVersion()},
		"status":   map[string]any{"observedGeneration": u.GetGeneration(), "conditions": conds},
	})
	if err == nil {
		_, err = w.policies.Patch(ctx, u.GetName(), types.MergePatchType, patch, metav1.PatchOptions{FieldManager: AgentFieldManager}, "status")
	}
	switch {
	case apierrors.IsConflict(err) || apierrors.IsNotFound(err):
		return // another agent wrote it first, or the policy is gone
	case err != nil:
		if msg := err.Error(); msg != w.statusErr {
			w.statusErr = msg
			w.log.Warn("MasqueradePolicy status not written", "policy", u.GetName(), "err", err)
		}
		return
	}
	ref := &corev1.ObjectReference{APIVersion: MasqueradePolicyResource.GroupVersion().String(), Kind: nat.MasqueradePolicyKind,
		Name: u.GetName(), UID: u.GetUID(), ResourceVersion: u.GetResourceVersion()}
	if invalid != nil && validChanged {
		w.log.Warn("MasqueradePolicy skipped", "policy", u.GetName(), "err", invalid)
		w.recorder.Event(ref, corev1.EventTypeWarning, ReasonInvalid, valid.Message)
	}
	if len(conflicts) > 0 && conflictChanged {
		w.log.Warn("MasqueradePolicies tie", "policy", u.GetName(), "message", conflicting.Message)
		w.recorder.Event(ref, corev1.EventTypeWarning, ReasonTie, conflicting.Message)
	}
}

// PolicyCounts returns the valid and invalid policies of the last compile.
func (w *MasqueradeWatcher) PolicyCounts() (valid, invalid int) {
	if all := w.Policies(); all != nil {
		valid = all.Len()
	}
	return valid, w.Invalid()
}

// PodWorkload returns what MasqueradePolicy selectors see of the pod
// "namespace/name" (its namespace's labels with kubernetes.io/metadata.name),
// and the cluster's MasqueradePolicies, the valid ones parsed and one
// error per invalid one: `nfmasq explain --pod`.
func PodWorkload(ctx context.Context, client kubernetes.Interface, dyn dynamic.Interface, key string) (nat.Workload, []nat.MasqueradePolicy, []error, error) {
	ns, name, ok := strings.Cut(key, "/")
	if !ok || ns == "" || name == "" {
		return nat.Workload{}, nil, nil, fmt.Errorf("pod %q: want NAMESPACE/NAME", key)
	}
	pod, err := client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nat.Workload{}, nil, nil, err
	}
	nsObj, err := client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		return nat.Workload{}, nil, nil, err
	}
	w := nat.Workload{Namespace: ns, Labels: labels.Set(pod.Labels), NamespaceLabels: labels.Set(maps.Clone(nsObj.Labels))}
	if w.NamespaceLabels == nil {
		w.NamespaceLabels = labels.Set{}
	}
	w.NamespaceLabels[namespaceNameLabel] = ns
	list, err := dyn.Resource(MasqueradePolicyResource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return w, nil, nil, fmt.Errorf("listing MasqueradePolicies: %w", err)
	}
	var ps []nat.MasqueradePolicy
	var errs []error
	for i := range list.Items {
		p, err := ParsePolicyObject(&list.Items[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ps = append(ps, p)
	}
	return w, ps, errs, nil
}
