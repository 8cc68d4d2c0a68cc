//go:build linux

package queue

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// TestVerdictWritersAllocs sends verdicts, one at a time and in batches, for a queue nobody bound, on a
// socket in a namespace of its own: the kernel answers each with an error
// message nobody reads, and the send path must not allocate.
func TestVerdictWritersAllocs(t *testing.T) {
	netnstest.Require(t)
	ns := netnstest.New(t, "verdict")
	fd, err := openNetlink(ns.FD())
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	v := newRawVerdicter(fd, 4242)
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

	w := newRawWriter(fd)
	vb := verdictBatch{num: 4242, buf: make([]byte, 0, maxBatch*verdictLen), write: w.write}
	allocs = testing.AllocsPerRun(100, func() {
		for range maxBatch {
			id++
			vb.add(id, 0x1000, id%2 == 0, false)
		}
		if err := vb.flush(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("a batch of %d verdicts allocated %v times", maxBatch, allocs)
	}
}
