package main

import (
	"fmt"
	"os"
	"path/filepath"
)

// configMapVolume lays a config file out as kubelet's atomic writer lays
// out a ConfigMap volume, and updates it the same way:
//
//	dir/..v1/config       the files of one version
//	dir/..data -> ..v1    the version in force
//	dir/config -> ..data/config
//
// An update writes the next version's directory, points "..data_tmp" at
// it and renames that over "..data": readers see the old file or the new
// one, whole. The agent reloads when "..data" appears, without waiting out
// its debounce of file events.
type configMapVolume struct {
	dir, name string
	version   int
}

func newConfigMapVolume(dir, name string, content []byte) (*configMapVolume, error) {
	v := &configMapVolume{dir: dir, name: name}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := v.prepare(content); err != nil {
		return nil, err
	}
	if err := v.publish(); err != nil {
		return nil, err
	}
	if err := os.Symlink(filepath.Join("..data", name), v.path()); err != nil {
		return nil, fmt.Errorf("config volume: %w", err)
	}
	return v, nil
}

// path is the config file as the agent is told it.
func (v *configMapVolume) path() string { return filepath.Join(v.dir, v.name) }

func (v *configMapVolume) versionDir(n int) string { return fmt.Sprintf("..v%d", n) }

// prepare writes the next version and points "..data_tmp" at it.
func (v *configMapVolume) prepare(content []byte) error {
	next := v.versionDir(v.version + 1)
	if err := os.Mkdir(filepath.Join(v.dir, next), 0o755); err != nil {
		return fmt.Errorf("config volume: %w", err)
	}
	if err := os.WriteFile(filepath.Join(v.dir, next, v.name), content, 0o644); err != nil {
		return fmt.Errorf("config volume: %w", err)
	}
	if err := os.Symlink(next, filepath.Join(v.dir, "..data_tmp")); err != nil {
		return fmt.Errorf("config volume: %w", err)
	}
	return nil
}

// publish renames "..data_tmp" over "..data": the prepared version is in
// force from here.
func (v *configMapVolume) publish() error {
	if err := os.Rename(filepath.Join(v.dir, "..data_tmp"), filepath.Join(v.dir, "..data")); err != nil {
		return fmt.Errorf("config volume: %w", err)
	}
	v.version++
	return nil
}

// cleanup removes the versions before the one in force, as kubelet does
// after publishing.
func (v *configMapVolume) cleanup() error {
	for n := 1; n < v.version; n++ {
		if err := os.RemoveAll(filepath.Join(v.dir, v.versionDir(n))); err != nil {
			return fmt.Errorf("config volume: %w", err)
		}
	}
	return nil
}
