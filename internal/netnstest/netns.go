package netnstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// E2E reports whether kernel tests are required (NFMASQ_E2E=1): then a
// missing privilege or tool fails the test instead of skipping it.
func E2E() bool { return os.Getenv("NFMASQ_E2E") == "1" }

// Require skips t unless it runs as root with the named tools on PATH
// (`ip` is always required). With NFMASQ_E2E=1 it fails instead.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := "kernel test needs " + strings.Join(missing, ", ")
	if E2E() {
		t.Fatal(msg + " (NFMASQ_E2E=1: required)")
	}
	t.Skip(msg)
}

var seq atomic.Int64

// NS is a named network namespace created by New.
type NS struct {
	// Name is the name under /run/netns, usable with `ip netns exec`.
	Name string
	fd   int
}

// Create makes a namespace without a testing.TB (for the demo). The caller
// must call Close.
func Create(prefix string) (*NS, error) {
	name := fmt.Sprintf("nfm-%s-%d-%d", prefix, os.Getpid(), seq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, bytes.TrimSpace(out))
	}
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = exec.Command("ip", "netns", "del", name).Run()
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	n := &NS{Name: name, fd: fd}
	// Loopback up: local sockets and conntrack helpers expect it.
	if _, err := n.Try("ip", "link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, err
	}
	// No duplicate address detection: addresses (link-local ones too) are
	// usable the moment a link is up, so tests never wait for DAD.
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := n.Sysctl(key, "0"); err != nil {
			n.Close()
			return nil, fmt.Errorf("sysctl %s in %s: %w", key, name, err)
		}
	}
	return n, nil
}

// New creates a namespace removed when t ends.
func New(t testing.TB, prefix string) *NS {
	t.Helper()
	n, err := Create(prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

// Close deletes the namespace. Processes still inside keep it alive until
// they exit, but it is no longer reachable by name.
func (n *NS) Close() {
	if n.fd > 0 {
		unix.Close(n.fd)
		n.fd = -1
	}
	_ = exec.Command("ip", "netns", "del", n.Name).Run()
}

// FD returns an open file descriptor of the namespace, for APIs that take
// one (netlink.Config.NetNS). It stays valid until Close.
func (n *NS) FD() int { return n.fd }

// Command returns a command that runs inside the namespace.
func (n *NS) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Try runs a command inside the namespace and returns its combined output.
func (n *NS) Try(args ...string) (string, error) {
	out, err := n.Command(context.Background(), args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s (in %s): %w: %s", strings.Join(args, " "), n.Name, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// Run is Try that fails t on error.
func (n *NS) Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Try(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Do runs fn on an OS thread switched into the namespace. Sockets and
// netlink connections opened by fn belong to the namespace for their whole
// life, whichever goroutine uses them later. The thread is never returned
// to the scheduler: the goroutine exits locked, so the runtime discards it.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare fs: %w", err)
			return
		}
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Sysctl writes a sysctl inside the namespace (key in dotted form).
func (n *NS) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error {
		// /proc/sys/net reflects the namespace of the thread that opens it.
		return os.WriteFile(path, []byte(value), 0o644)
	})
}

// Veth joins a and b with a veth pair named aName (in a) and bName (in b),
// brings both ends up and assigns the addresses (CIDR notation). IPv6
// addresses skip duplicate address detection so they are usable at once.
func Veth(a *NS, aName string, aAddrs []string, b *NS, bName string, bAddrs []string) error {
	if _, err := a.Try("ip", "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name); err != nil {
		return err
	}
	for _, side := range []struct {
		ns    *NS
		name  string
		addrs []string
	}{{a, aName, aAddrs}, {b, bName, bAddrs}} {
		for _, addr := range side.addrs {
			args := []string{"ip", "addr", "add", addr, "dev", side.name}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad")
			}
			if _, err := side.ns.Try(args...); err != nil {
				return err
			}
		}
		if _, err := side.ns.Try("ip", "link", "set", side.name, "up"); err != nil {
			return err
		}
	}
	return nil
}

// MustVeth is Veth that fails t on error.
func MustVeth(t testing.TB, a *NS, aName string, aAddrs []string, b *NS, bName string, bAddrs []string) {
	t.Helper()
	if err := Veth(a, aName, aAddrs, b, bName, bAddrs); err != nil {
		t.Fatal(err)
	}
}

// ErrNotRoot is returned by Create-style helpers used outside tests.
var ErrNotRoot = errors.New("network namespaces need root")
