//go:build linux

package queue

import (
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/queue/netnstest"
)

// TestRawVerdicterAllocs sends verdicts for a queue nobody bound, on a
// socket in a namespace of its own: the kernel answers each with an error
// message nobody reads, and the send path must not allocate.
func TestRawVerdicterAllocs(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "verdict")
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: ns.FD()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := newRawVerdicter(c, 4242)
	if err != nil {
		t.Fatal(err)
	}
	id := uint32(0)
	allocs := testing.AllocsPerRun(100, func() {
		id++
		if err := v.verdict(id, 0x1000, id%2 == 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("verdict allocated %v times per call", allocs)
	}
}
