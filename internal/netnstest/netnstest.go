// Package netnstest holds what kernel tests share and the binary must
// not link: the root check that skips a test (or fails it under
// NFMASQ_E2E=1), namespaces and sandboxes removed when a test ends,
// polling under a deadline, and packet crafting.
package netnstest

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/sandbox"
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

// New creates a namespace removed when t ends.
func New(t testing.TB, prefix string) *netns.NS {
	t.Helper()
	n, err := netns.Create(prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

// Run runs a command inside n and fails t on error.
func Run(t testing.TB, n *netns.NS, args ...string) string {
	t.Helper()
	out, err := n.Try(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// MustVeth is netns.Veth that fails t on error.
func MustVeth(t testing.TB, a *netns.NS, aName string, aAddrs []string, b *netns.NS, bName string, bAddrs []string) {
	t.Helper()
	if err := netns.Veth(a, aName, aAddrs, b, bName, bAddrs); err != nil {
		t.Fatal(err)
	}
}

// NewTopology builds the sandbox for t and removes it when t ends.
func NewTopology(t testing.TB) *sandbox.Topology {
	t.Helper()
	top, err := sandbox.Build("t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(top.Close)
	return top
}
