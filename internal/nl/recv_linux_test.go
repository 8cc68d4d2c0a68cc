package nl

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// datagramPair returns a connected pair of datagram sockets: the reader
// in the runtime's poller, as a netlink.Conn's socket is.
func datagramPair(t *testing.T) (reader *os.File, writer int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	reader = os.NewFile(uintptr(fds[0]), "reader")
	t.Cleanup(func() {
		reader.Close()
		unix.Close(fds[1])
	})
	return reader, fds[1]
}

func TestReceiverBatches(t *testing.T) {
	f, w := datagramPair(t)
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	r := NewReceiver(rc, 4, 8)

	if n, err := r.Read(false); n != 0 || err != nil {
		t.Fatalf("empty socket: Read = %d, %v", n, err)
	}
	sent := [][]byte{[]byte("one"), []byte("two"), []byte("three"), []byte("four"), []byte("fifth long one")}
	for _, d := range sent {
		if _, err := unix.Write(w, d); err != nil {
			t.Fatal(err)
		}
	}
	n, err := r.Read(true)
	if err != nil || n != 4 {
		t.Fatalf("Read = %d, %v; want the 4 slots filled", n, err)
	}
	for i := range n {
		if !bytes.Equal(r.Datagram(i), sent[i]) || r.Truncated(i) {
			t.Errorf("datagram %d = %q (truncated %v), want %q", i, r.Datagram(i), r.Truncated(i), sent[i])
		}
	}
	if n, err = r.Read(false); err != nil || n != 1 {
		t.Fatalf("second Read = %d, %v", n, err)
	}
	if got := r.Datagram(0); string(got) != "fifth lo" || !r.Truncated(0) {
		t.Errorf("long datagram = %q (truncated %v), want its first 8 bytes, truncated", got, r.Truncated(0))
	}

	allocs := testing.AllocsPerRun(100, func() {
		if _, err := unix.Write(w, sent[0]); err != nil {
			t.Fatal(err)
		}
		if n, err := r.Read(true); n != 1 || err != nil {
			t.Fatalf("Read = %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("Read allocated %v times", allocs)
	}

	f.Close()
	if _, err := r.Read(true); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Read on a closed socket = %v, want a closed error", err)
	}
}
