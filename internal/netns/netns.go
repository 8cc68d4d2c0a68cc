// Package netns creates named network namespaces and runs code inside
// them. It is the one place nfmasq enters a namespace: the queue binds
// its sockets there, conntrack writes its sysctls there, the demo's
// sandbox and the kernel tests build their hosts there.
//
// Namespaces are made with iproute2 (`ip netns add`, arguments only,
// never a shell) and named nfm-<prefix>-<pid>-<n>, so parallel runs and
// leftovers of a killed run cannot collide.
//
// Do switches a dedicated OS thread and never hands it back to the Go
// scheduler, so no goroutine ever runs in the wrong namespace. An NS is
// safe for concurrent use.
package netns

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Do runs fn in the network namespace open as fd. With fd 0 fn runs in
// the caller's namespace, on the caller's thread locked for fn's
// duration. Otherwise fn runs on a new OS thread switched into the
// namespace; that thread exits with fn's goroutine instead of returning to
// the scheduler. Sockets and /proc/net or /proc/sys/net files opened by fn
// belong to the namespace for their whole life, whichever goroutine uses
// them later.
func Do(fd int, fn func() error) error {
	if fd == 0 {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

var seq atomic.Int64

// NS is a named network namespace made by Create or opened by Open.
type NS struct {
	// Name is the name under /run/netns, usable with `ip netns exec`.
	Name string
	fd   int
	// opened: Close releases the namespace but does not delete it.
	opened bool
}

// Open opens the existing namespace /run/netns/name, which the caller
// did not make: Close releases it and leaves it in place.
func Open(name string) (*NS, error) {
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	return &NS{Name: name, fd: fd, opened: true}, nil
}

// Create makes a namespace with loopback up and IPv6 duplicate address
// detection off (addresses are usable the moment a link is up). The
// caller must call Close.
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
	if _, err := n.Try("ip", "link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, err
	}
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := n.Sysctl(key, "0"); err != nil {
			n.Close()
			return nil, fmt.Errorf("sysctl %s in %s: %w", key, name, err)
		}
	}
	return n, nil
}

// Close deletes a namespace Create made (processes still inside keep it
// alive until they exit, but it is no longer reachable by name) and
// releases one Open opened.
func (n *NS) Close() {
	if n.fd > 0 {
		unix.Close(n.fd)
		n.fd = -1
	}
	if !n.opened {
		_ = exec.Command("ip", "netns", "del", n.Name).Run()
	}
}

// FD returns an open file descriptor of the namespace, for APIs that take
// one (queue.Config.NetNS, conntrack.Config.NetNS). It stays valid until
// Close.
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

// Do runs fn on an OS thread inside the namespace (see the function Do).
func (n *NS) Do(fn func() error) error { return Do(n.fd, fn) }

// Sysctl writes a sysctl inside the namespace (key in dotted form).
func (n *NS) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error { return os.WriteFile(path, []byte(value), 0o644) })
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
