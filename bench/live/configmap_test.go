package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The volume reads as each published version in turn, and cleanup keeps
// only the one in force.
func TestConfigMapVolume(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	v, err := newConfigMapVolume(dir, "config", []byte("one"))
	if err != nil {
		t.Fatal(err)
	}
	read := func() string {
		t.Helper()
		b, err := os.ReadFile(v.path())
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := read(); got != "one" {
		t.Fatalf("config = %q, want one", got)
	}
	if err := v.prepare([]byte("two")); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "one" {
		t.Fatalf("prepared but not published: config = %q, want one", got)
	}
	if err := v.publish(); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "two" {
		t.Fatalf("published: config = %q, want two", got)
	}
	if err := v.cleanup(); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"..data", "..v2", "config"}; !slices.Equal(names, want) {
		t.Errorf("volume holds %q, want %q", names, want)
	}
}
