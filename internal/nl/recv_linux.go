package nl

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Receiver reads up to one datagram per slot in a single system call
// (recvmmsg) into fixed buffers: reading one message per call into fresh
// memory, as mdlayher/netlink does, costs a system call and several
// allocations per message.
type Receiver struct {
	rc   syscall.RawConn // nil for a blocking socket read directly
	fd   int
	msgs []unix.Mmsghdr
	iovs []unix.Iovec
	bufs [][]byte
	// Results of the last system call, and the callbacks that make it
	// (cached, so that a read does not allocate).
	n        int
	errno    syscall.Errno
	readNow  func(fd uintptr) bool
	readWait func(fd uintptr) bool
}

// NewReceiver reads rc (a non-blocking socket in the runtime's poller)
// into slots buffers of slotSize bytes each. A datagram longer than
// slotSize is cut short (Truncated).
func NewReceiver(rc syscall.RawConn, slots, slotSize int) *Receiver {
	r := &Receiver{
		rc:   rc,
		msgs: make([]unix.Mmsghdr, slots),
		iovs: make([]unix.Iovec, slots),
		bufs: make([][]byte, slots),
	}
	mem := make([]byte, slots*slotSize)
	for i := range slots {
		r.bufs[i] = mem[i*slotSize : (i+1)*slotSize : (i+1)*slotSize]
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(slotSize)
		r.msgs[i].Hdr.Iov = &r.iovs[i]
		r.msgs[i].Hdr.SetIovlen(1)
	}
	r.readNow = func(fd uintptr) bool {
		r.recvmmsg(fd)
		return true
	}
	r.readWait = func(fd uintptr) bool {
		r.recvmmsg(fd)
		return r.errno != unix.EAGAIN
	}
	return r
}

// NewBlockingReceiver reads fd, a blocking socket outside the runtime's
// poller, into slots buffers of slotSize bytes each. A waiting Read sleeps
// in the kernel until a datagram arrives or the socket's receive timeout
// (SO_RCVTIMEO) passes. The caller closes fd, after its last Read.
//
// A socket in the runtime's poller has an epoll entry on its wait queue,
// so every message the kernel queues on it runs epoll's callback, and
// wakes the poller's thread if it sleeps, whether or not anyone waits for
// this socket: on NFQUEUE that cost lands in the sending pod's own system
// call, once per new flow. A blocking socket wakes only a reader that
// sleeps on it.
func NewBlockingReceiver(fd, slots, slotSize int) *Receiver {
	r := NewReceiver(nil, slots, slotSize)
	r.fd = fd
	return r
}

func (r *Receiver) recvmmsg(fd uintptr) {
	r.recvmmsgFlags(fd, unix.MSG_DONTWAIT)
}

func (r *Receiver) recvmmsgFlags(fd uintptr, flags int) {
	var n uintptr
	var errno syscall.Errno
	if flags&unix.MSG_DONTWAIT != 0 {
		// A read that cannot sleep keeps the goroutine's P, as the
		// verdict writes do (queue's rawWrite says why): through
		// Syscall, the scheduler's monitor may hand the P of a long
		// call (64 datagrams) to another thread.
		n, _, errno = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.msgs[0])), uintptr(len(r.msgs)), uintptr(flags), 0, 0)
	} else {
		n, _, errno = unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.msgs[0])), uintptr(len(r.msgs)), uintptr(flags), 0, 0)
	}
	r.n, r.errno = int(n), errno
}

// Read reads what is waiting, up to one datagram per slot. Without wait
// it returns 0 when nothing is; with wait it sleeps in the runtime's
// poller until something is. A closed socket is an error that matches
// os.ErrClosed; a socket error (ENOBUFS: messages lost) is returned as
// the syscall.Errno.
func (r *Receiver) Read(wait bool) (int, error) {
	if r.rc == nil {
		return r.readBlocking(wait)
	}
	fn := r.readNow
	if wait {
		fn = r.readWait
	}
	for {
		if err := r.rc.Read(fn); err != nil {
			// The runtime reports a closed descriptor with an error
			// of its own (internal/poll's ErrFileClosing).
			return 0, fmt.Errorf("%w: %w", os.ErrClosed, err)
		}
		switch r.errno {
		case 0:
			return r.n, nil
		case unix.EINTR:
		case unix.EAGAIN:
			return 0, nil
		default:
			return 0, r.errno
		}
	}
}

func (r *Receiver) readBlocking(wait bool) (int, error) {
	flags := unix.MSG_DONTWAIT
	if wait {
		// Sleep until one datagram is there, then take what else is.
		flags = unix.MSG_WAITFORONE
	}
	for {
		r.recvmmsgFlags(uintptr(r.fd), flags)
		switch r.errno {
		case 0:
			return r.n, nil
		case unix.EINTR:
		case unix.EAGAIN: // nothing waiting, or the receive timeout passed
			return 0, nil
		case unix.EBADF:
			return 0, fmt.Errorf("%w: %w", os.ErrClosed, r.errno)
		default:
			return 0, r.errno
		}
	}
}

// Datagram returns the bytes of datagram i of the last Read.
func (r *Receiver) Datagram(i int) []byte {
	return r.bufs[i][:min(int(r.msgs[i].Len), len(r.bufs[i]))]
}

// Truncated reports whether datagram i of the last Read was cut short.
func (r *Receiver) Truncated(i int) bool {
	return r.msgs[i].Hdr.Flags&unix.MSG_TRUNC != 0
}
