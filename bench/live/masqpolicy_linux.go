package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/nfmasq/nfmasq/deploy"
	"github.com/nfmasq/nfmasq/internal/kube"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// benchNode is the node the MasqueradePolicy variant's pods run on; the
// agent reads it from NODE_NAME, which only an agent given --kubeconfig
// uses.
const benchNode = "bench-node"

// masqueradeVariants prepare the MasqueradePolicy variant against the API
// server of -kubeconfig (hack/kube-apiserver.sh): one Running pod per
// sending address (flowAddrs), labelled app=load, and -masquerade-policies
// policies that all select them, each with ten destination CIDRs, one of
// which holds the test destination, so a policy decides every flow. The
// agent reaches the server through a forwarder on the node namespace's
// loopback. Its baseline is the same agent on the same API server with
// MasqueradePolicies off (--masquerade-policies=false): pod names in the
// records, no policy. It returns both variants and a cleanup.
//
// Before it returns, an agent runs until every policy's status says Valid,
// as in a cluster where the agents judged the policies long ago: the first
// agent's status writes (100 patches, at client-go's default 5 per second)
// are not part of any measurement.
func (b *bench) masqueradeVariants(ctx context.Context, cfgPath string) ([]variant, func(), error) {
	o := b.opts
	cfg, err := kube.Config(o.kubeconfig)
	if err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(cfg.Host)
	if err != nil {
		return nil, nil, err
	}
	if ip := net.ParseIP(u.Hostname()); ip == nil || !ip.IsLoopback() {
		return nil, nil, fmt.Errorf("-kubeconfig: %s is not a loopback test API server (hack/kube-apiserver.sh)", cfg.Host)
	}
	cfg.QPS, cfg.Burst = 500, 1000
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	crd, err := deploy.Find("CustomResourceDefinition", "masqueradepolicies.nfmasq.io")
	if err != nil {
		return nil, nil, err
	}
	if err := kube.EnsureCRD(ctx, dyn, crd.JSON, kube.MasqueradePolicyResource, 30*time.Second); err != nil {
		return nil, nil, err
	}
	ns := fmt.Sprintf("bench-mp-%d", time.Now().Unix())
	var cleanups []func()
	cleanup := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return nil, nil, err
	}
	cleanups = append(cleanups, func() { _ = client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{}) })
	if _, err := client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		cleanup()
		return nil, nil, err
	}
	for i := range uint64(flowAddrs) {
		addr := flowSource(sandbox.PodCIDR4, i*flowPorts).Addr()
		if _, err := kube.CreateRunningPod(ctx, client, ns, fmt.Sprintf("load-%d", i), benchNode, map[string]string{"app": "load"}, addr); err != nil {
			cleanup()
			return nil, nil, err
		}
	}
	res := dyn.Resource(kube.MasqueradePolicyResource)
	dstPrefix := netip.PrefixFrom(o.dst, 24).Masked()
	for i := range o.masqPolicies {
		dsts := []any{}
		for j := range 10 {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(100 + i%100), byte(i / 100), byte(j * 16), 0}), 20)
			if i == 0 && j == 0 {
				p = dstPrefix // the flows' destination: Masquerade, as the node policy says
			}
			dsts = append(dsts, map[string]any{"cidr": p.String()})
		}
		name := fmt.Sprintf("%s-%03d", ns, i)
		obj := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "nfmasq.io/v1alpha1", "kind": "MasqueradePolicy",
			"metadata": map[string]any{"name": name},
			"spec": map[string]any{
				"podSelector":  map[string]any{"matchLabels": map[string]any{"app": "load"}},
				"action":       "Masquerade",
				"destinations": dsts,
			},
		}}
		if _, err := res.Create(ctx, obj, metav1.CreateOptions{}); err != nil {
			cleanup()
			return nil, nil, err
		}
		cleanups = append(cleanups, func() { _ = res.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	}
	addr, stop, err := b.top.Node.Forward(u.Host)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	cleanups = append(cleanups, stop)
	kc := filepath.Join(o.tmp, "kubeconfig")
	if err := kube.WriteKubeconfigFor(o.kubeconfig, kc, "https://"+addr); err != nil {
		cleanup()
		return nil, nil, err
	}
	if err := os.Setenv("NODE_NAME", benchNode); err != nil {
		cleanup()
		return nil, nil, err
	}
	b.logf("MasqueradePolicy variant: %d pods, %d policies in namespace %s", flowAddrs, o.masqPolicies, ns)
	if err := b.judgePolicies(ctx, cfgPath, kc, res, ns); err != nil {
		cleanup()
		return nil, nil, err
	}
	const noPolicies = "api-no-policies"
	return []variant{{
		name:  noPolicies,
		flags: []string{"--kubeconfig", kc, "--masquerade-policies=false"},
		shown: []string{"--kubeconfig", "API", "--masquerade-policies=false", fmt.Sprintf("(%d pods named in records)", flowAddrs)},
	}, {
		name:     fmt.Sprintf("masquerade-policies-%d", o.masqPolicies),
		flags:    []string{"--kubeconfig", kc},
		shown:    []string{"--kubeconfig", "API", fmt.Sprintf("(%d policies select the %d sending pods)", o.masqPolicies, flowAddrs)},
		check:    b.checkMasqueradeVariant,
		baseline: noPolicies,
	}}, cleanup, nil
}

// checkMasqueradeVariant makes sure the variant measured what it says:
// every sending pod known and selected, one policy set, no packet held.
func (b *bench) checkMasqueradeVariant(ctx context.Context) error {
	exp, err := b.scrape(ctx)
	if err != nil {
		return err
	}
	if v, _ := metricSum(exp, "nfmasq_masquerade_policy_pods", `selected="true"`); v != flowAddrs {
		return fmt.Errorf("%v sending pods selected by MasqueradePolicies, want %d", v, flowAddrs)
	}
	if v, _ := metricSum(exp, "nfmasq_identity_held_total"); v != 0 {
		return fmt.Errorf("%v packets waited for an identity: the pods were not all known", v)
	}
	return nil
}

// judgePolicies runs an agent until every policy of the benchmark (named
// prefix-NNN) has Valid=True in its status.
func (b *bench) judgePolicies(ctx context.Context, cfgPath, kubeconfig string, res dynamic.NamespaceableResourceInterface, prefix string) error {
	a, err := b.startAgent(ctx, cfgPath, []string{"--kubeconfig", kubeconfig})
	if err != nil {
		return err
	}
	defer func() { _ = b.stop(context.WithoutCancel(ctx), &running{name: "judge", agent: a}) }()
	start := time.Now()
	for {
		list, err := res.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		valid, total := 0, 0
		for _, u := range list.Items {
			if !strings.HasPrefix(u.GetName(), prefix+"-") {
				continue
			}
			total++
			conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
			for _, c := range conds {
				if m, ok := c.(map[string]any); ok && m["type"] == "Valid" && m["status"] == "True" {
					valid++
				}
			}
		}
		if total > 0 && valid == total {
			b.logf("MasqueradePolicy variant: %d policies judged Valid in %v", total, time.Since(start).Round(time.Second))
			return nil
		}
		if time.Since(start) > 2*time.Minute {
			return fmt.Errorf("%d of %d policies Valid after 2m", valid, total)
		}
		time.Sleep(500 * time.Millisecond) // polling the API with a deadline
	}
}
