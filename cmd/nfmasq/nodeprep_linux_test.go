package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

var accountingSysctls = []string{
	"net.netfilter.nf_conntrack_acct",
	"net.netfilter.nf_conntrack_timestamp",
	"net.netfilter.nf_conntrack_events",
}

// readSysctls returns the accounting sysctls as the calling thread's
// network namespace sees them.
func readSysctls() (map[string]string, error) {
	out := map[string]string{}
	for _, key := range accountingSysctls {
		b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(key, ".", "/"))
		if err != nil {
			return nil, err
		}
		out[key] = string(bytes.TrimSpace(b))
	}
	return out, nil
}

// readOnlyProcSys gives the calling thread a mount namespace of its own in
// which /proc/sys is read-only, as a container runtime mounts it for a
// container that is not privileged. The thread must not share its
// filesystem attributes (NS.Do unshares them) and is discarded after.
func readOnlyProcSys() error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount("/proc/sys", "/proc/sys", "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind /proc/sys: %w", err)
	}
	if err := unix.Mount("", "/proc/sys", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("remount /proc/sys read-only: %w", err)
	}
	return nil
}

// TestNodePrepSetsSysctls runs `nfmasq node-prep` inside a fresh network
// namespace whose accounting sysctls are 0, as the DaemonSet's privileged
// init container runs it in the node's: it sets them to 1, says which, and
// leaves every other namespace alone. With /proc/sys read-only, as in the
// agent's own unprivileged container, it fails and says why.
func TestNodePrepSetsSysctls(t *testing.T) {
	netnstest.Require(t)
	host, err := readSysctls()
	if err != nil {
		t.Fatalf("host sysctls (is nf_conntrack loaded?): %v", err)
	}
	tests := []struct {
		name       string
		readOnly   bool
		wantCode   int
		wantStdout string
		wantStderr string
		want       string // every sysctl's value afterwards
	}{
		{
			name:       "privileged",
			wantStdout: "nfmasq node-prep: set to 1: " + strings.Join(accountingSysctls, " ") + "\n",
			want:       "1",
		},
		{
			name:       "read-only /proc/sys",
			readOnly:   true,
			wantCode:   exitFailure,
			wantStderr: "nfmasq: node-prep: write sysctl: open /proc/sys/net/netfilter/nf_conntrack_acct: read-only file system\n",
			want:       "0",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := netnstest.New(t, "nodeprep")
			for _, key := range accountingSysctls {
				if err := ns.Sysctl(key, "0"); err != nil {
					t.Fatal(err)
				}
			}
			var stdout, stderr bytes.Buffer
			var code int
			var after map[string]string
			err := ns.Do(func() error {
				if tt.readOnly {
					if err := readOnlyProcSys(); err != nil {
						return err
					}
				}
				// In-process, on this thread: /proc/sys/net shows the
				// namespace of the thread that opens it.
				code = run([]string{"node-prep"}, &stdout, &stderr)
				var err error
				after, err = readSysctls()
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode || stdout.String() != tt.wantStdout || stderr.String() != tt.wantStderr {
				t.Errorf("exit %d, stdout %q, stderr %q\nwant exit %d, stdout %q, stderr %q",
					code, stdout.String(), stderr.String(), tt.wantCode, tt.wantStdout, tt.wantStderr)
			}
			for _, key := range accountingSysctls {
				if after[key] != tt.want {
					t.Errorf("%s = %s in the namespace, want %s", key, after[key], tt.want)
				}
			}

			if tt.readOnly {
				return
			}
			// A second run, as after a pod restart, finds nothing to do.
			stdout.Reset()
			stderr.Reset()
			if err := ns.Do(func() error {
				code = run([]string{"node-prep"}, &stdout, &stderr)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if want := "nfmasq node-prep: conntrack accounting, timestamps and events were already on\n"; code != 0 || stdout.String() != want {
				t.Errorf("second run: exit %d, stdout %q, stderr %q; want %q", code, stdout.String(), stderr.String(), want)
			}
		})
	}
	if now, err := readSysctls(); err != nil || fmt.Sprint(now) != fmt.Sprint(host) {
		t.Errorf("the test's own namespace changed: %v before, %v after (%v)", host, now, err)
	}
}
