package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/nfmasq/nfmasq/deploy"
	"github.com/nfmasq/nfmasq/internal/kube"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// e2eAPI is the test API server (hack/kube-apiserver.sh) as its admin, and
// a kubeconfig that reaches it from inside a network namespace.
type e2eAPI struct {
	client         kubernetes.Interface
	dyn            dynamic.Interface
	kubeconfig     string // for the agent in the node namespace
	hostKubeconfig string // for the test's own namespace
}

// apiForNode connects to the test API server, skipping the test unless
// NFMASQ_KUBE=1, installs the MasqueradePolicy CRD, and forwards a port
// on the node namespace's loopback to the server (which listens on the
// host's loopback only), so the agent reaches it as in a cluster. Only
// the API's traffic crosses: the packets under test stay in the
// namespaces.
func apiForNode(t *testing.T, node *netns.NS) *e2eAPI {
	t.Helper()
	if os.Getenv("NFMASQ_KUBE") != "1" {
		t.Skip("needs a test API server: hack/kube-apiserver.sh up, then NFMASQ_KUBE=1 (hack/kube-integration.sh runs this test)")
	}
	path := os.Getenv("KUBECONFIG")
	if path == "" {
		path = filepath.Join(os.TempDir(), fmt.Sprintf("nfmasq-kube-%d", os.Getuid()), "kubeconfig")
	}
	cfg, err := kube.Config(path)
	if err != nil {
		t.Fatalf("NFMASQ_KUBE=1 but no test API server: %v", err)
	}
	u, err := url.Parse(cfg.Host)
	if err != nil {
		t.Fatal(err)
	}
	if ip := net.ParseIP(u.Hostname()); ip == nil || !ip.IsLoopback() {
		t.Fatalf("refusing to test against %s: the test API server listens on loopback only", cfg.Host)
	}
	api := &e2eAPI{hostKubeconfig: path}
	if api.client, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if api.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	crd, err := deploy.Find("CustomResourceDefinition", "masqueradepolicies.nfmasq.io")
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.EnsureCRD(t.Context(), api.dyn, crd.JSON, kube.MasqueradePolicyResource, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	addr, stop, err := node.Forward(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	api.kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	// The server's certificate names 127.0.0.1.
	if err := kube.WriteKubeconfigFor(path, api.kubeconfig, "https://"+addr); err != nil {
		t.Fatal(err)
	}
	return api
}

// createRunningPod creates a pod on node and reports it running with ips.
func (api *e2eAPI) createRunningPod(t *testing.T, ns, name, node string, labels map[string]string, ips ...netip.Addr) {
	t.Helper()
	if _, err := kube.CreateRunningPod(t.Context(), api.client, ns, name, node, labels, ips...); err != nil {
		t.Fatal(err)
	}
}

func (api *e2eAPI) applyPolicy(t *testing.T, name, spec string) {
	t.Helper()
	obj := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte("apiVersion: nfmasq.io/v1alpha1\nkind: MasqueradePolicy\nmetadata: {name: "+name+"}\nspec:\n"+spec), &obj.Object); err != nil {
		t.Fatal(err)
	}
	res := api.dyn.Resource(kube.MasqueradePolicyResource)
	if _, err := res.Create(t.Context(), obj, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = res.Delete(context.Background(), name, metav1.DeleteOptions{}) })
}

// sourceSeen sends one UDP datagram from src (a fresh port each call) to
// dst and returns the source address the remote saw. Sends are one at a
// time and the sink records a datagram before it echoes it, so the
// datagram to dst recorded since the send is this one (a masqueraded
// source port may have changed).
func sourceSeen(t *testing.T, top *sandbox.Topology, sink *sandbox.Sink, src netip.Addr, dst netip.AddrPort) netip.Addr {
	t.Helper()
	before := len(sink.Seen())
	if _, err := sendUDPFrom(top.Pod, src, dst, 5*time.Second); err != nil {
		t.Fatalf("%s → %s: %v", src, dst, err)
	}
	return lastSeen(t, sink, before, dst)
}

// lastSeen returns the source of the last datagram to dst the sink
// recorded after its first before records.
func lastSeen(t *testing.T, sink *sandbox.Sink, before int, dst netip.AddrPort) netip.Addr {
	t.Helper()
	seen := sink.Seen()[before:]
	for i := len(seen) - 1; i >= 0; i-- {
		if seen[i].Proto == "udp" && seen[i].Dst == dst {
			return seen[i].Src.Addr()
		}
	}
	t.Fatalf("the remote echoed a datagram to %s it did not record", dst)
	return netip.Addr{}
}

// sendUDPFrom sends one datagram from src on a fresh port inside ns and
// waits up to timeout for its echo; it returns the local address.
func sendUDPFrom(ns *netns.NS, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (netip.AddrPort, error) {
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	if _, err := c.Write([]byte("mp")); err != nil {
		return local, err
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	if _, err := c.Read(make([]byte, 16)); err != nil {
		return local, fmt.Errorf("no echo: %w", err)
	}
	return local, nil
}

// TestMasqueradePolicyE2E runs the agent against the real API server with
// two pods of different labels sending to the same destinations. The far
// end sees the source each pod's MasqueradePolicies give, before and after
// a policy edit, after kill -9 of the agent (the kernel fallback's policy
// sets decide), and for a pod whose first packet arrives before the
// agent's informer knows it (the packet waits for its identity).
func TestMasqueradePolicyE2E(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "ipset")
	top := netnstest.NewTopology(t)
	addSecondPodAddrs(t, top)
	api := apiForNode(t, top.Node)
	ctx := t.Context()
	suffix := fmt.Sprint(time.Now().UnixNano() % 1000000)
	node, ns := "mp-e2e-"+suffix, "mp-e2e-"+suffix
	t.Setenv("NODE_NAME", node)
	if _, err := api.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"team": "payments"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{}) })
	if _, err := api.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	billing, web := sandbox.PodAddr4, podAddr4b
	billing6, web6 := sandbox.PodAddr6, podAddr6b
	api.createRunningPod(t, ns, "billing", node, map[string]string{"app": "billing"}, billing, billing6)
	api.createRunningPod(t, ns, "web", node, map[string]string{"app": "web"}, web, web6)
	// keep-billing: billing keeps its address to the internet ranges the
	// node masquerades. hide-web: web is masqueraded to 10.200.0.0/16,
	// which the node policy (10.0.0.0/8) leaves alone.
	api.applyPolicy(t, "keep-billing-"+suffix, "  namespaceSelector: {matchLabels: {team: payments}}\n  podSelector: {matchLabels: {app: billing}}\n  action: NoSNAT\n  destinations: [{cidr: 11.0.0.0/8}, {cidr: '2001:db8:100::/48'}]")
	api.applyPolicy(t, "hide-web-"+suffix, "  podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}\n  action: Masquerade\n  destinations: [{cidr: 10.200.0.0/16}]")

	const port = 7700
	dsts := []netip.Addr{sandbox.Internet4, sandbox.Internal4, sandbox.Internet6}
	sink, err := sandbox.StartSink(top.Remote, dsts, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	dir := t.TempDir()
	logPath := filepath.Join(dir, "flows.jsonl")
	args := []string{"--kubeconfig", api.kubeconfig, "--cluster-cidr", sandbox.PodCIDR4.String(), "--flow-log", "file:" + logPath}
	a := startAgent(t, top, args...)
	a.waitMetric("policy sets", func(v float64) bool { return v == 2 }, "nfmasq_masquerade_policy_sets")

	type expect struct {
		src, dst netip.Addr
		kept     bool
	}
	check := func(phase string, cases []expect) {
		t.Helper()
		for _, c := range cases {
			got := sourceSeen(t, top, sink, c.src, netip.AddrPortFrom(c.dst, port))
			want := nodeAddr(c.dst)
			if c.kept {
				want = c.src
			}
			if got != want {
				t.Errorf("%s: %s → %s seen from %s, want %s", phase, c.src, c.dst, got, want)
			}
		}
	}
	phase1 := []expect{
		{billing, sandbox.Internet4, true}, // keep-billing
		{web, sandbox.Internet4, false},    // the node policy masquerades
		{billing, sandbox.Internal4, true}, // the node policy keeps 10.0.0.0/8
		{web, sandbox.Internal4, false},    // hide-web
		{billing6, sandbox.Internet6, true},
		{web6, sandbox.Internet6, false},
	}
	check("policies", phase1)
	recs := waitFlowLog(t, readFileFunc(t, logPath), "decision records", func(r []flowRec) bool { return len(ofKind(r, "decision")) >= len(phase1) })
	for _, r := range ofKind(recs, "decision") {
		if r.Src == billing.String() && r.Dst == sandbox.Internet4.String() && (r.Source != "masquerade-policy" || r.Origin != "keep-billing-"+suffix || r.Pod == nil || *r.Pod != ns+"/billing") {
			t.Errorf("billing's decision record does not name its policy: %s", r.line)
		}
	}

	// explain --pod asks the cluster and answers as the agent decided.
	var stdout, stderr strings.Builder
	if code := run([]string{"explain", "--config", filepath.Join(dir, "none"), "--kubeconfig", api.hostKubeconfig,
		"--pod", ns + "/billing", sandbox.Internet4.String(), sandbox.Internal4.String()}, &stdout, &stderr); code != 0 {
		t.Fatalf("explain --pod: exit %d: %s", code, stderr.String())
	}
	if want := `{"dst":"11.0.0.10","action":"masquerade","prefix":"","source":"none"}`; strings.Contains(stdout.String(), want) ||
		!strings.Contains(stdout.String(), `"origin":"keep-billing-`+suffix+`"`) {
		t.Errorf("explain --pod %s/billing:\n%s", ns, stdout.String())
	}

	// An edit: keep-billing now excepts 11.0.0.0/24, where the node
	// policy decides again.
	patch := []byte(`{"spec":{"destinations":[{"cidr":"11.0.0.0/8","except":["11.0.0.0/24"]},{"cidr":"2001:db8:100::/48"}]}}`)
	if _, err := api.dyn.Resource(kube.MasqueradePolicyResource).Patch(ctx, "keep-billing-"+suffix, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	netnstest.Poll(t, 10*time.Second, 20*time.Millisecond, "the edit in force", func() bool {
		return sourceSeen(t, top, sink, billing, netip.AddrPortFrom(sandbox.Internet4, port)) == sandbox.NodeAddr4
	})
	phase2 := slices.Clone(phase1)
	phase2[0].kept = false
	check("after the edit", phase2)
	a.waitMetric("fallback sets installed", func(v float64) bool { return v >= 1 }, "nfmasq_policy_applied_generation")

	// kill -9: the fallback's policy sets give the same answers.
	a.stop(syscall.SIGKILL)
	check("agent killed (kernel fallback)", phase2)

	// Restart; a pod whose first packet comes before the agent knows it.
	a = startAgent(t, top, args...)
	a.waitMetric("policy sets", func(v float64) bool { return v == 2 }, "nfmasq_masquerade_policy_sets")
	late := netip.MustParseAddr("10.244.0.4")
	netnstest.Run(t, top.Pod, "ip", "addr", "add", netip.PrefixFrom(late, 24).String(), "dev", "eth0")
	dst := netip.AddrPortFrom(sandbox.Internal4, port)
	type sent struct {
		local netip.AddrPort
		err   error
		took  time.Duration
	}
	done := make(chan sent, 1)
	before := len(sink.Seen())
	start := time.Now()
	go func() {
		local, err := sendUDPFrom(top.Pod, late, dst, 5*time.Second)
		done <- sent{local, err, time.Since(start)}
	}()
	a.waitMetric("the first packet held", func(v float64) bool { return v >= 1 }, "nfmasq_identity_holding")
	// Other packets keep flowing meanwhile: a burst of new flows the node
	// policy keeps the pod address for, read and answered in batches. A
	// batch verdict would answer the held packet too, with their mark,
	// and the late pod's packet would then keep its address.
	const burst = 64
	if err := burstUDP(top.Pod, billing, netip.AddrPortFrom(sandbox.Internal4, port), burst, 5*time.Second); err != nil {
		t.Fatalf("while a packet waits, a burst of %d flows: %v", burst, err)
	}
	if v := a.metric("nfmasq_identity_holding"); v != 1 {
		t.Fatalf("after the burst %v packets wait, want the late pod's 1", v)
	}
	created := time.Now()
	api.createRunningPod(t, ns, "late", node, map[string]string{"app": "web"}, late)
	reported := time.Since(created)
	s := <-done
	if s.err != nil {
		t.Fatalf("the late pod's first packet: %v", s.err)
	}
	// The burst's datagrams came from billing's address; the late pod's
	// comes from its own or the node's.
	var got netip.Addr
	for _, v := range sink.Seen()[before:] {
		if v.Dst == dst && (v.Src.Addr() == late || v.Src.Addr() == sandbox.NodeAddr4) {
			got = v.Src.Addr()
		}
	}
	if got != sandbox.NodeAddr4 {
		t.Errorf("the late pod's first packet to %s was seen from %s, want the node's address (hide-web applies to it, the node policy would keep it)", dst, got)
	}
	recs = waitFlowLog(t, readFileFunc(t, logPath), "the late pod's decision record", func(r []flowRec) bool {
		return slices.ContainsFunc(ofKind(r, "decision"), func(r flowRec) bool { return r.Src == late.String() })
	})
	i := slices.IndexFunc(recs, func(r flowRec) bool { return r.Kind == "decision" && r.Src == late.String() })
	r := recs[i]
	if r.Origin != "hide-web-"+suffix || strings.Contains(r.line, `"identity"`) || !strings.Contains(r.line, `"held_us"`) {
		t.Errorf("the late pod's decision record: %s; want hide-web, held, identity known", r.line)
	}
	var held struct {
		HeldUS float64 `json:"held_us"`
	}
	_ = json.Unmarshal([]byte(r.line), &held)
	heldFor := time.Duration(held.HeldUS * float64(time.Microsecond))
	// Held from the packet's arrival to the pod's identity: the test's
	// own delay before it creates the pod, the two API calls that create
	// it and report its address (kubelet's part in a cluster), and the
	// agent's share, from the report to the release.
	agentShare := heldFor - created.Sub(start) - reported
	figure(t, "late pod: first packet held %v: pod created %v after the send, its address reported %v later, released %v after that",
		heldFor.Round(time.Microsecond), created.Sub(start).Round(time.Microsecond), reported.Round(time.Microsecond), agentShare.Round(time.Microsecond))
	if v := a.metric("nfmasq_identity_expired_total"); v != 0 {
		t.Errorf("%v held packets expired", v)
	}
	// Every pod known again: the two phases' answers still hold, and a
	// source no pod has waits at most --identity-wait, then the node
	// policy decides and the record says so.
	check("after restart", phase2)
	stranger := netip.MustParseAddr("10.244.0.5")
	netnstest.Run(t, top.Pod, "ip", "addr", "add", netip.PrefixFrom(stranger, 24).String(), "dev", "eth0")
	begin := time.Now()
	if got := sourceSeen(t, top, sink, stranger, dst); got != stranger {
		t.Errorf("an unknown source to %s was seen from %s, want its own address (the node policy)", dst, got)
	}
	if waited := time.Since(begin); waited < DefaultIdentityWait {
		t.Errorf("an unknown source was answered after %v, before --identity-wait (%v) ran out", waited, DefaultIdentityWait)
	}
	recs = waitFlowLog(t, readFileFunc(t, logPath), "the stranger's decision record", func(r []flowRec) bool {
		return slices.ContainsFunc(ofKind(r, "decision"), func(r flowRec) bool { return r.Src == stranger.String() })
	})
	if r := recs[slices.IndexFunc(recs, func(r flowRec) bool { return r.Kind == "decision" && r.Src == stranger.String() })]; !strings.Contains(r.line, `"identity":"unknown"`) {
		t.Errorf("the stranger's record does not say its identity was unknown: %s", r.line)
	}
}

// burstUDP sends one datagram from each of n fresh sockets bound to src,
// all before reading any echo, then waits up to timeout for every echo.
func burstUDP(ns *netns.NS, src netip.Addr, dst netip.AddrPort, n int, timeout time.Duration) error {
	conns := make([]*net.UDPConn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err := ns.Do(func() error {
		for range n {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		return err
	}
	for _, c := range conns {
		if _, err := c.Write([]byte("burst")); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 16)
	for i, c := range conns {
		_ = c.SetReadDeadline(deadline)
		if _, err := c.Read(buf); err != nil {
			return fmt.Errorf("flow %d of %d: no echo: %w", i+1, n, err)
		}
	}
	return nil
}
