package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/replay"
)

// pcapgenFile runs pcapgen into a fresh file and returns its path and
// what pcapgen said it wrote.
func pcapgenFile(t *testing.T, args ...string) (string, pcapgenSummary) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "gen.pcap")
	stdout, stderr, code := nfmasq(t, append([]string{"pcapgen", "--out", path}, args...)...)
	if code != exitOK {
		t.Fatalf("pcapgen exited %d: %s", code, stderr)
	}
	var s pcapgenSummary
	if err := json.Unmarshal([]byte(stdout), &s); err != nil {
		t.Fatalf("pcapgen output %q: %v", stdout, err)
	}
	return path, s
}

// TestPcapgenReplay generates a capture and replays it: every flow is
// decided by its destination class.
func TestPcapgenReplay(t *testing.T) {
	cfg := writeFile(t, "ip-masq-agent", "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fd00::/8]\n")
	path, gen := pcapgenFile(t, "--flows", "3000", "--packets-per-flow", "3", "--internet-fraction", "0.4",
		"--link-local-fraction", "0.1", "--ipv6-fraction", "0.3", "--seed", "5", "--link-type", "ethernet")
	if gen.Flows != 3000 || gen.Packets != 9000 || gen.File != path {
		t.Fatalf("pcapgen wrote %+v", gen)
	}

	stdout, stderr, code := nfmasq(t, "replay", "--pcap", path, "--config", cfg, "--enable-ipv6")
	if code != exitOK {
		t.Fatalf("replay exited %d: %s", code, stderr)
	}
	var s replay.Summary
	if err := json.Unmarshal([]byte(stdout), &s); err != nil {
		t.Fatalf("replay output %q: %v", stdout, err)
	}
	if s.Records != gen.Packets || s.IPPackets != gen.Packets || s.Flows != gen.Flows || len(s.Skipped) != 0 {
		t.Errorf("replayed %+v from %+v", s, gen)
	}
	if s.Decisions["masquerade"] != gen.Classes["internet"] ||
		s.Sources["config"] != gen.Classes["non_masquerade"] || s.Sources["link-local"] != gen.Classes["link_local"] {
		t.Errorf("decisions %v, sources %v; generated %v", s.Decisions, s.Sources, gen.Classes)
	}
	if len(s.Files) != 1 || s.Files[0] != path || s.RecordsPerSecond <= 0 {
		t.Errorf("summary files %v, rate %v", s.Files, s.RecordsPerSecond)
	}

	// The same flags write the same bytes.
	again, _ := pcapgenFile(t, "--flows", "3000", "--packets-per-flow", "3", "--internet-fraction", "0.4",
		"--link-local-fraction", "0.1", "--ipv6-fraction", "0.3", "--seed", "5", "--link-type", "ethernet")
	a, _ := os.ReadFile(path)
	b, _ := os.ReadFile(again)
	if !bytes.Equal(a, b) {
		t.Error("pcapgen with the same flags wrote different captures")
	}
}

func TestReplayLog(t *testing.T) {
	path, gen := pcapgenFile(t, "--flows", "50", "--packets-per-flow", "2", "--pod-cidr", "10.1.0.0/16,fd01::/64")
	stdout, stderr, code := nfmasq(t, "replay", "--pcap", path, "--config", noConfig(t), "--log", "--pod-cidr", "10.1.0.0/16")
	if code != exitOK {
		t.Fatalf("replay exited %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if uint64(len(lines)) != gen.Flows+1 {
		t.Fatalf("%d lines for %d flows and a summary", len(lines), gen.Flows)
	}
	for _, l := range lines[:len(lines)-1] {
		var rec replay.FlowRecord
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec.Packet == 0 || rec.Packet > gen.Flows {
			t.Errorf("flow record %s: %v", l, err)
		}
	}
	var s replay.Summary
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &s); err != nil || s.Flows != gen.Flows {
		t.Errorf("summary %s: %v", lines[len(lines)-1], err)
	}
	if !strings.Contains(stderr, "warning: no config file") {
		t.Errorf("stderr %q lacks the missing config warning", stderr)
	}
}

func TestReplayCutCapture(t *testing.T) {
	path, _ := pcapgenFile(t, "--flows", "10")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cut := writeFile(t, "cut.pcap", string(data[:len(data)-3]))
	stdout, stderr, code := nfmasq(t, "replay", "--pcap", cut, "--config", noConfig(t))
	if code != exitOK {
		t.Fatalf("a cut capture exited %d: %s", code, stderr)
	}
	var s replay.Summary
	if err := json.Unmarshal([]byte(stdout), &s); err != nil {
		t.Fatal(err)
	}
	if s.Records != 10 || s.IPPackets != 9 || s.Skipped["truncated_record"] != 1 || s.ReadError == "" {
		t.Errorf("summary %+v, want 9 IP packets and a truncated record", s)
	}
}

func TestReplayPcapgenErrors(t *testing.T) {
	dir := t.TempDir()
	notCapture := writeFile(t, "notes.txt", "hello\n")
	badConfig := writeFile(t, "bad.yaml", "nonMasqueradeCIDRs: [10.0.0.1/8]\n")
	good, _ := pcapgenFile(t, "--flows", "1")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"replay without --pcap", []string{"replay"}, "--pcap is required"},
		{"replay of a missing file", []string{"replay", "--pcap", filepath.Join(dir, "missing.pcap")}, "missing.pcap: no such file"},
		{"replay of a directory", []string{"replay", "--pcap", dir}, dir},
		{"replay of a text file", []string{"replay", "--pcap", notCapture}, "notes.txt: not a pcap or pcapng capture"},
		{"replay with a bad config", []string{"replay", "--pcap", good, "--config", badConfig}, "10.0.0.1/8"},
		{"replay with a bad pod CIDR", []string{"replay", "--pcap", good, "--pod-cidr", "10.0.0.0/33"}, "--pod-cidr"},
		{"replay with an argument", []string{"replay", "--pcap", good, "extra"}, "unknown command"},
		{"pcapgen without --out", []string{"pcapgen"}, "--out is required"},
		{"pcapgen fraction", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--ipv6-fraction", "1.5"}, "ipv6 fraction"},
		{"pcapgen no flows", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--flows", "0"}, "flows must be at least 1"},
		{"pcapgen link type", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--link-type", "wifi"}, "use raw or ethernet"},
		{"pcapgen two IPv4 pod CIDRs", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--pod-cidr", "10.1.0.0/16,10.2.0.0/16"}, "same family"},
		{"pcapgen bad range", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--non-masquerade", "10.0.0.0"}, "--non-masquerade"},
		{"pcapgen unwritable", []string{"pcapgen", "--out", filepath.Join(dir, "no", "such", "dir.pcap")}, "no such file"},
		{"pcapgen bad number", []string{"pcapgen", "--out", filepath.Join(dir, "x.pcap"), "--flows", "many"}, "invalid argument"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if args[0] == "replay" && !slices.Contains(args, "--config") {
				args = append(slices.Clone(args), "--config", noConfig(t))
			}
			stdout, stderr, code := nfmasq(t, args...)
			if code != exitConfig {
				t.Errorf("exit %d, want %d; stderr %q", code, exitConfig, stderr)
			}
			if !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q does not mention %q", stderr, tc.want)
			}
			if stdout != "" {
				t.Errorf("stdout %q on error", stdout)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "x.pcap")); err == nil {
		t.Error("pcapgen left a file behind after a flag error")
	}
}
