package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/nfmasq/nfmasq/nat"
)

// EgressOptions configure an EgressController.
type EgressOptions struct {
	// ClusterCIDRs are the cluster's pod, service and node ranges. They
	// form the managed policy ManagedPolicyName(ClusterCIDRs), which the
	// controller creates and restores. Empty means no managed policy.
	ClusterCIDRs []netip.Prefix
	// GenerateDefaultPolicy keeps a policy named DefaultPolicyName in the
	// cluster, as GKE generates one: when there is none (at start, or
	// after someone deleted it) the controller creates it with GKE's
	// default ranges. It never changes an existing one, whatever its spec;
	// the operator owns that. Deleting it therefore resets it to the
	// defaults, and emptying its destinations is how to drop them.
	GenerateDefaultPolicy bool
	// ConfigMap is the agent's ConfigMap, usually kube-system/ip-masq-agent.
	ConfigMap types.NamespacedName
	// ConfigMapKey is the data key holding the agent's config; empty means
	// AgentConfigKey.
	ConfigMapKey string
	// Resync is how often the informers replay their caches, so that the
	// ConfigMap and the managed policy are checked again even without
	// events; 0 means 5 minutes.
	Resync time.Duration
	// Logger receives what the controller did and why; nil discards.
	Logger *slog.Logger
	// Recorder records the Events about policies; nil makes one that
	// writes Events through the client.
	Recorder record.EventRecorder
}

// EgressController turns the cluster's EgressNATPolicy objects into the
// agent's ConfigMap. Every change to a policy or to the ConfigMap queues
// the one key there is; the single worker then recomputes everything from
// the informers' caches, writes only what differs, and on failure retries
// the key with back-off, so a restarted or unreachable API server only
// delays convergence.
type EgressController struct {
	client   kubernetes.Interface
	policies dynamic.NamespaceableResourceInterface
	opts     EgressOptions
	managed  string         // name of the managed policy, "" when none
	spec     map[string]any // the managed policy's spec
	log      *slog.Logger
	recorder record.EventRecorder
	// broadcaster is set when the controller made its own recorder, and
	// stopped when Run returns.
	broadcaster record.EventBroadcaster

	policyInformer cache.SharedIndexInformer
	configMaps     corelisters.ConfigMapLister
	configInformer cache.SharedIndexInformer
	dynFactory     dynamicinformer.DynamicSharedInformerFactory
	factory        informers.SharedInformerFactory
	queue          workqueue.TypedRateLimitingInterface[string]

	// reconciled counts finished reconciliations, failed or not; tests
	// wait on it instead of sleeping.
	reconciled atomic.Int64
	// stats are exported as metrics (Collect).
	stats egressStats
}

// syncKey is the work queue's only key: every reconciliation recomputes
// the whole ConfigMap, so there is nothing finer to queue.
const syncKey = "egressnatpolicies"

// NewEgressController prepares a controller; Run starts it.
func NewEgressController(client kubernetes.Interface, dyn dynamic.Interface, opts EgressOptions) (*EgressController, error) {
	if opts.ConfigMap.Namespace == "" || opts.ConfigMap.Name == "" {
		return nil, fmt.Errorf("egress controller: ConfigMap %q needs a namespace and a name", opts.ConfigMap)
	}
	for _, p := range opts.ClusterCIDRs {
		if !p.IsValid() || p.Masked() != p {
			return nil, fmt.Errorf("egress controller: cluster CIDR %s is not a canonical prefix", p)
		}
	}
	if opts.ConfigMapKey == "" {
		opts.ConfigMapKey = AgentConfigKey
	}
	if opts.Resync == 0 {
		opts.Resync = 5 * time.Minute
	}
	c := &EgressController{
		client:   client,
		policies: dyn.Resource(EgressPolicyResource),
		opts:     opts,
		log:      opts.Logger,
		recorder: opts.Recorder,
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if len(opts.ClusterCIDRs) > 0 {
		c.managed = ManagedPolicyName(opts.ClusterCIDRs)
		c.spec = managedPolicySpec(opts.ClusterCIDRs)
	}

	c.dynFactory = dynamicinformer.NewDynamicSharedInformerFactory(dyn, opts.Resync)
	c.policyInformer = c.dynFactory.ForResource(EgressPolicyResource).Informer()
	// Only the agent's ConfigMap: the controller's RBAC allows no more.
	c.factory = informers.NewSharedInformerFactoryWithOptions(client, opts.Resync,
		informers.WithNamespace(opts.ConfigMap.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", opts.ConfigMap.Name).String()
		}))
	cms := c.factory.Core().V1().ConfigMaps()
	c.configInformer, c.configMaps = cms.Informer(), cms.Lister()

	c.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "egressnatpolicy"})
	enqueue := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.queue.Add(syncKey) },
		UpdateFunc: func(any, any) { c.queue.Add(syncKey) },
		DeleteFunc: func(any) { c.queue.Add(syncKey) },
	}
	for _, inf := range []cache.SharedIndexInformer{c.policyInformer, c.configInformer} {
		if _, err := inf.AddEventHandler(enqueue); err != nil {
			return nil, fmt.Errorf("egress controller: %w", err)
		}
	}
	return c, nil
}

// ManagedPolicy returns the name of the policy the controller keeps for
// the cluster's ranges, "" when it has none.
func (c *EgressController) ManagedPolicy() string { return c.managed }

// Run reconciles until ctx is done, then stops its informers and returns
// nil. It returns an error only when the informers' first sync does not
// complete before ctx is done.
func (c *EgressController) Run(ctx context.Context) error {
	if c.recorder == nil {
		c.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
		c.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.client.CoreV1().Events("")})
		c.recorder = c.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: ManagedByValue})
		defer c.broadcaster.Shutdown()
	}
	defer c.factory.Shutdown()
	defer c.dynFactory.Shutdown()
	defer c.queue.ShutDown()
	c.stats.running.Store(true)
	defer c.stats.running.Store(false)

	c.dynFactory.Start(ctx.Done())
	c.factory.Start(ctx.Done())
	c.log.Info("egress controller starting", "configMap", c.opts.ConfigMap.String(), "key", c.opts.ConfigMapKey,
		"managedPolicy", c.managed, "clusterCIDRs", prefixTexts(c.opts.ClusterCIDRs),
		"generateDefaultPolicy", c.opts.GenerateDefaultPolicy)
	if !cache.WaitForCacheSync(ctx.Done(), c.policyInformer.HasSynced, c.configInformer.HasSynced) {
		return fmt.Errorf("egress controller: caches did not sync (is the EgressNATPolicy CRD installed?): %w", context.Cause(ctx))
	}
	// The managed policy and the ConfigMap are checked once at start even
	// if no object exists to produce an event.
	c.queue.Add(syncKey)

	go func() {
		<-ctx.Done()
		c.queue.ShutDown()
	}()
	for c.processNext(ctx) {
	}
	return nil
}

func (c *EgressController) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	err := c.reconcile(ctx)
	c.reconciled.Add(1)
	if err == nil {
		c.stats.ok.Add(1)
		c.stats.lastOK.Store(time.Now().UnixNano())
	} else if ctx.Err() == nil {
		c.stats.failed.Add(1)
	}
	if err != nil {
		switch {
		case ctx.Err() != nil:
		case apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err):
			// The caches had not yet seen a write (ours or another's);
			// the retry works from the newer state.
			c.log.Debug("reconcile raced a write; retrying", "err", err)
		default:
			c.log.Warn("reconcile failed; retrying", "err", err, "retries", c.queue.NumRequeues(key))
		}
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	return true
}

// reconcile makes the world agree with the policies: the managed policy
// exists with its spec, the default policy exists (when generated), the
// ConfigMap holds the union of valid policies, and each policy's condition
// says whether it is in that union. The ConfigMap comes before conditions
// because it is what the dataplane reads.
func (c *EgressController) reconcile(ctx context.Context) error {
	objs, err := c.listPolicies()
	if err != nil {
		return err
	}
	wroteManaged, err := c.ensureManaged(ctx, objs)
	if err != nil {
		return err
	}
	generated, err := c.ensureDefault(ctx, objs)
	if err != nil {
		return err
	}

	verdicts := make([]verdict, len(objs))
	for i, obj := range objs {
		if obj.GetName() == c.managed && wroteManaged {
			// The cache still holds the edited copy; judge what was written.
			obj = obj.DeepCopy()
			obj.Object["spec"] = c.spec
		}
		verdicts[i] = judge(obj)
	}
	if !slices.ContainsFunc(objs, func(o *unstructured.Unstructured) bool { return o.GetName() == c.managed }) && c.managed != "" {
		// Just created: not in the cache yet, but its ranges count now.
		verdicts = append(verdicts, judge(c.managedObject()))
	}
	if generated != nil {
		verdicts = append(verdicts, judge(generated))
	}

	if err := c.writeConfigMap(ctx, nonMasqueradeCIDRs(verdicts)); err != nil {
		return err
	}

	var errs []error
	for i, obj := range objs {
		if obj.GetName() == c.managed && wroteManaged {
			continue // its resourceVersion is stale; the write's own event brings it back
		}
		if err := c.writeCondition(ctx, obj, verdicts[i].condition); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// listPolicies returns the cached policies sorted by name, so that logs
// and retries are deterministic.
func (c *EgressController) listPolicies() ([]*unstructured.Unstructured, error) {
	items := c.policyInformer.GetStore().List()
	objs := make([]*unstructured.Unstructured, 0, len(items))
	for _, item := range items {
		obj, ok := item.(*unstructured.Unstructured)
		if !ok {
			return nil, fmt.Errorf("policy cache holds %T", item)
		}
		objs = append(objs, obj)
	}
	slices.SortFunc(objs, func(a, b *unstructured.Unstructured) int { return strings.Compare(a.GetName(), b.GetName()) })
	return objs, nil
}

// managedObject is the managed policy as it must be.
func (c *EgressController) managedObject() *unstructured.Unstructured {
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": EgressPolicyResource.GroupVersion().String(),
		"kind":       "EgressNATPolicy",
		"metadata": map[string]any{
			"name":   c.managed,
			"labels": map[string]any{ManagedByLabel: ManagedByValue},
		},
		"spec": runtime.DeepCopyJSONValue(c.spec),
	}}
	return obj
}

// ensureManaged creates the managed policy when it is missing and undoes
// edits to its spec. It reports whether it wrote.
func (c *EgressController) ensureManaged(ctx context.Context, objs []*unstructured.Unstructured) (bool, error) {
	if c.managed == "" {
		return false, nil
	}
	i := slices.IndexFunc(objs, func(o *unstructured.Unstructured) bool { return o.GetName() == c.managed })
	if i < 0 {
		created, err := c.policies.Create(ctx, c.managedObject(), metav1.CreateOptions{FieldManager: ManagedByValue})
		if apierrors.IsAlreadyExists(err) {
			return false, fmt.Errorf("managed policy %s exists but is not in the cache yet: %w", c.managed, err)
		}
		if err != nil {
			return false, fmt.Errorf("create managed policy %s: %w", c.managed, err)
		}
		c.log.Info("created the managed policy", "policy", c.managed, "destinations", prefixTexts(c.opts.ClusterCIDRs))
		c.recorder.Event(policyRef(created), corev1.EventTypeNormal, ReasonRestored,
			"created by the egress controller with the cluster's ranges")
		return true, nil
	}
	current := objs[i]
	spec, _, _ := unstructured.NestedFieldNoCopy(current.Object, "spec")
	if reflect.DeepEqual(spec, c.spec) {
		return false, nil
	}
	restored := current.DeepCopy()
	restored.Object["spec"] = runtime.DeepCopyJSONValue(c.spec)
	if _, err := c.policies.Update(ctx, restored, metav1.UpdateOptions{FieldManager: ManagedByValue}); err != nil {
		return false, fmt.Errorf("restore managed policy %s: %w", c.managed, err)
	}
	c.log.Info("restored the managed policy's spec", "policy", c.managed)
	c.recorder.Event(policyRef(current), corev1.EventTypeNormal, ReasonRestored,
		"spec restored to the cluster's ranges; edit another policy instead")
	return true, nil
}

// ensureDefault creates the default policy when GenerateDefaultPolicy is
// set and the cache holds no policy of that name. It returns what it
// created, nil when it did nothing. The policy's spec is never compared:
// whatever the operator made of it stands.
func (c *EgressController) ensureDefault(ctx context.Context, objs []*unstructured.Unstructured) (*unstructured.Unstructured, error) {
	if !c.opts.GenerateDefaultPolicy ||
		slices.ContainsFunc(objs, func(o *unstructured.Unstructured) bool { return o.GetName() == DefaultPolicyName }) {
		return nil, nil
	}
	created, err := c.policies.Create(ctx, DefaultPolicy(), metav1.CreateOptions{FieldManager: ManagedByValue})
	if apierrors.IsAlreadyExists(err) {
		// Someone (an operator's apply, or this controller a moment ago)
		// created it and the cache has not caught up; never overwrite it.
		return nil, fmt.Errorf("default policy exists but is not in the cache yet: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("create the default policy: %w", err)
	}
	c.log.Info("generated the default policy", "policy", DefaultPolicyName, "destinations", nat.DefaultNonMasqueradeCIDRs(true))
	c.recorder.Event(policyRef(created), corev1.EventTypeNormal, ReasonGenerated,
		"generated by the egress controller with GKE's default ranges; edit it freely, or delete it to get the defaults back")
	return created, nil
}

// writeConfigMap stores cidrs as the agent's nonMasqueradeCIDRs, creating
// the ConfigMap if needed, and does nothing when they are already there.
func (c *EgressController) writeConfigMap(ctx context.Context, cidrs []string) error {
	name, key := c.opts.ConfigMap, c.opts.ConfigMapKey
	cm, err := c.configMaps.ConfigMaps(name.Namespace).Get(name.Name)
	exists := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("configmap %s: %w", name, err)
	}
	var current string
	if exists {
		current = cm.Data[key]
	}
	text, changed, note, err := renderAgentConfig(current, exists, cidrs)
	if err != nil {
		return fmt.Errorf("configmap %s: %w", name, err)
	}
	if !changed {
		return nil
	}
	if note != "" {
		c.log.Warn("configmap "+name.String()+": "+note, "key", key)
	}
	if !exists {
		cm = &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{
				Name: name.Name, Namespace: name.Namespace,
				Labels: map[string]string{ManagedByLabel: ManagedByValue},
			},
			Data: map[string]string{key: text},
		}
		if _, err := c.client.CoreV1().ConfigMaps(name.Namespace).Create(ctx, cm, metav1.CreateOptions{FieldManager: ManagedByValue}); err != nil {
			return fmt.Errorf("create configmap %s: %w", name, err)
		}
		c.log.Info("created the agent's configmap", "configMap", name.String(), "nonMasqueradeCIDRs", len(cidrs))
		return nil
	}
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[key] = text
	if _, err := c.client.CoreV1().ConfigMaps(name.Namespace).Update(ctx, cm, metav1.UpdateOptions{FieldManager: ManagedByValue}); err != nil {
		return fmt.Errorf("update configmap %s: %w", name, err)
	}
	c.log.Info("updated the agent's configmap", "configMap", name.String(), "nonMasqueradeCIDRs", len(cidrs))
	return nil
}

// writeCondition sets the policy's Valid condition when it differs from
// what the policy shows, and records a Warning event when a policy becomes
// (or stays, with a new reason) invalid. Writing only on change keeps a
// steady cluster free of writes and events across resyncs.
func (c *EgressController) writeCondition(ctx context.Context, obj *unstructured.Unstructured, cond metav1.Condition) error {
	conds, err := conditions(obj)
	if err != nil {
		c.log.Warn("policy status is unreadable; rewriting it", "policy", obj.GetName(), "err", err)
	}
	observed, _, _ := unstructured.NestedInt64(obj.Object, "status", "observedGeneration")
	if old := meta.FindStatusCondition(conds, cond.Type); old != nil && observed == obj.GetGeneration() &&
		old.Status == cond.Status && old.Reason == cond.Reason && old.Message == cond.Message &&
		old.ObservedGeneration == cond.ObservedGeneration {
		return nil
	}
	meta.SetStatusCondition(&conds, cond)
	list := make([]any, len(conds))
	for i := range conds {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&conds[i])
		if err != nil {
			return fmt.Errorf("policy %s: condition: %w", obj.GetName(), err)
		}
		list[i] = m
	}
	updated := obj.DeepCopy()
	if err := unstructured.SetNestedSlice(updated.Object, list, "status", "conditions"); err != nil {
		return fmt.Errorf("policy %s: %w", obj.GetName(), err)
	}
	if err := unstructured.SetNestedField(updated.Object, obj.GetGeneration(), "status", "observedGeneration"); err != nil {
		return fmt.Errorf("policy %s: %w", obj.GetName(), err)
	}
	if _, err := c.policies.UpdateStatus(ctx, updated, metav1.UpdateOptions{FieldManager: ManagedByValue}); err != nil {
		return fmt.Errorf("policy %s: update status: %w", obj.GetName(), err)
	}
	if cond.Status == metav1.ConditionFalse {
		c.log.Warn("policy skipped", "policy", obj.GetName(), "reason", cond.Reason, "message", cond.Message)
		c.recorder.Event(policyRef(obj), corev1.EventTypeWarning, cond.Reason, cond.Message)
	} else {
		c.log.Info("policy applied", "policy", obj.GetName(), "message", cond.Message)
	}
	return nil
}

// conditions decodes status.conditions of a policy.
func conditions(obj *unstructured.Unstructured) ([]metav1.Condition, error) {
	raw, found, err := unstructured.NestedSlice(obj.Object, "status", "conditions")
	if err != nil || !found {
		return nil, err
	}
	conds := make([]metav1.Condition, 0, len(raw))
	for _, item := range raw {
		m, ok := item.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("status.conditions holds %T", item)
		}
		var cond metav1.Condition
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &cond); err != nil {
			return nil, err
		}
		conds = append(conds, cond)
	}
	return conds, nil
}

// policyRef is the Event's involved object. Built by hand because the
// client-go scheme does not know the EgressNATPolicy kind.
func policyRef(obj *unstructured.Unstructured) *corev1.ObjectReference {
	return &corev1.ObjectReference{
		APIVersion:      EgressPolicyResource.GroupVersion().String(),
		Kind:            "EgressNATPolicy",
		Name:            obj.GetName(),
		UID:             obj.GetUID(),
		ResourceVersion: obj.GetResourceVersion(),
	}
}
