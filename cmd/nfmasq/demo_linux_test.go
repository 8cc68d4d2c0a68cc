package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// The demo (the README's first command) runs end to end: decisions, what
// the remote hosts saw, the flow log, and nfmasq who naming the pod
// address behind the translated source the internet host saw.
func TestDemo(t *testing.T) {
	netnstest.Require(t, "iptables-restore", "ip6tables-restore")
	kept := filepath.Join(t.TempDir(), "flows.jsonl")
	cmd := exec.Command(os.Args[0], "demo", "--flow-log", kept)
	cmd.Env = append(os.Environ(), "NFMASQ_RUN_MAIN=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{"node address (masqueraded)", "pod address kept", `"kind":"nat"`, "which pod was behind 192.168.77.1:", "sandbox removed."} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
	// The who answer is the line after the command.
	_, after, _ := strings.Cut(text, "  nfmasq who --translated ")
	lines := strings.SplitN(after, "\n", 3)
	if len(lines) < 2 {
		t.Fatalf("no answer after the who command:\n%s", text)
	}
	var flow struct {
		Src, Proto string
		Records    []string
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(lines[1])), &flow); err != nil || flow.Src != "10.244.0.2" || flow.Proto != "tcp" || len(flow.Records) != 3 {
		t.Errorf("who answered %q (%v), want the pod's TCP flow joined from three records", lines[1], err)
	}
	if data, err := os.ReadFile(kept); err != nil || strings.Count(string(data), "\n") != 10 {
		t.Errorf("kept flow log: %v, %d lines, want 10", err, strings.Count(string(data), "\n"))
	}
}
