package deploy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// The node tests run nfmasq as the DaemonSet on a real node that
// hack/kube-node.sh brought up (kubelet, containerd, kube-proxy in a
// network namespace of their own), with pods the kubelet started sending
// to a remote host the test attaches to the node. They need
// NFMASQ_NODE=1 and the environment `hack/kube-node.sh env` prints;
// without NFMASQ_NODE they skip, with it anything missing fails them.

// Addresses of the link between the node and the test's remote host. The
// remote serves sandbox.Internet4 (outside every non-masquerade range)
// and sandbox.Internal4 (in 10.0.0.0/8).
var (
	nodeUplink   = netip.MustParseAddr("192.168.77.1")
	remoteUplink = netip.MustParseAddr("192.168.77.2")
	clusterCIDR  = netip.MustParsePrefix("10.244.0.0/16")
)

const sinkPort = 9100

// client is a pod the test started, to send from.
type client struct{ ns, name, ip string }

// realNode is the node under test, seen from the test.
type realNode struct {
	clients    []client
	t          *testing.T
	ns         *netns.NS
	kubectl    string
	kubeconfig string
	image      string
	remote     *netns.NS
	sink       *sandbox.Sink
}

func requireNode(t *testing.T) *realNode {
	t.Helper()
	if os.Getenv("NFMASQ_NODE") != "1" {
		t.Skip("node test: set NFMASQ_NODE=1 with a node from hack/kube-node.sh up")
	}
	n := &realNode{t: t, kubeconfig: os.Getenv("KUBECONFIG"), image: os.Getenv("NFMASQ_IMAGE")}
	nsName := os.Getenv("NFMASQ_NODE_NETNS")
	if n.kubeconfig == "" || nsName == "" || n.image == "" {
		t.Fatal("NFMASQ_NODE=1 needs KUBECONFIG, NFMASQ_NODE_NETNS and NFMASQ_IMAGE: eval \"$(hack/kube-node.sh env)\"")
	}
	var err error
	if n.ns, err = netns.Open(nsName); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.ns.Close)
	out, err := exec.Command("../hack/kube-apiserver.sh", "bin").Output()
	if err != nil {
		t.Fatalf("hack/kube-apiserver.sh bin: %v", err)
	}
	n.kubectl = filepath.Join(strings.TrimSpace(string(out)), "kubectl")
	return n
}

// run runs kubectl inside the node's namespace, where the API server is.
func (n *realNode) run(args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.ns.Name, n.kubectl, "--kubeconfig", n.kubeconfig}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return string(out), nil
}

func (n *realNode) kube(args ...string) string {
	n.t.Helper()
	out, err := n.run(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}

// attachRemote adds the remote host: a namespace of the test's own,
// joined to the node by a veth, answering on sandbox.Internet4 and
// sandbox.Internal4 and routing the cluster's pod range back through the
// node (as a VPC route would).
func (n *realNode) attachRemote() {
	t := n.t
	t.Helper()
	n.remote = netnstest.New(t, "remote")
	netnstest.MustVeth(t, n.ns, "rmt0", []string{nodeUplink.String() + "/24"}, n.remote, "eth0", []string{remoteUplink.String() + "/24"})
	for _, a := range []netip.Addr{sandbox.Internet4, sandbox.Internal4} {
		netnstest.Run(t, n.remote, "ip", "addr", "add", a.String()+"/32", "dev", "lo")
		netnstest.Run(t, n.ns, "ip", "route", "add", a.String()+"/32", "via", remoteUplink.String())
	}
	netnstest.Run(t, n.remote, "ip", "route", "add", clusterCIDR.String(), "via", nodeUplink.String())
	var err error
	if n.sink, err = sandbox.StartSink(n.remote, []netip.Addr{sandbox.Internet4, sandbox.Internal4}, sinkPort); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.sink.Close)
}

// rules is the node's rule set as iptables-save, ip6tables-save and
// ipset list -n print it, without counters.
func (n *realNode) rules() string {
	n.t.Helper()
	var b strings.Builder
	counters := regexp.MustCompile(`\[\d+:\d+\]`)
	for _, tool := range [][]string{{"iptables-save"}, {"ip6tables-save"}, {"ipset", "list", "-n"}} {
		out := netnstest.Run(n.t, n.ns, tool...)
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			b.WriteString(counters.ReplaceAllString(line, "[0:0]") + "\n")
		}
	}
	return b.String()
}

// apply installs deploy/ with the image override, as an operator would
// (kustomize edit set image), from a copy of the directory.
func (n *realNode) apply(dir string) {
	t := n.t
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if f == "kustomization.yaml" {
			name, tag, _ := strings.Cut(n.image, ":")
			b = regexp.MustCompile(`(?m)^  - name: nfmasq/nfmasq\n    newTag: .*$`).
				ReplaceAll(b, []byte("  - name: nfmasq/nfmasq\n    newName: "+name+"\n    newTag: "+tag))
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	n.kube("apply", "-k", dir)
}

// flowRecord is what the node tests read of a flow-log record.
type flowRecord struct {
	Kind       string  `json:"kind"`
	Proto      string  `json:"proto"`
	Src        string  `json:"src"`
	Sport      uint16  `json:"sport"`
	Dst        string  `json:"dst"`
	Dport      uint16  `json:"dport"`
	Pod        string  `json:"pod"`
	Action     string  `json:"action"`
	XlateSrc   string  `json:"xlate_src"`
	XlateSport uint16  `json:"xlate_sport"`
	Source     string  `json:"source"`
	Origin     string  `json:"origin"`
	HeldUS     float64 `json:"held_us"`
	Identity   string  `json:"identity"`
}

// flowLog reads the agent's flow log (its stdout) as kubectl logs shows it.
func (n *realNode) flowLog() []flowRecord {
	n.t.Helper()
	out := n.kube("-n", "kube-system", "logs", "ds/nfmasq", "-c", "nfmasq", "--tail=-1")
	var recs []flowRecord
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasPrefix(line, []byte(`{"v":1,`)) {
			continue // the agent's own log lines
		}
		var r flowRecord
		if err := json.Unmarshal(line, &r); err != nil {
			n.t.Fatalf("flow record %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// TestNode runs the checks in order on one node: install, pods' flows and
// their records, uninstall.
func TestNode(t *testing.T) {
	n := requireNode(t)
	netnstest.Require(t, "nsenter", "iptables-save", "ipset")
	before := n.rules()
	n.attachRemote()

	dir := t.TempDir() // the kustomization, for the uninstall too
	t.Run("install", func(t *testing.T) {
		n.t = t
		start := time.Now()
		n.apply(dir)
		n.kube("-n", "kube-system", "rollout", "status", "daemonset/nfmasq", "--timeout=120s")
		n.kube("-n", "kube-system", "rollout", "status", "deployment/nfmasq-egress-controller", "--timeout=120s")
		t.Logf("kubectl apply -k to the DaemonSet's pod Ready: %v", time.Since(start).Round(time.Millisecond))

		caps := n.kube("-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=nfmasq", "-o",
			`jsonpath={range .items[*].spec.containers[?(@.name=="nfmasq")]}{.securityContext.capabilities.add}{" "}{.securityContext.capabilities.drop}{end}`)
		if caps != `["NET_ADMIN","NET_RAW"] ["ALL"]` {
			t.Errorf("agent container capabilities: %s, want exactly NET_ADMIN and NET_RAW added, ALL dropped", caps)
		}
		for _, key := range []string{"nf_conntrack_acct", "nf_conntrack_timestamp", "nf_conntrack_events"} {
			if v := strings.TrimSpace(netnstest.Run(t, n.ns, "cat", "/proc/sys/net/netfilter/"+key)); v != "1" {
				t.Errorf("node-prep left %s at %s", key, v)
			}
		}
	})
	if t.Failed() {
		return
	}

	t.Run("pods", func(t *testing.T) {
		n.t = t
		n.podFlows()
	})

	if len(n.clients) == 0 {
		return
	}
	t.Cleanup(func() {
		for _, c := range n.clients {
			_, _ = n.run("delete", "namespace", c.ns, "--wait=false")
		}
	})
	for _, check := range []struct {
		name string
		run  func()
	}{
		{"startup-flows", n.startupFlows},
		{"masquerade-policy", n.masqueradePolicy},
		{"configmap", n.configMapEdits},
		{"egress-policy", n.egressPolicy},
		{"kube-proxy", n.kubeProxy},
		{"restarts", n.restarts},
	} {
		t.Run(check.name, func(t *testing.T) {
			n.t = t
			check.run()
		})
	}

	t.Run("uninstall", func(t *testing.T) {
		n.t = t
		n.kube("delete", "-k", dir, "--wait=true", "--timeout=120s")
		// The agent's pods go after their DaemonSet; one still stopping
		// would put its rules back after the uninstall.
		n.kube("-n", "kube-system", "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=nfmasq", "--timeout=120s")
		bin := filepath.Join(t.TempDir(), "nfmasq")
		if out, err := exec.Command("go", "build", "-o", bin, "../cmd/nfmasq").CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		netnstest.Run(t, n.ns, bin, "uninstall")
		if after := n.rules(); after != before {
			t.Errorf("the node's rules after kubectl delete -k and nfmasq uninstall differ from before the install:\n%s\nbefore:\n%s", after, before)
		}
	})
}

// podFlows starts pods in two namespaces with different labels, sends TCP
// and UDP from each to a destination the default policy masquerades and
// to one it does not, and checks what the remote saw and what the flow
// log recorded.
func (n *realNode) podFlows() {
	t := n.t
	clients := []client{{ns: "nfm-team-a", name: "client"}, {ns: "nfm-team-b", name: "client"}}
	for i, c := range clients {
		n.kube("create", "namespace", c.ns)
		n.kube("label", "namespace", c.ns, fmt.Sprintf("team=%c", 'a'+i))
		manifest := fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":%q,"namespace":%q,"labels":{"app":"client-%c"}},
"spec":{"terminationGracePeriodSeconds":0,"containers":[{"name":"c","image":"localhost/nfmasq-client:dev","imagePullPolicy":"Never","command":["sleep","infinity"]}]}}`,
			c.name, c.ns, 'a'+i)
		f := filepath.Join(t.TempDir(), "pod.json")
		if err := os.WriteFile(f, []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		n.kube("apply", "-f", f)
	}
	for i, c := range clients {
		n.kube("-n", c.ns, "wait", "--for=condition=Ready", "pod/"+c.name, "--timeout=120s")
		clients[i].ip = strings.TrimSpace(n.kube("-n", c.ns, "get", "pod", c.name, "-o", "jsonpath={.status.podIP}"))
	}
	n.clients = clients

	// Each pod: a TCP connection and a UDP datagram to each destination.
	script := ""
	for _, dst := range []netip.Addr{sandbox.Internet4, sandbox.Internal4} {
		script += fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo tcp >&3 && exec 3>&-; ", dst, sinkPort)
		script += fmt.Sprintf("exec 4<>/dev/udp/%s/%d && echo udp >&4 && exec 4>&-; ", dst, sinkPort)
	}
	start := time.Now()
	for _, c := range clients {
		n.kube("-n", c.ns, "exec", c.name, "--", "bash", "-c", script+"true")
	}
	t.Logf("8 flows sent in %v", time.Since(start).Round(time.Millisecond))
	const flows = 8
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) >= flows })
	if err != nil {
		t.Fatalf("the remote saw %d flows, want %d: %v", len(seen), flows, err)
	}
	podOf := map[netip.Addr]string{}
	for _, c := range clients {
		podOf[netip.MustParseAddr(c.ip)] = c.ns + "/" + c.name
	}
	masqueraded := map[string]netip.AddrPort{} // proto/dst -> the source the remote saw, per pod below
	for _, s := range seen {
		src := s.Src.Addr()
		switch s.Dst.Addr() {
		case sandbox.Internet4:
			if src != nodeUplink {
				t.Errorf("%s to %s arrived from %s, want the node address %s", s.Proto, s.Dst, s.Src, nodeUplink)
			}
			masqueraded[fmt.Sprintf("%s/%d", s.Proto, s.Src.Port())] = s.Src
		case sandbox.Internal4:
			if podOf[src] == "" {
				t.Errorf("%s to %s arrived from %s, want a pod address", s.Proto, s.Dst, s.Src)
			}
		}
	}

	// One decision record per flow, naming the pod.
	decided := 0
	for _, r := range n.flowLog() {
		if r.Kind != "decision" || r.Dport != sinkPort {
			continue
		}
		decided++
		want := podOf[netip.MustParseAddr(r.Src)]
		if want == "" || r.Pod != want {
			t.Errorf("decision record %+v names pod %q, want %q", r, r.Pod, want)
		}
		wantAction := "passthrough"
		if r.Dst == sandbox.Internet4.String() {
			wantAction = "masquerade"
		}
		if r.Action != wantAction {
			t.Errorf("decision record %+v: action %s, want %s", r, r.Action, wantAction)
		}
	}
	if decided != flows {
		t.Errorf("%d decision records for the pods' flows, want %d", decided, flows)
	}

	// End the flows now rather than at conntrack's timeouts: each gets an
	// end record naming its pod, and a masqueraded one the source the
	// remote saw.
	if _, err := conntrack.DeleteStale(context.Background(), n.ns.FD(), func(f conntrack.Flow) bool {
		return clusterCIDR.Contains(f.Orig.Src.Addr()) && f.Orig.Dst.Port() == sinkPort
	}, []uint8{6, 17}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	var ends []flowRecord
	defer func() {
		t.Logf("end records %v after the conntrack entries were deleted", time.Since(start).Round(time.Millisecond))
	}()
	netnstest.Poll(t, 20*time.Second, 200*time.Millisecond, "an end record per flow", func() bool {
		ends = ends[:0]
		for _, r := range n.flowLog() {
			if r.Kind == "end" && r.Dport == sinkPort {
				ends = append(ends, r)
			}
		}
		return len(ends) >= flows
	})
	for _, r := range ends {
		if want := podOf[netip.MustParseAddr(r.Src)]; r.Pod != want {
			t.Errorf("end record %+v names pod %q, want %q", r, r.Pod, want)
		}
		if r.Dst != sandbox.Internet4.String() {
			continue
		}
		x := netip.AddrPortFrom(netip.MustParseAddr(r.XlateSrc), r.XlateSport)
		if got, ok := masqueraded[fmt.Sprintf("%s/%d", r.Proto, x.Port())]; !ok || got != x {
			t.Errorf("end record %+v: translated source %s is not what the remote saw (%v)", r, x, masqueraded)
		}
	}
}

// probe sends one UDP datagram from pod c to dst and returns the source
// the remote saw.
func (n *realNode) probe(c client, dst netip.AddrPort) netip.AddrPort {
	n.t.Helper()
	before := len(n.sink.Seen())
	n.kube("-n", c.ns, "exec", c.name, "--", "bash", "-c", fmt.Sprintf("echo probe > /dev/udp/%s/%d", dst.Addr(), dst.Port()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) > before })
	if err != nil {
		n.t.Fatalf("probe from %s/%s to %s: the remote saw nothing: %v", c.ns, c.name, dst, err)
	}
	return seen[len(seen)-1].Src
}

// waitSource probes from the first client until the remote sees want as
// the source address, and returns how long that took.
func (n *realNode) waitSource(what string, dst netip.Addr, want func(netip.Addr) bool) time.Duration {
	n.t.Helper()
	start := time.Now()
	netnstest.Poll(n.t, 150*time.Second, 500*time.Millisecond, what, func() bool {
		return want(n.probe(n.clients[0], netip.AddrPortFrom(dst, sinkPort)).Addr())
	})
	return time.Since(start)
}

func (n *realNode) isPod(a netip.Addr) bool { return a.String() == n.clients[0].ip }

// metric returns the agent's value of a metric line prefix (name and
// labels) from its /metrics on the node's loopback, -1 when absent.
func (n *realNode) metric(series string) float64 {
	n.t.Helper()
	resp, err := n.ns.HTTPClient().Get("http://127.0.0.1:9741/metrics")
	if err != nil {
		n.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err == nil {
				return v
			}
		}
	}
	return -1
}

// setConfigMap writes the agent's config as an operator would.
func (n *realNode) setConfigMap(config string) {
	n.t.Helper()
	f := filepath.Join(n.t.TempDir(), "config")
	if err := os.WriteFile(f, []byte(config), 0o644); err != nil {
		n.t.Fatal(err)
	}
	yaml := n.kube("-n", "kube-system", "create", "configmap", "ip-masq-agent", "--from-file=config="+f, "--dry-run=client", "-o", "yaml")
	m := filepath.Join(n.t.TempDir(), "cm.yaml")
	if err := os.WriteFile(m, []byte(yaml), 0o644); err != nil {
		n.t.Fatal(err)
	}
	n.kube("apply", "-f", m)
}

// configMapEdits edits the ip-masq-agent ConfigMap with kubectl, as an
// operator of a cluster without the egress controller would: a change
// reaches new flows, an invalid edit keeps the last good policy and is
// counted, deleting the ConfigMap restores the defaults.
func (n *realNode) configMapEdits() {
	t := n.t
	// The controller owns nonMasqueradeCIDRs while it runs.
	n.kube("-n", "kube-system", "scale", "deployment/nfmasq-egress-controller", "--replicas=0")
	n.kube("-n", "kube-system", "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=nfmasq-egress-controller", "--timeout=60s")

	n.setConfigMap("nonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8]\n")
	d := n.waitSource("the edit keeps the pod address for 11.0.0.0/8", sandbox.Internet4, n.isPod)
	t.Logf("ConfigMap edit to the new decision: %v", d.Round(time.Millisecond))

	failures := n.metric("nfmasq_config_reload_failures_total")
	n.setConfigMap("nonMasqueradeCIDRs: [11.0.0.0/33]\n")
	netnstest.Poll(t, 150*time.Second, 500*time.Millisecond, "the invalid edit counted", func() bool {
		return n.metric("nfmasq_config_reload_failures_total") > failures
	})
	if !strings.Contains(n.kube("-n", "kube-system", "logs", "ds/nfmasq", "-c", "nfmasq", "--tail=-1"), "config rejected; keeping the last good policy") {
		t.Error("the agent's log does not report the invalid config")
	}
	if src := n.probe(n.clients[0], netip.AddrPortFrom(sandbox.Internet4, sinkPort)).Addr(); !n.isPod(src) {
		t.Errorf("after the invalid edit the remote saw %s: the last good policy (pod address) is not in force", src)
	}

	n.kube("-n", "kube-system", "delete", "configmap", "ip-masq-agent")
	d = n.waitSource("deleting the ConfigMap restores the defaults (masquerade 11.0.0.0/8)", sandbox.Internet4,
		func(a netip.Addr) bool { return a == nodeUplink })
	t.Logf("ConfigMap deletion to the defaults: %v", d.Round(time.Millisecond))

	n.kube("-n", "kube-system", "scale", "deployment/nfmasq-egress-controller", "--replicas=1")
	n.kube("-n", "kube-system", "rollout", "status", "deployment/nfmasq-egress-controller", "--timeout=120s")
}

// egressPolicy creates an EgressNATPolicy: the controller writes it into
// the ConfigMap, kubelet into the agent's volume, the agent into its
// policy; then deletes it.
func (n *realNode) egressPolicy() {
	t := n.t
	f := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(f, []byte(`apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: partner}
spec:
  action: NoSNAT
  destinations:
    - cidr: 11.0.0.0/8
`), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n.kube("apply", "-f", f)
	n.waitSource("the EgressNATPolicy keeps the pod address for 11.0.0.0/8", sandbox.Internet4, n.isPod)
	t.Logf("EgressNATPolicy created to the new decision (controller, ConfigMap, kubelet, agent): %v", time.Since(start).Round(time.Millisecond))
	n.kube("delete", "-f", f)
	n.waitSource("deleting the EgressNATPolicy masquerades 11.0.0.0/8 again", sandbox.Internet4,
		func(a netip.Addr) bool { return a == nodeUplink })
}

// kubeProxy reaches the remote through Services whose endpoints are the
// remote's addresses: the agent decides on the endpoint (after
// kube-proxy's DNAT), and kube-proxy's own masquerade still applies to
// what it masquerades (the node reaching a Service).
func (n *realNode) kubeProxy() {
	t := n.t
	for _, svc := range []struct {
		name     string
		endpoint netip.Addr
		podKept  bool
	}{{"nfm-internet", sandbox.Internet4, false}, {"nfm-internal", sandbox.Internal4, true}} {
		f := filepath.Join(t.TempDir(), "svc.yaml")
		manifest := fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %[1]s, namespace: default}
spec:
  ports: [{name: udp, protocol: UDP, port: 53, targetPort: %[3]d}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: %[1]s-1
  namespace: default
  labels: {kubernetes.io/service-name: %[1]s}
addressType: IPv4
ports: [{name: udp, protocol: UDP, port: %[3]d}]
endpoints: [{addresses: ["%[2]s"]}]
`, svc.name, svc.endpoint, sinkPort)
		if err := os.WriteFile(f, []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		n.kube("apply", "-f", f)
		t.Cleanup(func() { _, _ = n.run("delete", "-f", f, "--wait=false") })
		ip := netip.MustParseAddr(strings.TrimSpace(n.kube("-n", "default", "get", "service", svc.name, "-o", "jsonpath={.spec.clusterIP}")))
		var src netip.Addr
		netnstest.Poll(t, 60*time.Second, 500*time.Millisecond, "kube-proxy's rules for "+svc.name, func() bool {
			before := len(n.sink.Seen())
			_, _ = n.run("-n", n.clients[0].ns, "exec", n.clients[0].name, "--", "bash", "-c", fmt.Sprintf("echo svc > /dev/udp/%s/53", ip))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) > before })
			if err != nil {
				return false
			}
			src = seen[len(seen)-1].Src.Addr()
			return true
		})
		if got := n.isPod(src); got != svc.podKept {
			t.Errorf("pod to Service %s (endpoint %s): the remote saw %s; pod address kept %v, want %v", svc.name, svc.endpoint, src, got, svc.podKept)
		}
		if svc.podKept {
			// From the node itself kube-proxy masquerades (its 0x4000
			// mark): its MASQUERADE rule counts the flow, and the
			// remote sees the node's address.
			masq := n.kubeProxyMasqueraded()
			before := len(n.sink.Seen())
			netnstest.Run(t, n.ns, "bash", "-c", fmt.Sprintf("echo node > /dev/udp/%s/53", ip))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) > before })
			cancel()
			if err != nil {
				t.Fatalf("node to Service %s: nothing arrived: %v", svc.name, err)
			}
			if after := n.kubeProxyMasqueraded(); after <= masq {
				t.Errorf("kube-proxy's MASQUERADE rule counted %d packets before and %d after the node reached Service %s", masq, after, svc.name)
			}
			if src := seen[len(seen)-1].Src.Addr(); src != nodeUplink {
				t.Errorf("node to Service %s: the remote saw %s, want kube-proxy's masquerade to %s", svc.name, src, nodeUplink)
			}
		}
	}
}

// kubeProxyMasqueraded is the packet count of kube-proxy's MASQUERADE
// rule in the node's nat table.
func (n *realNode) kubeProxyMasqueraded() uint64 {
	n.t.Helper()
	out := netnstest.Run(n.t, n.ns, "iptables-save", "-c", "-t", "nat")
	re := regexp.MustCompile(`(?m)^\[(\d+):\d+\] -A KUBE-POSTROUTING .*kubernetes service traffic requiring SNAT.* -j MASQUERADE`)
	m := re.FindStringSubmatch(out)
	if m == nil {
		n.t.Fatalf("no kube-proxy MASQUERADE rule in the node's nat table:\n%s", out)
	}
	var v uint64
	fmt.Sscan(m[1], &v)
	return v
}

// restarts restarts the agent twice (kubectl rollout restart, then
// kubectl delete pod) while a pod opens a steady stream of new UDP flows
// to a masqueraded destination: every flow must reach the remote from
// the node's address, and the flows the kernel fallback decided while no
// agent ran must appear as fallback records afterwards.
func (n *realNode) restarts() {
	t := n.t
	c := n.clients[1]
	before := len(n.sink.Seen())
	// At most 60 s and 3,000 flows; it stops once /tmp/stop exists.
	// It prints how many datagrams it sent.
	loop := fmt.Sprintf("rm -f /tmp/stop; n=0; for i in $(seq 3000); do [ -e /tmp/stop ] && break; echo r > /dev/udp/%s/%d && n=$((n+1)); sleep 0.01; done; echo $n", sandbox.Internet4, sinkPort)
	type result struct {
		out string
		err error
	}
	sent := make(chan result, 1)
	go func() {
		out, err := n.run("-n", c.ns, "exec", c.name, "--", "timeout", "60", "bash", "-c", loop)
		sent <- result{out, err}
	}()
	start := time.Now()
	n.kube("-n", "kube-system", "rollout", "restart", "daemonset/nfmasq")
	n.kube("-n", "kube-system", "rollout", "status", "daemonset/nfmasq", "--timeout=120s")
	rollout := time.Since(start)
	n.kube("-n", "kube-system", "delete", "pod", "-l", "app.kubernetes.io/name=nfmasq", "--wait=true")
	n.kube("-n", "kube-system", "rollout", "status", "daemonset/nfmasq", "--timeout=120s")
	// The new agent must be ready before the flows end, to record them.
	netnstest.Poll(t, 60*time.Second, 200*time.Millisecond, "the new agent ready", func() bool { return n.metric("nfmasq_ready") == 1 })
	n.kube("-n", c.ns, "exec", c.name, "--", "touch", "/tmp/stop")
	r := <-sent
	if r.err != nil {
		t.Fatal(r.err)
	}
	var count int
	if _, err := fmt.Sscan(r.out, &count); err != nil {
		t.Fatalf("the sender's count %q: %v", r.out, err)
	}
	t.Logf("rollout restart took %v, delete pod and the new pod ready %v", rollout.Round(time.Millisecond), (time.Since(start) - rollout).Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s)-before >= count })
	cancel()
	if err != nil {
		t.Errorf("the pod sent %d datagrams, the remote saw %d: %v", count, len(seen)-before, err)
	}
	flows, wrong := 0, 0
	for _, s := range seen[before:] {
		if s.Dst.Addr() != sandbox.Internet4 {
			continue
		}
		flows++
		if s.Src.Addr() != nodeUplink {
			wrong++
		}
	}
	t.Logf("%d flows sent through two restarts; %d arrived with the wrong source", flows, wrong)
	if wrong != 0 || flows < 100 {
		t.Errorf("%d of %d flows arrived with the pod's address; want 0 of at least 100", wrong, flows)
	}

	// End the flows: the kernel-decided ones get fallback records.
	fallback := 0
	if _, err := conntrack.DeleteStale(context.Background(), n.ns.FD(), func(f conntrack.Flow) bool {
		if f.Orig.Src.Addr().String() != c.ip || f.Orig.Dst.Port() != sinkPort {
			return false
		}
		if f.Mark&0x3000 == 0x3000 {
			fallback++
		}
		return true
	}, []uint8{17}); err != nil {
		t.Fatal(err)
	}
	if fallback == 0 {
		t.Fatal("no flow was decided by the kernel fallback while the agent restarted")
	}
	var records int
	netnstest.Poll(t, 30*time.Second, 200*time.Millisecond, "a fallback record per kernel-decided flow", func() bool {
		records = 0
		for _, r := range n.flowLog() {
			if r.Kind == "fallback" && r.Dport == sinkPort && r.Src == c.ip {
				records++
			}
		}
		return records >= fallback
	})
	t.Logf("%d flows decided by the kernel fallback during the restarts, %d fallback records", fallback, records)
	if records != fallback {
		t.Errorf("%d fallback records, want %d", records, fallback)
	}
}

// startupFlows runs a pod that sends as soon as its container starts and
// then exits: kubelet publishes its address only after the start, and
// the pod is Succeeded by the time its flows end. Its decision records
// and its end records must still name it.
func (n *realNode) startupFlows() {
	t := n.t
	ns := n.clients[0].ns
	script := fmt.Sprintf("for d in %s %s; do echo start > /dev/udp/$d/%d; done", sandbox.Internet4, sandbox.Internal4, sinkPort)
	manifest := fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"starter","namespace":%q},
"spec":{"restartPolicy":"Never","containers":[{"name":"c","image":"localhost/nfmasq-client:dev","imagePullPolicy":"Never","command":["bash","-c",%q]}]}}`, ns, script)
	f := filepath.Join(t.TempDir(), "starter.json")
	if err := os.WriteFile(f, []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	n.kube("apply", "-f", f)
	n.kube("-n", ns, "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/starter", "--timeout=120s")
	ip := strings.TrimSpace(n.kube("-n", ns, "get", "pod", "starter", "-o", "jsonpath={.status.podIP}"))
	if ip == "" {
		t.Fatal("the finished pod has no address in its status")
	}
	// expectNamed waits for the starter's two records of kind and checks
	// that they name it.
	expectNamed := func(kind, why string) {
		t.Helper()
		var recs []flowRecord
		netnstest.Poll(t, 30*time.Second, 200*time.Millisecond, "the starter's two "+kind+" records", func() bool {
			recs = recs[:0]
			for _, r := range n.flowLog() {
				if r.Kind == kind && r.Src == ip && r.Dport == sinkPort {
					recs = append(recs, r)
				}
			}
			return len(recs) >= 2
		})
		for _, r := range recs {
			if want := ns + "/starter"; r.Pod != want {
				t.Errorf("%s record of %s names pod %q, want %q", kind, why, r.Pod, want)
			}
		}
	}
	expectNamed("decision", "a flow sent at container start")
	if _, err := conntrack.DeleteStale(context.Background(), n.ns.FD(), func(f conntrack.Flow) bool {
		return f.Orig.Src.Addr().String() == ip
	}, []uint8{17}); err != nil {
		t.Fatal(err)
	}
	expectNamed("end", "a finished pod's flow")
}

// masqueradePolicy applies a MasqueradePolicy that keeps the pod address
// to one destination for pods labelled app=keeper, which the node policy
// masquerades, and starts such a pod that sends at once when its container
// starts. The agent learns the pod from kubelet's status update, which
// comes after the start, so the first packet waits for it: the remote
// must see the pod address, and the decision record gives the wait.
func (n *realNode) masqueradePolicy() {
	t := n.t
	ns := n.clients[0].ns
	policy := fmt.Sprintf(`{"apiVersion":"nfmasq.io/v1alpha1","kind":"MasqueradePolicy","metadata":{"name":"nfm-keeper"},
"spec":{"podSelector":{"matchLabels":{"app":"keeper"}},"action":"NoSNAT","destinations":[{"cidr":"%s/32"}]}}`, sandbox.Internet4)
	dir := t.TempDir()
	pf := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(pf, []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	n.kube("apply", "-f", pf)
	t.Cleanup(func() { _, _ = n.run("delete", "-f", pf, "--wait=false") })
	netnstest.Poll(t, 30*time.Second, 100*time.Millisecond, "the agent applying the policy", func() bool {
		return n.metric(`nfmasq_masquerade_policies{valid="true"}`) == 1
	})

	const keepers = 3
	var waits []time.Duration
	for i := range keepers {
		name := fmt.Sprintf("keeper-%d", i)
		script := fmt.Sprintf("echo %s > /dev/udp/%s/%d", name, sandbox.Internet4, sinkPort)
		manifest := fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":%q,"namespace":%q,"labels":{"app":"keeper"}},
"spec":{"restartPolicy":"Never","terminationGracePeriodSeconds":0,"containers":[{"name":"c","image":"localhost/nfmasq-client:dev","imagePullPolicy":"Never","command":["bash","-c",%q]}]}}`, name, ns, script)
		f := filepath.Join(dir, name+".json")
		if err := os.WriteFile(f, []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		n.kube("apply", "-f", f)
		n.kube("-n", ns, "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/"+name, "--timeout=120s")
		ip := strings.TrimSpace(n.kube("-n", ns, "get", "pod", name, "-o", "jsonpath={.status.podIP}"))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		seen, err := n.sink.WaitFor(ctx, func(s []sandbox.Seen) bool {
			return slices.ContainsFunc(s, func(v sandbox.Seen) bool { return v.Dst.Addr() == sandbox.Internet4 && v.Src.Addr().String() == ip })
		})
		cancel()
		if err != nil {
			t.Errorf("%s's first packet to %s did not arrive from its own address %s (the remote saw %d datagrams)", name, sandbox.Internet4, ip, len(seen))
		}
		var rec flowRecord
		netnstest.Poll(t, 30*time.Second, 200*time.Millisecond, name+"'s decision record", func() bool {
			for _, r := range n.flowLog() {
				if r.Kind == "decision" && r.Src == ip && r.Dport == sinkPort {
					rec = r
					return true
				}
			}
			return false
		})
		if rec.Source != "masquerade-policy" || rec.Origin != "nfm-keeper" || rec.Identity != "" || rec.Pod != ns+"/"+name {
			t.Errorf("%s's decision record: %+v; want decided by nfm-keeper with its identity", name, rec)
		}
		waits = append(waits, time.Duration(rec.HeldUS*float64(time.Microsecond)))
	}
	t.Logf("FIGURE %s: first packet of a pod that sends at container start waited for its identity: %v", t.Name(), waits)
}
