package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The e2e tests run the real agent: this test binary re-executes itself
// with NFMASQ_RUN_MAIN=1 inside the node namespace, so the agent under test
// is the same code (with the race detector, when the tests have it).
func TestMain(m *testing.M) {
	if os.Getenv("NFMASQ_RUN_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

const metricsAddr = "127.0.0.1:9741"

// agentProc is one running `nfmasq agent` inside a test topology.
type agentProc struct {
	t      *testing.T
	top    *sandbox.Topology
	cmd    *exec.Cmd
	out    *netnstest.Buffer
	done   chan struct{}
	client *http.Client
}

// startAgent starts the agent in the node namespace with the pod CIDRs of
// the topology and extra flags, and waits until /readyz answers 200.
func startAgent(t *testing.T, top *sandbox.Topology, args ...string) *agentProc {
	t.Helper()
	a := launchAgentTo(t, top, nil, args...)
	a.waitReady()
	return a
}

// launchAgent starts the agent as startAgent does but returns at once,
// for tests that time the start or expect it never to become ready.
func launchAgent(t *testing.T, top *sandbox.Topology, args ...string) *agentProc {
	t.Helper()
	return launchAgentTo(t, top, nil, args...)
}

// launchAgentTo is launchAgent with the agent's standard output (the flow
// log's stdout sink) going to stdout; nil sends it to the test's buffer
// with the agent's log.
func launchAgentTo(t *testing.T, top *sandbox.Topology, stdout io.Writer, args ...string) *agentProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	full := append([]string{self, "agent",
		"--pod-cidr", sandbox.PodCIDR4.String(),
		"--pod-cidr", sandbox.PodCIDR6.String(),
		"--enable-ipv6",
		"--metrics-addr", metricsAddr,
	}, args...)
	cmd := top.Node.Command(context.Background(), full...)
	cmd.Env = append(os.Environ(), "NFMASQ_RUN_MAIN=1")
	a := &agentProc{t: t, top: top, cmd: cmd, out: &netnstest.Buffer{}, done: make(chan struct{}), client: top.Node.HTTPClient()}
	cmd.Stdout, cmd.Stderr = a.out, a.out
	if stdout != nil {
		cmd.Stdout = stdout
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(a.done) }()
	t.Cleanup(func() {
		a.stop(syscall.SIGTERM)
		if t.Failed() {
			t.Logf("agent output:\n%s", a.out.String())
		}
	})
	return a
}

func (a *agentProc) waitReady() {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-a.done:
			a.t.Fatalf("agent exited before ready:\n%s", a.out.String())
		default:
		}
		resp, err := a.client.Get("http://" + metricsAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent not ready after 20s (last: %v):\n%s", err, a.out.String())
		}
		time.Sleep(50 * time.Millisecond) // polling an HTTP endpoint with a deadline
	}
}

// stop signals the agent and waits for it to exit (at most 15 s).
func (a *agentProc) stop(sig syscall.Signal) {
	select {
	case <-a.done:
		return
	default:
	}
	_ = a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
		a.t.Errorf("agent did not exit within 15s of %v", sig)
	}
}

// pause stops the agent (SIGSTOP) and returns the function that
// resumes it; that runs at the test's end too, and only once.
func (a *agentProc) pause() (resume func()) {
	a.t.Helper()
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		a.t.Fatal(err)
	}
	var once sync.Once
	resume = func() {
		once.Do(func() {
			if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				a.t.Error(err)
			}
		})
	}
	a.t.Cleanup(resume)
	return resume
}

// metrics scrapes the agent.
func (a *agentProc) metrics() map[string]*dto.MetricFamily {
	a.t.Helper()
	resp, err := a.client.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		a.t.Fatalf("parse metrics: %v", err)
	}
	return mf
}

// metric returns the sum of the samples of name whose labels include the
// given pairs (k, v, k, v...).
func (a *agentProc) metric(name string, labels ...string) float64 {
	a.t.Helper()
	return sample(a.metrics(), name, labels...)
}

// waitMetric waits until cond holds for the metric value.
func (a *agentProc) waitMetric(what string, cond func(float64) bool, name string, labels ...string) float64 {
	a.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := a.metric(name, labels...)
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: %s%v = %v after 10s\nagent output:\n%s", what, name, labels, v, a.out.String())
		}
		time.Sleep(50 * time.Millisecond) // polling a metric with a deadline
	}
}

// writeConfig writes the ip-masq-agent config file in a ConfigMap-like
// directory and returns the file path.
func writeConfig(t *testing.T, dir, body string) string {
	t.Helper()
	path := filepath.Join(dir, "ip-masq-agent")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// flowCase is one flow from the pod and the source the remote must see.
type flowCase struct {
	proto string // udp, tcp
	dst   netip.Addr
	want  string // "pod" or "node"
}

func podAddr(dst netip.Addr) netip.Addr {
	if dst.Is4() {
		return sandbox.PodAddr4
	}
	return sandbox.PodAddr6
}

func nodeAddr(dst netip.Addr) netip.Addr {
	if dst.Is4() {
		return sandbox.NodeAddr4
	}
	return sandbox.NodeAddr6
}

// checkFlows sends each flow from the pod and asserts the source the
// remote recorded. Each call uses a fresh port so flows never collide with
// conntrack entries of an earlier call.
func checkFlows(t *testing.T, top *sandbox.Topology, port uint16, cases []flowCase) {
	t.Helper()
	var dsts []netip.Addr
	seenDst := map[netip.Addr]bool{}
	for _, c := range cases {
		if !seenDst[c.dst] {
			seenDst[c.dst] = true
			dsts = append(dsts, c.dst)
		}
	}
	sink, err := sandbox.StartSink(top.Remote, dsts, port)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	for _, c := range cases {
		dst := netip.AddrPortFrom(c.dst, port)
		switch c.proto {
		case "udp":
			if _, ok, err := sandbox.SendUDP(top.Pod, dst, []byte("nfmasq"), 3*time.Second); err != nil || !ok {
				t.Errorf("udp %s: echo=%v err=%v", dst, ok, err)
			}
		case "tcp":
			if _, _, err := sandbox.SendTCP(top.Pod, dst, []byte("nfmasq"), 3*time.Second); err != nil {
				t.Errorf("tcp %s: %v", dst, err)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	seen, err := sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) >= len(cases) })
	if err != nil {
		t.Fatalf("%v (seen %v)", err, seen)
	}
	for _, c := range cases {
		want := podAddr(c.dst)
		if c.want == "node" {
			want = nodeAddr(c.dst)
		}
		found := false
		for _, s := range seen {
			if s.Proto == c.proto && s.Dst.Addr() == c.dst {
				found = true
				if s.Src.Addr() != want {
					t.Errorf("%s to %s arrived from %s, want the %s address %s", c.proto, c.dst, s.Src.Addr(), c.want, want)
				}
			}
		}
		if !found {
			t.Errorf("%s to %s: nothing recorded at the remote", c.proto, c.dst)
		}
	}
}

// iptablesSave returns the node's ruleset for both families without
// counters, for comparisons across restarts.
func iptablesSave(t *testing.T, ns *netns.NS) string {
	t.Helper()
	var b strings.Builder
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		out := netnstest.Run(t, ns, tool)
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "#") {
				continue // timestamps
			}
			if strings.HasPrefix(line, ":") {
				// ":CHAIN POLICY [pkts:bytes]" -> drop counters
				if i := strings.LastIndex(line, " ["); i > 0 {
					line = line[:i]
				}
			}
			fmt.Fprintln(&b, line)
		}
	}
	return b.String()
}

// udpFlow sends n datagrams on one socket (one flow) to dst from inside ns
// and waits for each echo; onEach, if set, runs after each echo.
func udpFlow(ns *netns.NS, dst netip.AddrPort, n int, onEach func(i int)) error {
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		if _, err := c.Write([]byte("burst")); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(buf); err != nil {
			return fmt.Errorf("datagram %d of the flow to %s: %w", i, dst, err)
		}
		if onEach != nil {
			onEach(i)
		}
	}
	return nil
}

// liveUDP is one UDP flow kept open across policy changes.
type liveUDP struct {
	conn *net.UDPConn
	sink *sandbox.Sink
	dst  netip.AddrPort
}

func startLiveUDP(t *testing.T, top *sandbox.Topology, dst netip.AddrPort) *liveUDP {
	t.Helper()
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{dst.Addr()}, dst.Port())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sink.Close)
	l := &liveUDP{sink: sink, dst: dst}
	if err := top.Pod.Do(func() (err error) {
		l.conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.conn.Close() })
	return l
}

// expectSource sends one datagram on the flow and checks the source the
// remote recorded for it.
func (l *liveUDP) expectSource(t *testing.T, want netip.Addr) {
	t.Helper()
	before := len(l.sink.Seen())
	if _, err := l.conn.Write([]byte("live")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	_ = l.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := l.conn.Read(buf); err != nil {
		t.Fatalf("live flow echo: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	seen, err := l.sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) > before })
	if err != nil {
		t.Fatal(err)
	}
	if got := seen[len(seen)-1].Src.Addr(); got != want {
		t.Errorf("live UDP flow to %s arrives from %s, want %s", l.dst, got, want)
	}
}
