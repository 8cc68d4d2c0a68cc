package main

import (
	"fmt"
	"io/fs"
	"strings"
	"syscall"
	"testing"
)

// TestNodePrepOutcomes covers what node-prep says and how it exits for
// each thing EnableAccounting can report, including those this machine's
// kernel cannot produce (conntrack built in, /proc/sys writable as root).
func TestNodePrepOutcomes(t *testing.T) {
	all := []string{"net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp", "net.netfilter.nf_conntrack_events"}
	notLoaded := &fs.PathError{Op: "open", Path: "/proc/sys/net/netfilter/nf_conntrack_acct", Err: syscall.ENOENT}
	readOnly := &fs.PathError{Op: "open", Path: "/proc/sys/net/netfilter/nf_conntrack_acct", Err: syscall.EROFS}
	tests := []struct {
		name       string
		changed    []string
		err        error
		wantCode   int
		wantStdout string
		wantStderr string // substring; "" means stderr must be empty
	}{
		{
			name: "all three set", changed: all,
			wantStdout: "nfmasq node-prep: set to 1: net.netfilter.nf_conntrack_acct net.netfilter.nf_conntrack_timestamp net.netfilter.nf_conntrack_events\n",
		},
		{
			name:       "already on",
			wantStdout: "nfmasq node-prep: conntrack accounting, timestamps and events were already on\n",
		},
		{
			name: "conntrack not loaded: a warning", err: fmt.Errorf("read sysctl: %w", notLoaded),
			wantStderr: "nfmasq node-prep: warning: read sysctl: open /proc/sys/net/netfilter/nf_conntrack_acct: no such file or directory: conntrack is not loaded",
		},
		{
			name: "one set before a missing one", changed: all[:1], err: fmt.Errorf("read sysctl: %w", notLoaded),
			wantStdout: "nfmasq node-prep: set to 1: net.netfilter.nf_conntrack_acct\n",
			wantStderr: "warning:",
		},
		{
			name: "read-only /proc/sys: a failure", err: fmt.Errorf("write sysctl: %w", readOnly), wantCode: exitFailure,
			wantStderr: "nfmasq: node-prep: write sysctl: open /proc/sys/net/netfilter/nf_conntrack_acct: read-only file system\n",
		},
	}
	saved := enableAccounting
	t.Cleanup(func() { enableAccounting = saved })
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enableAccounting = func() ([]string, error) { return tt.changed, tt.err }
			stdout, stderr, code := nfmasq(t, "node-prep")
			if code != tt.wantCode || stdout != tt.wantStdout {
				t.Errorf("exit %d, stdout %q; want exit %d, stdout %q", code, stdout, tt.wantCode, tt.wantStdout)
			}
			if tt.wantStderr == "" && stderr != "" || !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr %q, want %q", stderr, tt.wantStderr)
			}
		})
	}
}

func TestNodePrepUsage(t *testing.T) {
	_, stderr, code := nfmasq(t, "node-prep", "extra")
	if code != exitConfig || !strings.Contains(stderr, `unknown command "extra" for "nfmasq node-prep"`) {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}
