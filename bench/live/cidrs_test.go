package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/nat"
)

func TestNonMasqueradeList(t *testing.T) {
	defaults := nat.DefaultNonMasqueradeCIDRs(true)
	dst := netip.MustParseAddr("11.0.0.10")
	tests := []struct {
		n       int
		wantErr bool
	}{
		{n: len(defaults)},
		{n: 1000},
		{n: 50000},
		{n: 3, wantErr: true},
	}
	for _, tt := range tests {
		list, err := nonMasqueradeList(tt.n, 7)
		if (err != nil) != tt.wantErr {
			t.Fatalf("nonMasqueradeList(%d): err %v, want error %v", tt.n, err, tt.wantErr)
		}
		if err != nil {
			continue
		}
		if len(list) != tt.n || !slices.Equal(list[:len(defaults)], defaults) {
			t.Fatalf("nonMasqueradeList(%d): %d entries, starting %v", tt.n, len(list), list[:min(len(list), 3)])
		}
		// The policy keeps every entry (none nests in another), and the
		// test destination stays masqueraded.
		cfg := nat.DefaultConfig(true)
		cfg.NonMasqueradeCIDRs = list
		pol, err := nat.Compile(nat.Input{Config: cfg, AllReservedRanges: true})
		if err != nil {
			t.Fatal(err)
		}
		got := len(pol.NonMasquerade(false))
		if want := tt.n + 1; got != want { // + link-local
			t.Errorf("nonMasqueradeList(%d): policy keeps %d prefixes, want %d", tt.n, got, want)
		}
		for _, p := range pol.NonMasquerade(false) {
			if p.Contains(dst) {
				t.Errorf("nonMasqueradeList(%d): %s covers the test destination", tt.n, p)
			}
		}
	}
}

func TestNonMasqueradeListDeterministic(t *testing.T) {
	a, _ := nonMasqueradeList(500, 3)
	b, _ := nonMasqueradeList(500, 3)
	c, _ := nonMasqueradeList(500, 4)
	if !slices.Equal(a, b) {
		t.Error("same seed, different lists")
	}
	if slices.Equal(a, c) {
		t.Error("different seeds, same list")
	}
}

func TestConfigFileParses(t *testing.T) {
	list, err := nonMasqueradeList(100, 1)
	if err != nil {
		t.Fatal(err)
	}
	path := t.TempDir() + "/config"
	if err := writeFile(path, configFile(list)); err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := nat.LoadConfig(path, nat.ParseOptions{AllReservedRanges: true})
	if err != nil || len(warnings) > 0 {
		t.Fatalf("LoadConfig: %v, warnings %v", err, warnings)
	}
	if !slices.Equal(cfg.NonMasqueradeCIDRs, list) || cfg.MasqLinkLocal {
		t.Errorf("config read back as %d CIDRs (masqLinkLocal %v), want the %d written", len(cfg.NonMasqueradeCIDRs), cfg.MasqLinkLocal, len(list))
	}
	if !strings.HasPrefix(string(configFile(nil)), "# generated") {
		t.Error("config file lost its header")
	}
}
