// Package demo runs `nfmasq demo`: the agent in a throw-away sandbox of
// network namespaces (internal/sandbox), with TCP and UDP flows on each
// side of the default policy, and what the remote hosts saw.
package demo

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// Run builds a throw-away sandbox (pod, node, remote namespaces), runs
// the agent binary self in the node on the built-in default policy, sends TCP and UDP
// from the pod to an "internal" host (10.0.0.0/8) and an "internet" host,
// and prints each decision next to the source the remote host saw.
// Everything is removed on exit, Ctrl-C included. No traffic leaves the
// sandbox: the namespaces have no link to the host.
//
// keepLog, when not empty, is where the flow log is copied on exit, for
// trying nfmasq who on it.
func Run(ctx context.Context, self string, stdout io.Writer, keepLog string) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces and iptables rules in them: run it as root")
	}
	for _, tool := range []string{"ip", "iptables-restore", "ip6tables-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("the demo needs %s (Debian: apt-get install iproute2 iptables): %w", tool, err)
		}
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	top, err := sandbox.Build("demo")
	if err != nil {
		return fmt.Errorf("build sandbox: %w", err)
	}
	defer top.Close()
	dir, err := os.MkdirTemp("", "nfmasq-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	flowLog := filepath.Join(dir, "flows.jsonl")

	fmt.Fprintf(stdout, "sandbox: pod %s -> node %s (forwards, runs the agent) -> remote hosts %s (internal) and %s (internet)\n",
		sandbox.PodAddr4, sandbox.NodeAddr4, sandbox.Internal4, sandbox.Internet4)
	fmt.Fprintf(stdout, "policy: built-in defaults (GKE's non-masquerade ranges; no config file)\n\n")

	agentCtx, stopAgent := context.WithCancel(context.Background())
	defer stopAgent()
	agent := top.Node.Command(agentCtx, self, "agent",
		"--pod-cidr", sandbox.PodCIDR4.String(),
		"--config", filepath.Join(dir, "no-config-file"),
		"--metrics-addr", "127.0.0.1:9741",
		"--flow-log", "file:"+flowLog,
		"--flow-log-node", "demo-node",
		"--flow-log-nat",
	)
	agentOut, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		return err
	}
	defer agentOut.Close()
	agent.Stdout, agent.Stderr = agentOut, agentOut
	agent.Cancel = func() error { return agent.Process.Signal(syscall.SIGTERM) }
	agent.WaitDelay = 10 * time.Second
	if err := agent.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Wait() }()
	defer func() {
		stopAgent()
		<-agentDone
	}()

	readyCtx, cancelReady := context.WithTimeout(ctx, 20*time.Second)
	err = sandbox.WaitHTTP(readyCtx, top.Node.HTTPClient(), "http://127.0.0.1:9741/readyz")
	cancelReady()
	if err != nil {
		log, _ := os.ReadFile(agentOut.Name())
		return fmt.Errorf("agent not ready: %w\n%s", err, log)
	}
	fmt.Fprintln(stdout, "agent ready: rules installed, queue bound")

	const port = 8080
	dsts := []netip.Addr{sandbox.Internal4, sandbox.Internet4}
	sink, err := sandbox.StartSink(top.Remote, dsts, port)
	if err != nil {
		return err
	}
	defer sink.Close()
	for _, dst := range dsts {
		ap := netip.AddrPortFrom(dst, port)
		if _, ok, err := sandbox.SendUDP(top.Pod, ap, []byte("hello over udp"), 3*time.Second); err != nil || !ok {
			return fmt.Errorf("udp to %s: echo=%v: %v", ap, ok, err)
		}
		if _, _, err := sandbox.SendTCP(top.Pod, ap, []byte("hello over tcp"), 3*time.Second); err != nil {
			return fmt.Errorf("tcp to %s: %w", ap, err)
		}
	}
	waitCtx, cancelWait := context.WithTimeout(ctx, 5*time.Second)
	seen, err := sink.WaitFor(waitCtx, func(s []sandbox.Seen) bool { return len(s) >= 4 })
	cancelWait()
	if err != nil {
		return err
	}
	decisions, err := waitRecords(ctx, flowLog, "decision", 4)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, "\ndecisions (from the agent's flow log):")
	for _, d := range decisions {
		prefix := d.Prefix
		if prefix == "" {
			prefix = "no non-masquerade prefix"
		}
		fmt.Fprintf(stdout, "  %-3s %s:%d -> %s:%d  %-11s (%s, %s)\n", d.Proto, d.Src, d.Sport, d.Dst, d.Dport, d.Action, prefix, d.Source)
	}
	fmt.Fprintln(stdout, "\nwhat the remote hosts saw:")
	for _, s := range seen {
		what := "pod address kept"
		if s.Src.Addr() == sandbox.NodeAddr4 {
			what = "node address (masqueraded)"
		}
		fmt.Fprintf(stdout, "  %-3s to %-15s from %-21s %s\n", s.Proto, s.Dst, s.Src, what)
	}
	// End the flows now rather than at conntrack's timeouts, so the flow
	// log's end records (counters, the translated source) show up too.
	if _, err := conntrack.DeleteStale(ctx, top.Node.FD(), func(f conntrack.Flow) bool {
		return sandbox.PodCIDR4.Contains(f.Orig.Src.Addr())
	}, []uint8{6, 17}); err != nil {
		return fmt.Errorf("end the demo flows: %w", err)
	}
	if _, err := waitRecords(ctx, flowLog, "end", 4); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\nflow log records (4 decisions, 2 translations as the masqueraded flows started, then 4 flow ends once conntrack removed the flows):\n")
	raw, _ := os.ReadFile(flowLog)
	stdout.Write(raw)
	if err := who(ctx, stdout, self, flowLog, seen); err != nil {
		return err
	}
	if keepLog != "" {
		if err := os.WriteFile(keepLog, raw, 0o600); err != nil {
			return fmt.Errorf("--flow-log: %w", err)
		}
		fmt.Fprintf(stdout, "\nflow log kept in %s\n", keepLog)
	}
	fmt.Fprintln(stdout, "\nsandbox removed.")
	return nil
}

// who answers the auditor's question for the masqueraded TCP flow: the
// internet host saw the node's address and a port; which pod was it?
func who(ctx context.Context, stdout io.Writer, self, flowLog string, seen []sandbox.Seen) error {
	for _, s := range seen {
		if s.Proto != "tcp" || s.Src.Addr() != sandbox.NodeAddr4 {
			continue
		}
		at := time.Now().UTC().Format(time.RFC3339)
		args := []string{"who", "--translated", s.Src.String(), "--at", at, flowLog}
		fmt.Fprintf(stdout, "\nwhich pod was behind %s at %s, as the internet host saw it?\n  nfmasq %s\n", s.Src, at, strings.Join(args, " "))
		out, err := exec.CommandContext(ctx, self, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("nfmasq who: %w\n%s", err, out)
		}
		fmt.Fprintf(stdout, "  %s", out)
		return nil
	}
	return errors.New("no masqueraded TCP flow seen")
}

// demoDecision is the part of a flow-log decision record the demo prints.
type demoDecision struct {
	Kind   string `json:"kind"`
	Proto  string `json:"proto"`
	Src    string `json:"src"`
	Sport  int    `json:"sport"`
	Dst    string `json:"dst"`
	Dport  int    `json:"dport"`
	Action string `json:"action"`
	Prefix string `json:"prefix"`
	Source string `json:"source"`
}

// waitRecords waits until the flow log holds n records of kind.
func waitRecords(ctx context.Context, path, kind string, n int) ([]demoDecision, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		var out []demoDecision
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var d demoDecision
				if json.Unmarshal(sc.Bytes(), &d) == nil && d.Kind == kind {
					out = append(out, d)
				}
			}
			f.Close()
		}
		if len(out) >= n {
			return out, nil
		}
		select {
		case <-ctx.Done():
			return out, fmt.Errorf("flow log %s has %d %s records, want %d: %w", path, len(out), kind, n, ctx.Err())
		case <-time.After(50 * time.Millisecond): // polling a file under a deadline
		}
	}
}
