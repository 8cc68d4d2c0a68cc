//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// metricsAddr is where the agent serves /metrics inside the node.
const metricsAddr = "127.0.0.1:9741"

// running is one dataplane in place in the node.
type running struct {
	name  string
	agent *agentProc // nil for the kernel-only dataplanes
}

// agentProc is one `nfmasq agent` in the node namespace.
type agentProc struct {
	cmd     *exec.Cmd
	done    chan struct{}
	logPath string
}

// start puts a dataplane in place for the config file at cfgPath (whose
// compiled non-masquerade list is nonMasq) and returns once it decides
// flows: for the agent, when /readyz answers; for the kernel-only ones,
// when the rules are installed.
func (b *bench) start(ctx context.Context, name, cfgPath string, nonMasq []netip.Prefix) (*running, error) {
	switch name {
	case Chain, IPSet:
		threshold := 0 // always the ipset
		if name == Chain {
			threshold = len(nonMasq) + 1 // never the ipset: one rule per prefix
		}
		if err := b.installer.Install(ctx, kernelConfig(nonMasq, threshold)); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return &running{name: name}, nil
	case Agent:
		a, err := b.startAgent(ctx, cfgPath, nil)
		if err != nil {
			return nil, err
		}
		return &running{name: name, agent: a}, nil
	}
	return nil, fmt.Errorf("unknown dataplane %q", name)
}

// stop removes the dataplane: the agent is stopped (it leaves its
// fallback rules, as on a node) and every rule and set nfmasq made is
// uninstalled, so the next dataplane starts from a bare node.
func (b *bench) stop(ctx context.Context, r *running) error {
	var errs []error
	if r.agent != nil {
		errs = append(errs, r.agent.stop())
	}
	if err := b.installer.Uninstall(ctx); err != nil {
		errs = append(errs, fmt.Errorf("uninstall after %s: %w", r.name, err))
	}
	return errors.Join(errs...)
}

var agentSeq int

// startAgent starts `nfmasq agent` in the node with the benchmark's agent
// flags, then extra.
func (b *bench) startAgent(ctx context.Context, cfgPath string, extra []string) (*agentProc, error) {
	agentSeq++
	dir := filepath.Join(b.opts.tmp, fmt.Sprintf("agent-%d", agentSeq))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	args := []string{b.opts.agentBin, "agent",
		"--pod-cidr", sandbox.PodCIDR4.String(),
		"--config", cfgPath,
		"--metrics-addr", metricsAddr,
		"--flow-log", "file:" + filepath.Join(dir, "flows.log"),
		"--flow-log-node", "bench",
		"--iptables-backend", backendFlag(b.backend),
	}
	args = append(args, b.opts.agentArgs...)
	args = append(args, extra...)
	logPath := filepath.Join(dir, "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	cmd := b.top.Node.Command(context.Background(), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if b.opts.pdeathsig {
		// The agent dies with the benchmark, even on SIGKILL. main pins
		// its goroutine to the thread that starts agents, because the
		// signal follows the thread, not the process.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the agent: %w", err)
	}
	a := &agentProc{cmd: cmd, done: make(chan struct{}), logPath: logPath}
	go func() { _ = cmd.Wait(); close(a.done) }()

	readyCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-a.done:
			cancel()
		case <-readyCtx.Done():
		}
	}()
	if err := sandbox.WaitHTTP(readyCtx, b.http, "http://"+metricsAddr+"/readyz"); err != nil {
		a.stop()
		return nil, fmt.Errorf("agent not ready: %w\n%s", err, a.tail(20))
	}
	return a, nil
}

func backendFlag(b rules.Backend) string {
	if b == "" {
		return "auto"
	}
	return string(b)
}

// stop sends SIGTERM and waits for the exit (killing it after 20 s).
func (a *agentProc) stop() error {
	select {
	case <-a.done:
		return nil
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
		return nil
	case <-time.After(20 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
		return fmt.Errorf("agent did not stop within 20s of SIGTERM\n%s", a.tail(20))
	}
}

// tail returns the last n lines of the agent's log.
func (a *agentProc) tail(n int) string {
	data, _ := os.ReadFile(a.logPath)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
