package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Load returns the last policy again, without rebuilding it, while the
// config and egress policy files hold the same bytes and the flags are
// the same; any change in them builds a new one.
func TestLoadSkipsUnchangedInputs(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config")
	egress := filepath.Join(dir, "egress.yaml")
	write := func(path, s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(cfg, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n")
	f := PolicySource{ConfigPath: cfg, Agent: true, AllReservedRanges: true}
	load := func() string {
		t.Helper()
		p, _, err := f.Load()
		if err != nil {
			t.Fatal(err)
		}
		return p.Hash()
	}
	first, _, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	if again, _, _ := f.Load(); again != first {
		t.Error("the same file built a new policy")
	}

	h1 := load()
	write(cfg, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 11.0.0.0/8\n")
	h2 := load()
	if h2 == h1 {
		t.Error("a changed config file kept the old policy")
	}
	write(cfg, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n")
	if load() != h1 {
		t.Error("restoring the config file did not restore the policy")
	}

	f.EnableIPv6 = true
	if p, _, _ := f.Load(); p == first || p.Hash() == h1 {
		t.Error("a changed flag kept the old policy")
	}

	write(egress, "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata:\n  name: default\nspec:\n  action: NoSNAT\n  destinations:\n  - cidr: 10.0.0.0/8\n")
	f.EgressPolicyFiles = []string{egress}
	e1 := load()
	write(egress, "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata:\n  name: default\nspec:\n  action: NoSNAT\n  destinations:\n  - cidr: 12.0.0.0/8\n")
	if load() == e1 {
		t.Error("a changed egress policy file kept the old policy")
	}

	if err := os.Remove(cfg); err != nil {
		t.Fatal(err)
	}
	f.EgressPolicyFiles = nil
	_, warnings, err := f.Load()
	if err != nil || len(warnings) == 0 {
		t.Errorf("missing config file: warnings %q, err %v; want the no-config warning", warnings, err)
	}
}

func TestPublished(t *testing.T) {
	dir := "/etc/config"
	for _, tt := range []struct {
		ev   fsnotify.Event
		want bool
	}{
		{fsnotify.Event{Name: "/etc/config/..data", Op: fsnotify.Create}, true},
		{fsnotify.Event{Name: "/etc/config/..data_tmp", Op: fsnotify.Create}, false},
		{fsnotify.Event{Name: "/etc/config/..data_tmp", Op: fsnotify.Rename}, false},
		{fsnotify.Event{Name: "/etc/config/..data", Op: fsnotify.Remove}, false},
		{fsnotify.Event{Name: "/etc/config/ip-masq-agent", Op: fsnotify.Create}, false},
		{fsnotify.Event{Name: "/etc/other/..data", Op: fsnotify.Create}, false},
	} {
		if got := published(tt.ev, dir); got != tt.want {
			t.Errorf("published(%v) = %v, want %v", tt.ev, got, tt.want)
		}
	}
}

// A ConfigMap update as kubelet's atomic writer makes it (new timestamped
// directory, "..data_tmp" symlink renamed over "..data", old directory
// removed) is reported as a change.
func TestConfigWatchSeesConfigMapUpdate(t *testing.T) {
	dir := t.TempDir()
	version := func(name, content string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name, "config"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	version("..v1", "masqLinkLocal: true\n")
	if err := os.Symlink("..v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/config", filepath.Join(dir, "config")); err != nil {
		t.Fatal(err)
	}
	cw := newConfigWatch(filepath.Join(dir, "config"), slog.New(slog.DiscardHandler))
	defer cw.Close()
	if cw.w == nil {
		t.Fatal("no watch on the config directory")
	}

	version("..v2", "masqLinkLocal: false\n")
	if err := os.Symlink("..v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "..v1")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cw.Changed():
	case <-time.After(5 * time.Second):
		t.Fatal("no change reported 5s after the ConfigMap update")
	}
	b, err := os.ReadFile(filepath.Join(dir, "config"))
	if err != nil || string(b) != "masqLinkLocal: false\n" {
		t.Fatalf("config reads %q, %v after the update", b, err)
	}
}
