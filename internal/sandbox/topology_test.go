package sandbox_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netnstest"
	"github.com/nfmasq/nfmasq/internal/sandbox"
)

// The topology forwards both families end to end with no NAT: the remote
// sees the pod address.
func TestTopologyForwards(t *testing.T) {
	netnstest.Require(t)
	top := netnstest.NewTopology(t)
	sink, err := sandbox.StartSink(top.Remote, []netip.Addr{sandbox.Internet4, sandbox.Internet6}, 9000)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	for _, dst := range []netip.Addr{sandbox.Internet4, sandbox.Internet6} {
		if _, ok, err := sandbox.SendUDP(top.Pod, netip.AddrPortFrom(dst, 9000), []byte("hi"), 2*time.Second); err != nil || !ok {
			t.Fatalf("udp to %s: echo=%v err=%v", dst, ok, err)
		}
		if _, _, err := sandbox.SendTCP(top.Pod, netip.AddrPortFrom(dst, 9000), []byte("hello"), 2*time.Second); err != nil {
			t.Fatalf("tcp to %s: %v", dst, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	seen, err := sink.WaitFor(ctx, func(s []sandbox.Seen) bool { return len(s) == 4 })
	if err != nil {
		t.Fatal(err, seen)
	}
	for _, s := range seen {
		want := sandbox.PodAddr4
		if s.Dst.Addr().Is6() {
			want = sandbox.PodAddr6
		}
		if s.Src.Addr() != want {
			t.Errorf("%s to %s arrived from %s, want the pod address %s", s.Proto, s.Dst, s.Src, want)
		}
	}
}
