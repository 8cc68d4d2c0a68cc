package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// kernelTools are the programs the agent may run. boundsFakeTools puts a
// recording stand-in for each first on PATH, so a test sees whether a run
// reached the kernel, and the real tools are never run.
var kernelTools = []string{
	"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore",
	"iptables-nft", "iptables-nft-save", "iptables-nft-restore", "ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore",
	"iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore",
	"ipset", "conntrack", "ip", "modprobe", "sysctl",
}

// boundsFakeTools replaces PATH with a directory of stand-ins that append
// their command line to a log and fail. It returns a function reading and
// clearing the log.
func boundsFakeTools(t *testing.T) func() string {
	t.Helper()
	if runtime.GOOS == "windows" {
		t.Skip("the stand-in tools are shell scripts")
	}
	dir := t.TempDir()
	log := filepath.Join(dir, "calls.log")
	for _, name := range kernelTools {
		script := fmt.Sprintf("#!/bin/sh\necho \"%s $*\" >> %s\nexit 1\n", name, strconv.Quote(log))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir)
	// Out of a cluster whatever the environment: no API server is asked.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	return func() string {
		b, _ := os.ReadFile(log)
		_ = os.Remove(log)
		return string(b)
	}
}

// runBounded is run with a watchdog: a case that unexpectedly starts the
// agent is stopped with SIGTERM (which the agent handles) instead of
// hanging the test binary.
func runBounded(t *testing.T, args []string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &errb) }()
	select {
	case code = <-done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		code = <-done
		t.Errorf("nfmasq %s was still running after 15s: it started instead of refusing", strings.Join(args, " "))
	}
	return code, out.String(), errb.String()
}

// agentArgs returns `nfmasq agent` arguments: harmless defaults (no flow
// log, no metrics listener, a missing config file) overridden by kv
// pairs; a pair with value "-" drops the flag.
func agentArgs(t *testing.T, kv ...string) []string {
	flags := map[string]string{
		"--pod-cidr":     "10.244.0.0/24",
		"--flow-log":     "off",
		"--metrics-addr": "",
		"--config":       filepath.Join(t.TempDir(), "none"),
	}
	var extra []string
	for i := 0; i+1 < len(kv); i += 2 {
		if _, ok := flags[kv[i]]; ok || kv[i+1] == "-" {
			flags[kv[i]] = kv[i+1]
			continue
		}
		extra = append(extra, kv[i]+"="+kv[i+1])
	}
	names := make([]string, 0, len(flags))
	for name := range flags {
		names = append(names, name)
	}
	sort.Strings(names)
	args := []string{"agent"}
	for _, name := range names {
		if flags[name] != "-" {
			args = append(args, name+"="+flags[name])
		}
	}
	return append(args, extra...)
}

// Every flag at or past its bound stops the agent with exit status 2 and
// one line naming the problem, before it runs any tool: nothing on the
// node changes because of a typo.
func TestBoundsAgentFlags(t *testing.T) {
	calls := boundsFakeTools(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	tests := []struct {
		name string
		kv   []string
		want []string // substrings of the error line
	}{
		{"negative workers", []string{"--workers", "-1"}, []string{"--workers -1", "0 or more"}},
		{"workers not a number", []string{"--workers", "many"}, []string{"--workers"}},
		{"queue range past 65535", []string{"--queue-num", "65535", "--queues", "2"}, []string{"--queue-num 65535", "--queues 2", "65535"}},
		{"queue number beyond 16 bits", []string{"--queue-num", "65536"}, []string{"--queue-num", "out of range"}},
		{"no queue", []string{"--queues", "0"}, []string{"--queues 0"}},
		{"mark mask on kube-proxy's bits", []string{"--mark-mask", "0xc000"}, []string{"--mark-mask", "kube-proxy"}},
		{"mark mask on kube-proxy's drop bit", []string{"--mark-mask", "0x9000"}, []string{"--mark-mask", "kube-proxy", "0x8000"}},
		{"mark mask on Calico's bits", []string{"--mark-mask", "0x30000"}, []string{"--mark-mask", "Calico"}},
		{"mark mask of one bit", []string{"--mark-mask", "0x1000"}, []string{"--mark-mask", "fewer than 2 bits"}},
		{"mark mask zero", []string{"--mark-mask", "0"}, []string{"--mark-mask", "fewer than 2 bits"}},
		{"mark mask beyond 32 bits", []string{"--mark-mask", "0x100003000"}, []string{"--mark-mask", "out of range"}},
		{"mark mask not a number", []string{"--mark-mask", "lots"}, []string{"--mark-mask", "lots"}},
		{"pod CIDR not a prefix", []string{"--pod-cidr", "banana"}, []string{"--pod-cidr", "banana"}},
		{"pod CIDR length 33", []string{"--pod-cidr", "10.244.0.0/33"}, []string{"--pod-cidr", "10.244.0.0/33"}},
		{"pod CIDR with host bits", []string{"--pod-cidr", "10.244.0.1/24"}, []string{"host bits", "10.244.0.0/24"}},
		{"IPv6 pod CIDR without --enable-ipv6", []string{"--pod-cidr", "fd00:10:244::/64"}, []string{"--pod-cidr fd00:10:244::/64", "--enable-ipv6"}},
		{"no pod CIDR outside a cluster", []string{"--pod-cidr", "-"}, []string{"no --pod-cidr"}},
		{"unknown flow-log sink", []string{"--flow-log", "ftp://collector"}, []string{"--flow-log", "ftp://collector"}},
		{"flow-log file without a path", []string{"--flow-log", "file:"}, []string{"--flow-log", "needs a path"}},
		{"flow-log file naming a directory", []string{"--flow-log", "file:/var/log/"}, []string{"--flow-log", "directory"}},
		{"negative flow-log buffer", []string{"--flow-log-buffer", "-1"}, []string{"--flow-log-buffer -1"}},
		{"negative flow-log rate", []string{"--flow-log-rate", "-5"}, []string{"--flow-log-rate -5"}},
		{"metrics address without a port", []string{"--metrics-addr", "localhost"}, []string{"--metrics-addr", "missing port"}},
		{"metrics port beyond 65535", []string{"--metrics-addr", "127.0.0.1:99999"}, []string{"--metrics-addr", "invalid port"}},
		{"metrics address in use", []string{"--metrics-addr", busy.Addr().String()}, []string{"--metrics-addr", "address already in use"}},
		{"log format", []string{"--log-format", "xml"}, []string{"--log-format", "xml"}},
		{"log level", []string{"--log-level", "loud"}, []string{"--log-level"}},
		{"iptables backend", []string{"--iptables-backend", "iptables9"}, []string{"--iptables-backend", "iptables9"}},
		{"negative ipset threshold", []string{"--ipset-threshold", "-1"}, []string{"ipset threshold -1"}},
		{"masquerade ports beyond 65535", []string{"--to-ports", "32768-70000"}, []string{"70000"}},
		{"cluster CIDR not a prefix", []string{"--cluster-cidr", "banana"}, []string{"--cluster-cidr", "banana"}},
		{"unknown flag", []string{"--resync-interval", "0s"}, []string{"unknown flag", "--resync-interval"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := agentArgs(t, tt.kv...)
			code, _, stderr := runBounded(t, args)
			if code != exitConfig {
				t.Errorf("nfmasq %s: exit status %d, want %d\n%s", strings.Join(args, " "), code, exitConfig, stderr)
			}
			first, _, _ := strings.Cut(stderr, "\n")
			if !strings.HasPrefix(first, "nfmasq: ") {
				t.Errorf("first line of stderr %q is not the error", first)
			}
			for _, w := range tt.want {
				if !strings.Contains(first, w) {
					t.Errorf("error %q does not mention %q", first, w)
				}
			}
			if ran := calls(); ran != "" {
				t.Errorf("ran tools before refusing to start:\n%s", ran)
			}
		})
	}
}

// Config values at their bounds are errors with the key's name, exit 2,
// from `nfmasq config` and `nfmasq rules` (the agent itself keeps its rules
// and retries instead: TestHardenInvalidConfigAtStart).
func TestBoundsConfigValues(t *testing.T) {
	calls := boundsFakeTools(t)
	tests := []struct {
		name, body string
		want       []string
	}{
		{"resyncInterval zero", "resyncInterval: 0s\n", []string{"resyncInterval", "positive"}},
		{"resyncInterval negative", "resyncInterval: -5s\n", []string{"resyncInterval", "positive"}},
		{"resyncInterval bare number", "resyncInterval: 60\n", []string{"resyncInterval"}},
		{"cidrLimit negative", "cidrLimit: -1\n", []string{"cidrLimit", "negative"}},
		{"cidrLimit below the list", "cidrLimit: 1\nnonMasqueradeCIDRs: [10.0.0.0/8, 11.0.0.0/8]\n", []string{"cidrLimit"}},
		{"CIDR not a prefix", "nonMasqueradeCIDRs: [abcdefg]\n", []string{"abcdefg"}},
		{"IPv6 CIDR without --enable-ipv6", "nonMasqueradeCIDRs: [\"fd00::/8\"]\n", []string{"fd00::/8"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ip-masq-agent")
			if err := os.WriteFile(path, []byte(tt.body), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, cmd := range [][]string{
				{"config", "--config", path},
				{"rules", "--config", path, "--pod-cidr", "10.244.0.0/24"},
			} {
				code, stdout, stderr := runBounded(t, cmd)
				if code != exitConfig {
					t.Errorf("nfmasq %s: exit status %d, want %d", strings.Join(cmd, " "), code, exitConfig)
				}
				if stdout != "" {
					t.Errorf("nfmasq %s printed %q on a bad config", cmd[0], stdout)
				}
				for _, w := range tt.want {
					if !strings.Contains(stderr, w) {
						t.Errorf("nfmasq %s: error %q does not mention %q", cmd[0], strings.TrimSpace(stderr), w)
					}
				}
			}
			if ran := calls(); ran != "" {
				t.Errorf("ran tools:\n%s", ran)
			}
		})
	}
}

// No command the agent runs goes through a shell: every exec.Command and
// Runner.Run call in the module's non-test code names a program directly,
// with no "sh -c" and no command line assembled by concatenation.
func TestHardenNoShellCommands(t *testing.T) {
	root := filepath.Join("..", "..")
	fset := token.NewFileSet()
	var calls, bad []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || d.Name() == ".git" || d.Name() == "vendor") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			// The program is the first argument of exec.Command and the
			// one after the context of exec.CommandContext and Run.
			nameArg := -1
			switch {
			case isPkg(sel.X, "exec") && sel.Sel.Name == "Command":
				nameArg = 0
			case isPkg(sel.X, "exec") && sel.Sel.Name == "CommandContext":
				nameArg = 1
			case sel.Sel.Name == "Run" && len(call.Args) >= 3:
				nameArg = 2
			default:
				return true
			}
			if nameArg >= len(call.Args) {
				return true
			}
			where := fset.Position(call.Pos()).String()
			if sel.Sel.Name != "Run" {
				calls = append(calls, where)
			}
			if _, concat := call.Args[nameArg].(*ast.BinaryExpr); concat {
				bad = append(bad, where+": program name built by concatenation")
			}
			for _, a := range call.Args[nameArg:] {
				lit, ok := a.(*ast.BasicLit)
				if !ok || lit.Kind != token.STRING {
					continue
				}
				s, _ := strconv.Unquote(lit.Value)
				if slices.Contains([]string{"sh", "bash", "/bin/sh", "/bin/bash", "-c"}, s) || strings.Contains(s, "sh -c") {
					bad = append(bad, fmt.Sprintf("%s: shell argument %q", where, s))
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) == 0 {
		t.Fatal("found no exec.Command call at all: the walk is broken")
	}
	for _, b := range bad {
		t.Error(b)
	}
	t.Logf("%d exec.Command calls checked", len(calls))
}

func isPkg(x ast.Expr, name string) bool {
	id, ok := x.(*ast.Ident)
	return ok && id.Name == name
}

// A value with newlines, quotes or a whole forged record inside (a config
// path, a pod name) stays inside its field: one log line per record, in
// both formats, and the JSON value reads back unchanged.
func TestHardenLogFieldsEscaped(t *testing.T) {
	forged := `{"time":"2025-01-01T00:00:00Z","level":"ERROR","msg":"forged"}`
	hostile := []string{
		"/etc/config/ip-masq-agent\n" + forged,
		"ns/pod\"name\\\r\nlevel=ERROR msg=forged",
		"\x1b[2Jterminal\u2028separator\x00nul",
		"\xff\xfe not utf-8",
	}
	for _, format := range []string{"json", "text"} {
		for _, v := range hostile {
			var buf bytes.Buffer
			log, err := newLogger(&buf, format, "info")
			if err != nil {
				t.Fatal(err)
			}
			log.Error("config rejected; keeping the last good policy", "path", v, "pod", v)
			out := buf.String()
			if n := strings.Count(out, "\n"); n != 1 || !strings.HasSuffix(out, "\n") {
				t.Errorf("%s: %q logged as %d lines: %q", format, v, n, out)
			}
			if strings.Contains(out, "\r") || strings.Contains(out, "\x1b") || strings.Contains(out, "\x00") {
				t.Errorf("%s: control characters reached the log: %q", format, out)
			}
			if format != "json" {
				continue
			}
			var rec map[string]any
			if err := json.Unmarshal([]byte(out), &rec); err != nil {
				t.Errorf("json: %q: %v", out, err)
				continue
			}
			if rec["msg"] != "config rejected; keeping the last good policy" || rec["level"] != slog.LevelError.String() {
				t.Errorf("json: record altered: %v", rec)
			}
			// Each invalid byte becomes U+FFFD, as a []rune conversion does.
			if want := string([]rune(v)); rec["path"] != want {
				t.Errorf("json: path read back as %q, want %q", rec["path"], want)
			}
		}
	}
}
