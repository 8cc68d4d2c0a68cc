package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/ipfixtest"
	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// A real Prometheus (Debian's) in the remote namespace scrapes a real
// agent through its opt-in scrape address and evaluates
// deploy/monitoring/rules.yaml, with its windows and `for` durations cut
// from minutes to seconds. Faults the hardening tests know how to make
// fire the matching alerts, which resolve once the fault ends: an invalid
// config, a full flow-log disk, the agent stopped (SIGSTOP) under a
// stream of new flows.
func TestPrometheusAlerts(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore", "prometheus", "mount", "umount")
	top := netnstest.NewTopology(t)
	dir := t.TempDir()

	// The flow log on a tiny tmpfs, to fill on purpose.
	logDir := filepath.Join(dir, "log")
	if err := os.Mkdir(logDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "nfmasq-prom", logDir).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", logDir).Run() })

	const goodConfig = "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1s\n"
	cfg := writeConfig(t, dir, goodConfig)
	scrape := netip.AddrPortFrom(sandbox.NodeAddr4, 9741).String()
	a := startAgent(t, top, "--config", cfg, "--flow-log", "file:"+filepath.Join(logDir, "flows.log"), "--metrics-scrape-addr", scrape)

	prom := startPrometheus(t, top.Remote, scrape, filepath.Join(dir, "prometheus"))
	prom.waitQuery(t, `up{job="nfmasq-agent"} == 1`, "the agent scraped")
	prom.waitQuery(t, `nfmasq_ready == 1`, "the agent ready")
	// A healthy node: no alert over several evaluations.
	prom.silent(t, 5*time.Second)

	// An invalid config.
	if err := os.WriteFile(cfg, []byte("nonMasqueradeCIDRs: [10.0.0.0/33]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	prom.waitAlert(t, "NfmasqConfigReloadFailing", "firing")
	if err := os.WriteFile(cfg, []byte(goodConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	prom.waitAlert(t, "NfmasqConfigReloadFailing", "")

	// The flow log's disk full: records are lost (and counted).
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{internet4, internal4}, 8400)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	send := func(n int) {
		for i := range n {
			dst := []netip.Addr{internet4, internal4}[i%2]
			if _, ok, err := sandbox.SendUDP(top.Pod, netip.AddrPortFrom(dst, 8400), []byte("x"), time.Second); err != nil || !ok {
				t.Errorf("flow %d to %v: %v", i, dst, err)
				return
			}
		}
	}
	netnstest.Poll(t, 30*time.Second, 10*time.Millisecond, "flow-log records dropped", func() bool {
		send(50)
		return a.metric("nfmasq_flowlog_dropped_total", "reason", "write_error") > 0
	})
	prom.waitAlert(t, "NfmasqAuditRecordsDropped", "firing")
	if out, err := exec.Command("mount", "-o", "remount,size=16m", logDir).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v: %s", err, out)
	}
	prom.waitAlert(t, "NfmasqAuditRecordsDropped", "")

	// The agent stopped under a burst of new flows: scrapes fail, its
	// queue fills, and fail-open hands the rest to the kernel fallback.
	pkts := make([][]byte, 12000) // beyond the queue's 8,192
	for i := range pkts {
		src := netip.AddrPortFrom(sandbox.PodAddr4, uint16(20000+i))
		dst := netip.AddrPortFrom(internet4, 8401)
		d := netnstest.UDPDatagram(src, dst, []byte("burst"))
		pkts[i] = append(netnstest.IPv4Header(17, len(d), 5, 0, src.Addr(), dst.Addr()), d...)
	}
	rs, err := newCraftSender(top)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	resume := a.pause()
	if err := rs.send(pkts...); err != nil {
		t.Fatal(err)
	}
	prom.waitAlert(t, "NfmasqAgentDown", "firing")
	resume()
	// The flows the fallback decided meanwhile end now rather than at
	// conntrack's timeouts: their fallback records are the evidence.
	endPodFlows(t, top)
	prom.waitAlert(t, "NfmasqFallbackDeciding", "firing")
	prom.waitAlert(t, "NfmasqAgentDown", "")
	prom.waitAlert(t, "NfmasqFallbackDeciding", "")
	prom.silent(t, 3*time.Second)
}

// promServer is a Prometheus server in a test namespace.
type promServer struct {
	*ipfixtest.Daemon
	url    string
	client *http.Client
}

// testRules returns rules.yaml with its time scales cut for a test: every
// range and `for` of minutes becomes seconds.
func testRules(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile("../../deploy/monitoring/rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	data = regexp.MustCompile(`\[\d+m\]`).ReplaceAll(data, []byte("[10s]"))
	data = regexp.MustCompile(`(?m)^(\s+for:) \d+m$`).ReplaceAll(data, []byte("$1 2s"))
	return data
}

func startPrometheus(t *testing.T, ns *netns.NS, target, dir string) *promServer {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "rules.yaml"), testRules(t), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}
rule_files: [%s]
scrape_configs:
  - job_name: nfmasq-agent
    static_configs: [{targets: ['%s']}]
`, filepath.Join(dir, "rules.yaml"), target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := netip.AddrPortFrom(sandbox.RemoteAddr4, 9090).String()
	d := ipfixtest.StartDaemon(t, ns, "prometheus", "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+listen)
	p := &promServer{Daemon: d, url: "http://" + listen, client: ns.HTTPClient()}
	netnstest.Poll(t, 60*time.Second, 50*time.Millisecond, "prometheus ready", func() bool {
		resp, err := p.client.Get(p.url + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// get decodes a Prometheus API answer's data.
func (p *promServer) get(path string, data any) error {
	resp, err := p.client.Get(p.url + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status string          `json:"status"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return err
	}
	if body.Status != "success" {
		return fmt.Errorf("%s: status %q", path, body.Status)
	}
	return json.Unmarshal(body.Data, data)
}

// waitQuery waits until the instant query returns a sample.
func (p *promServer) waitQuery(t *testing.T, query, what string) {
	t.Helper()
	netnstest.Poll(t, 60*time.Second, 100*time.Millisecond, what, func() bool {
		var data struct{ Result []any }
		return p.get("/api/v1/query?query="+urlQuery(query), &data) == nil && len(data.Result) > 0
	})
}

func urlQuery(q string) string {
	r := strings.NewReplacer(" ", "%20", "{", "%7B", "}", "%7D", "\"", "%22", "=", "%3D", "+", "%2B")
	return r.Replace(q)
}

// alerts returns the active alerts: name → state (pending, firing).
func (p *promServer) alerts() (map[string]string, error) {
	var data struct {
		Alerts []struct {
			Labels map[string]string
			State  string
		}
	}
	if err := p.get("/api/v1/alerts", &data); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, a := range data.Alerts {
		out[a.Labels["alertname"]] = a.State
	}
	return out, nil
}

// waitAlert waits until the alert is in state ("" for resolved).
func (p *promServer) waitAlert(t *testing.T, name, state string) {
	t.Helper()
	start := time.Now()
	var last map[string]string
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		as, err := p.alerts()
		if err == nil {
			last = as
			if as[name] == state {
				t.Logf("%s %s after %v (active: %v)", name, map[string]string{"": "resolved"}[state]+state, time.Since(start).Round(100*time.Millisecond), as)
				return
			}
		}
		time.Sleep(200 * time.Millisecond) // polling an HTTP API under a deadline
	}
	t.Fatalf("%s not %q within 90s; active alerts: %v\nprometheus:\n%s", name, state, last, tail(p.Output(), 20))
}

// silent checks that no alert is active for d.
func (p *promServer) silent(t *testing.T, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) { // sampling for d
		if as, err := p.alerts(); err != nil {
			t.Fatal(err)
		} else if len(as) > 0 {
			t.Fatalf("alerts active on a healthy node: %v", as)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
