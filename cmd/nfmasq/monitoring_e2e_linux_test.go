package main

import (
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// Every metric the alert and recording rules name is one the agent
// exports: the names come from a real agent's /metrics (with the flow
// log, nat records and the IPFIX exporter on, so that every family is
// there).
func TestMonitoringRulesNameExportedMetrics(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	top := netnstest.NewTopology(t)
	dir := t.TempDir()
	scrape := netip.AddrPortFrom(sandbox.NodeAddr4, 9741).String()
	startAgent(t, top, "--config", writeConfig(t, dir, auditConfig), "--flow-log", "file:"+dir+"/flows.jsonl", "--flow-log-nat",
		"--ipfix-collector", "192.168.77.2:4739", "--metrics-scrape-addr", scrape)
	// Scraped as a cluster's Prometheus would, from another host, on the
	// node's address; health is not served there.
	client := top.Remote.HTTPClient()
	if resp, err := client.Get("http://" + scrape + "/healthz"); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("/healthz on the scrape address: %v %v, want 404", resp, err)
	} else {
		resp.Body.Close()
	}
	resp, err := client.Get("http://" + scrape + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for name, mf := range families {
		exported[name] = true
		if mf.GetType().String() == "HISTOGRAM" {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				exported[name+suffix] = true
			}
		}
	}
	rules, err := os.ReadFile("../../deploy/monitoring/rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var named []string
	for _, m := range regexp.MustCompile(`\bnfmasq_[a-z0-9_]+`).FindAllString(string(rules), -1) {
		if !slices.Contains(named, m) {
			named = append(named, m)
		}
	}
	if len(named) < 10 {
		t.Fatalf("the rules name only %d metrics: %v", len(named), named)
	}
	for _, m := range named {
		if !exported[m] {
			t.Errorf("deploy/monitoring/rules.yaml names %s, which the agent does not export", m)
		}
	}
	t.Logf("the rules name %d metrics, all exported: %v", len(named), named)
}
