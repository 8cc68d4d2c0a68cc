package kube

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// outageProxy forwards TCP to the API server and can go away and come
// back on the same address: to the controller behind it that is an API
// server restart (connections reset, then refused, then accepted again),
// without disturbing the real server other tests use. TLS passes through
// untouched; the server certificate names 127.0.0.1 whatever the port.
type outageProxy struct {
	upstream string
	addr     string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newOutageProxy(t *testing.T, upstream string) *outageProxy {
	t.Helper()
	p := &outageProxy{upstream: upstream, conns: make(map[net.Conn]struct{})}
	if err := p.start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return p
}

func (p *outageProxy) start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.ln, p.addr = ln, ln.Addr().String()
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() { defer p.wg.Done(); p.forward(c) }()
		}
	}()
	return nil
}

func (p *outageProxy) forward(c net.Conn) {
	u, err := net.Dial("tcp", p.upstream)
	if err != nil {
		c.Close()
		return
	}
	if !p.track(c, u) {
		return
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done
	c.Close()
	u.Close()
	<-done
	p.untrack(c, u)
}

// track registers a connection pair, or closes it when the proxy is down.
func (p *outageProxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil {
		for _, c := range conns {
			c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *outageProxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

// stop closes the listener and resets every open connection.
func (p *outageProxy) stop() {
	p.mu.Lock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// TestIntegrationSurvivesAPIServerOutage takes the API server away from a
// running controller, changes the policies meanwhile, and brings it back:
// the informers re-list and the ConfigMap converges with no restart.
func TestIntegrationSurvivesAPIServerOutage(t *testing.T) {
	s := apiServer(t)
	s.resetPolicies(t)
	u, err := url.Parse(s.config.Host)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newOutageProxy(t, u.Host)

	cfg := rest.CopyConfig(s.config)
	cfg.Host = "https://" + proxy.addr
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: controllerAccount,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"},
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.createPolicy(t, policy("it-before", "NoSNAT", "10.0.0.0/8"))
	c, err := NewEgressController(client, dyn, EgressOptions{
		ClusterCIDRs: prefixes("10.244.0.0/16"),
		ConfigMap:    agentConfigMap,
		Resync:       time.Minute,
		Logger:       testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("controller: %v", err)
		}
	})
	s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.244.0.0/16\n")

	addr := proxy.addr
	proxy.stop()
	// While the controller cannot reach the server, the policies change.
	s.createPolicy(t, policy("it-during", "NoSNAT", "172.16.0.0/12"))
	if err := s.dyn.Resource(EgressPolicyResource).Delete(t.Context(), "it-before", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := proxy.start(addr); err != nil {
		t.Fatalf("the proxy cannot come back on %s: %v", addr, err)
	}
	start := time.Now()
	s.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.244.0.0/16\n- 172.16.0.0/12\n")
	s.waitCondition(t, "it-during", metav1.ConditionTrue)
	t.Logf("converged %v after the server came back", time.Since(start).Round(time.Millisecond))
}
