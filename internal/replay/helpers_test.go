package replay_test

import (
	"bytes"
	"testing"

	"github.com/nfmasq/nfmasq/internal/pcapgen"
	"github.com/nfmasq/nfmasq/nat"
)

// testPolicy is the agent's default policy with IPv6 enabled and
// pcapgen's IPv6 non-masquerade range configured, so that every class of
// generated destination has a known decision.
func testPolicy(t testing.TB) *nat.Policy {
	t.Helper()
	cfg := nat.DefaultConfig(true)
	cfg.NonMasqueradeCIDRs = append(cfg.NonMasqueradeCIDRs, "fd00::/8")
	cfg.CustomCIDRs = true
	p, err := nat.Compile(nat.Input{Config: cfg, EnableIPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// generate writes a synthetic capture in memory.
func generate(t testing.TB, cfg pcapgen.Config) ([]byte, pcapgen.Stats) {
	t.Helper()
	g, err := pcapgen.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	st, err := g.WritePcap(&buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), st
}

// benchConfig is the capture of the replay benchmark: a steady mix of
// established flows, as a node sees them, one packet in a hundred new.
var benchConfig = pcapgen.Config{
	Flows:            1000,
	PacketsPerFlow:   100,
	InternetFraction: 0.6,
	IPv6Fraction:     0.2,
	UDPFraction:      0.3,
	PayloadSize:      64,
	Seed:             1,
}
