//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"

	"github.com/nfmasq/nfmasq/internal/rules"
	"github.com/nfmasq/nfmasq/internal/sandbox"
	"github.com/nfmasq/nfmasq/queue"
)

// Ports the remote serves on the test destination.
const (
	bulkPort    = 5201
	connectPort = 5202
)

// bench is one run's topology and instruments. Its methods run on one
// goroutine; the goroutines it starts (servers, the arrival clock) are
// its own and stop with Close.
type bench struct {
	opts      options
	top       *sandbox.Topology
	backend   rules.Backend
	installer *rules.Installer
	ct        *conntrack.Conn // in the node
	sender    *flowSender
	bulk      *bulkServer
	accept    net.Listener
	http      *http.Client // in the node, for the agent's endpoints
	progress  io.Writer
	lastRate  map[rateKey]float64 // offered rate of the last passing search
}

// rateKey names a search result: a dataplane at a CIDR count, or (cidrs
// 0) the dataplane's latest at any count.
type rateKey struct {
	dataplane string
	cidrs     int
}

func newBench(ctx context.Context, opts options, progress io.Writer) (_ *bench, err error) {
	top, err := sandbox.Build("live")
	if err != nil {
		return nil, fmt.Errorf("build the namespaces: %w", err)
	}
	b := &bench{opts: opts, top: top, progress: progress, lastRate: map[rateKey]float64{}, http: top.Node.HTTPClient()}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	det, err := rules.ResolveBackend(ctx, rules.NetNSRunner{Name: top.Node.Name}, opts.backend)
	if err != nil {
		return nil, err
	}
	b.backend = det.Backend
	b.installer = &rules.Installer{Runner: rules.NetNSRunner{Name: top.Node.Name}, Backend: det.Backend}

	// The remote drops the test flows in raw PREROUTING (no conntrack, no
	// ICMP unreachable sent back through the node) and counts them by the
	// source they arrive with.
	for _, src := range []string{sandbox.NodeAddr4.String() + "/32", sandbox.PodCIDR4.String(), "0.0.0.0/0"} {
		if _, err := top.Remote.Try("iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-s", src, "-d", opts.dst.String()+"/32",
			"-p", "udp", "-j", "DROP"); err != nil {
			return nil, err
		}
	}
	if b.ct, err = conntrack.Dial(&netlink.Config{NetNS: top.Node.FD()}); err != nil {
		return nil, fmt.Errorf("conntrack in the node: %w", err)
	}
	if b.sender, err = newFlowSender(top, opts.dst); err != nil {
		return nil, err
	}
	if b.bulk, err = startBulkServer(top.Remote, netip.AddrPortFrom(opts.dst, bulkPort)); err != nil {
		return nil, err
	}
	if b.accept, err = startAcceptServer(top.Remote, netip.AddrPortFrom(opts.dst, connectPort)); err != nil {
		return nil, err
	}
	return b, nil
}

// Close stops the servers and removes the namespaces.
func (b *bench) Close() {
	if b.accept != nil {
		b.accept.Close()
	}
	if b.bulk != nil {
		b.bulk.Close()
	}
	if b.sender != nil {
		b.sender.Close()
	}
	if b.ct != nil {
		b.ct.Close()
	}
	b.top.Close()
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.progress, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// counters is a snapshot of everything a trial compares before and after.
type counters struct {
	masq, pod, all      uint64 // arrivals at the remote, by source
	fallback            uint64
	queueDrop, userDrop uint64
	skipped, agentUndec float64
	decisions, flowDrop float64 // flow-log decision records written; records dropped
}

// snapshot reads the counters. agent says whether the agent's rules and
// metrics exist.
func (b *bench) snapshot(ctx context.Context, agent bool) (counters, error) {
	var c counters
	save, err := b.top.Remote.Try("iptables-save", "-c", "-t", "raw")
	if err != nil {
		return c, err
	}
	rs := ruleCounters(save, "PREROUTING")
	c.masq = counterOf(rs, "-s "+sandbox.NodeAddr4.String()+"/32")
	c.pod = counterOf(rs, "-s "+sandbox.PodCIDR4.String())
	c.all = counterOf(rs, "-j DROP")
	if !agent {
		return c, nil
	}
	nat, err := b.top.Node.Try(b.tool("save"), "-c", "-t", "nat")
	if err != nil {
		return c, err
	}
	c.fallback = counterOf(ruleCounters(nat, rules.ChainFallback), "CONNMARK")
	for _, q := range b.procQueues() {
		c.queueDrop += uint64(q.QueueDropped)
		c.userDrop += uint64(q.UserDropped)
	}
	m, err := b.scrape(ctx)
	if err != nil {
		return c, err
	}
	c.skipped, _ = metricSum(m, "nfmasq_queue_skipped_total")
	c.agentUndec, _ = metricSum(m, "nfmasq_undecided_total")
	c.decisions, _ = metricSum(m, "nfmasq_flowlog_records_total", `kind="decision"`)
	c.flowDrop, _ = metricSum(m, "nfmasq_flowlog_dropped_total")
	return c, nil
}

// tool names an iptables binary of the run's backend.
func (b *bench) tool(kind string) string {
	if b.backend == "" {
		return "iptables-" + kind
	}
	return "iptables-" + string(b.backend) + "-" + kind
}

// procQueues reads the kernel's queue counters in the node; none when no
// queue is bound.
func (b *bench) procQueues() []queue.ProcStats {
	stats, _ := queue.ProcStatsIn(b.top.Node.FD())
	return stats
}

// scrape fetches the agent's /metrics.
func (b *bench) scrape(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+metricsAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := b.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape the agent: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape the agent: %s", resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// flushConntrack empties the node's conntrack table, so every trial starts
// with new flows only and the table (nf_conntrack_max is global) never
// fills. With the agent running it then waits for the agent to finish
// writing the end records of the flushed flows, so that work does not
// land in the next measurement.
func (b *bench) flushConntrack(ctx context.Context, agent bool) error {
	if err := b.ct.Flush(); err != nil {
		return fmt.Errorf("flush conntrack in the node: %w", err)
	}
	if !agent {
		return nil
	}
	deadline := time.Now().Add(15 * time.Second)
	last := -1.0
	for time.Now().Before(deadline) {
		m, err := b.scrape(ctx)
		if err != nil {
			return err
		}
		n, _ := metricSum(m, "nfmasq_flowlog_records_total")
		if n == last {
			return nil
		}
		last = n
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(150 * time.Millisecond): // polling a counter for quiet
		}
	}
	b.logf("warning: the agent was still writing flow records 15s after a conntrack flush")
	return nil
}

// countFallbackEntries counts the node's conntrack entries whose connmark
// says the kernel fallback decided them. The kernel filters the dump.
func (b *bench) countFallbackEntries() (uint64, error) {
	m := b.opts.marks
	flows, err := b.ct.DumpFilter(conntrack.NewFilter().Family(netfilter.ProtoIPv4).Mark(m.Fallback).MarkMask(m.Mask), nil)
	if err != nil {
		return 0, fmt.Errorf("dump fallback-marked conntrack entries: %w", err)
	}
	return uint64(len(flows)), nil
}

// arrivalClock follows the remote's received-packet counter, to time the
// last arrival of a trial without touching the packets.
type arrivalClock struct {
	mu         sync.Mutex
	lastChange time.Time
	count      uint64
	stop       chan struct{}
	done       chan error
}

func (b *bench) startClock() *arrivalClock {
	c := &arrivalClock{stop: make(chan struct{}), done: make(chan error, 1), lastChange: time.Now()}
	go func() {
		c.done <- b.top.Remote.Do(func() error {
			t := time.NewTicker(time.Millisecond)
			defer t.Stop()
			buf := make([]byte, 8192)
			for {
				n, err := readFileInto("/proc/thread-self/net/dev", buf)
				if err != nil {
					return err
				}
				if rx, ok := devRxPackets(string(buf[:n]), "eth0"); ok {
					c.mu.Lock()
					if rx != c.count {
						c.count, c.lastChange = rx, time.Now()
					}
					c.mu.Unlock()
				}
				select {
				case <-c.stop:
					return nil
				case <-t.C:
				}
			}
		})
	}()
	return c
}

func readFileInto(path string, buf []byte) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := io.ReadFull(f, buf)
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

// waitQuiet waits until nothing arrived for quiet, at most until deadline,
// and returns the time of the last arrival.
func (c *arrivalClock) waitQuiet(ctx context.Context, quiet time.Duration, deadline time.Time) (time.Time, error) {
	for {
		c.mu.Lock()
		last := c.lastChange
		c.mu.Unlock()
		now := time.Now()
		if now.Sub(last) >= quiet || now.After(deadline) {
			return last, nil
		}
		select {
		case <-ctx.Done():
			return last, ctx.Err()
		case <-time.After(quiet / 4): // polling the clock's state
		}
	}
}

func (c *arrivalClock) Close() error {
	close(c.stop)
	err := <-c.done
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("arrival clock: %w", err)
	}
	return err
}

// kernelPrefixes is the list the kernel rules match for the policy.
func kernelConfig(nonMasq []netip.Prefix, threshold int) rules.Config {
	cfg := rules.DefaultConfig()
	cfg.PodCIDRs = []netip.Prefix{sandbox.PodCIDR4}
	cfg.NonMasquerade4 = nonMasq
	cfg.QueueEnabled = false
	cfg.IPSetThreshold = threshold
	return cfg
}

func hostCPU() string {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}
