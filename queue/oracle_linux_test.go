//go:build linux

package queue

import (
	"bytes"
	"context"
	"encoding/binary"
	"iter"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"github.com/nfmasq/nfmasq/internal/nl"
)

// The design's NFQUEUE library, github.com/florianl/go-nfqueue, is the
// oracle of the hand-written receive path: FuzzParseMessageOracle feeds
// the same netlink messages to parseMessage and to go-nfqueue's own
// receive loop (netlink.Conn, its message parser, its hook), and compares
// every field the agent reads. BenchmarkKernelNewFlowsLoop runs both
// loops against the kernel in one run.

// oracleSocket is a netlink.Socket for go-nfqueue: it acknowledges every
// configuration request and delivers the batches a test hands it.
type oracleSocket struct {
	mu     sync.Mutex
	acks   []netlink.Message
	in     chan []netlink.Message
	closed chan struct{}
	once   sync.Once
}

func (s *oracleSocket) Send(m netlink.Message) error {
	// NLMSG_ERROR with errno 0, echoing the request's header.
	data := make([]byte, 4+16)
	binary.NativeEndian.PutUint32(data[4:], m.Header.Length)
	binary.NativeEndian.PutUint16(data[8:], uint16(m.Header.Type))
	binary.NativeEndian.PutUint32(data[12:], m.Header.Sequence)
	binary.NativeEndian.PutUint32(data[16:], m.Header.PID)
	s.mu.Lock()
	s.acks = append(s.acks, netlink.Message{
		Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence, PID: m.Header.PID},
		Data:   data,
	})
	s.mu.Unlock()
	return nil
}

func (s *oracleSocket) SendMessages(ms []netlink.Message) error {
	for _, m := range ms {
		if err := s.Send(m); err != nil {
			return err
		}
	}
	return nil
}

func (s *oracleSocket) Receive() ([]netlink.Message, error) {
	s.mu.Lock()
	if len(s.acks) > 0 {
		a := s.acks[0]
		s.acks = s.acks[1:]
		s.mu.Unlock()
		return []netlink.Message{a}, nil
	}
	s.mu.Unlock()
	select {
	case ms := <-s.in:
		return ms, nil
	case <-s.closed:
		return nil, net.ErrClosed
	}
}

func (s *oracleSocket) ReceiveIter() iter.Seq2[netlink.Message, error] {
	return func(yield func(netlink.Message, error) bool) {
		ms, err := s.Receive()
		if err != nil {
			yield(netlink.Message{}, err)
			return
		}
		for _, m := range ms {
			if !yield(m, nil) {
				return
			}
		}
	}
}

func (s *oracleSocket) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}

// sentinelHook marks the message the oracle sends after each test message:
// when its hook sees it, go-nfqueue has dealt with the message before it.
const (
	sentinelHook = 0xee
	sentinelMark = 0x5a5a5a5a // the sentinel's mark is its id xor this
)

// nfqueueOracle is go-nfqueue's receive loop over an oracleSocket.
type nfqueueOracle struct {
	sock *oracleSocket
	got  chan nfqueue.Attribute
	nfq  *nfqueue.Nfqueue
	stop context.CancelFunc
	// nonce numbers the sentinels; it starts at a random value.
	nonce uint32
}

func newNfqueueOracle(t testing.TB) *nfqueueOracle {
	t.Helper()
	nfq, err := nfqueue.Open(&nfqueue.Config{NfQueue: 7, MaxPacketLen: 128, Copymode: nfqueue.NfQnlCopyPacket, AfFamily: 2})
	if err != nil {
		t.Skipf("go-nfqueue cannot open a netlink socket here: %v", err)
	}
	nfq.Con.Close() // the real socket; go-nfqueue talks to the oracle's instead
	o := &nfqueueOracle{sock: &oracleSocket{in: make(chan []netlink.Message), closed: make(chan struct{})}, got: make(chan nfqueue.Attribute, 4), nfq: nfq}
	nfq.Con = netlink.NewConn(o.sock, 1)
	ctx, cancel := context.WithCancel(context.Background())
	o.stop = cancel
	o.nonce = rand.Uint32()
	hook := func(a nfqueue.Attribute) int { o.got <- a; return 0 }
	if err := nfq.RegisterWithErrorFunc(ctx, hook, func(error) int { return 1 }); err != nil {
		t.Fatal(err)
	}
	return o
}

func (o *nfqueueOracle) Close() {
	o.stop()
	o.sock.Close()
}

// parse hands msg to go-nfqueue and returns what its hook received; ok
// is false when go-nfqueue dropped the message as unparseable. A sentinel
// follows msg in the same batch; its packet id is a fresh nonce, so a
// message made to look like a sentinel cannot end the wait early.
func (o *nfqueueOracle) parse(t testing.TB, msg netlink.Message) (attr nfqueue.Attribute, ok bool) {
	t.Helper()
	o.nonce++
	nonce := o.nonce
	hdr := binary.BigEndian.AppendUint32(nil, nonce)
	sentinel := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(subsysQueueShift | nfqnlMsgPacket)},
		Data: append([]byte{2, 0, 0, 7}, mustAttrs(t, []netlink.Attribute{
			{Type: nfqaPacketHdr, Data: append(hdr, 0, 0, sentinelHook, 0)},
			{Type: nfqaMark, Data: be32(nonce ^ sentinelMark)},
		})...),
	}
	select {
	case o.sock.in <- []netlink.Message{msg, sentinel}:
	case <-time.After(5 * time.Second):
		t.Fatal("go-nfqueue's loop did not receive")
	}
	for {
		select {
		case a := <-o.got:
			if a.Hook != nil && *a.Hook == sentinelHook && a.PacketID != nil && a.Mark != nil && *a.Mark == *a.PacketID^sentinelMark {
				if *a.PacketID == nonce {
					return attr, ok
				}
				continue // an earlier call's sentinel
			}
			attr, ok = a, true
		case <-time.After(5 * time.Second):
			t.Fatal("go-nfqueue's hook did not see the sentinel")
		}
	}
}

// nfqaHwAddr is NFQA_HWADDR: struct nfqnl_msg_packet_hw, a be16 address
// length, two bytes of padding and 8 bytes of address.
const nfqaHwAddr = 9

// hwAddrOverlong reports an NFQA_HWADDR attribute whose address length
// exceeds the 8 bytes struct nfqnl_msg_packet_hw has room for.
func hwAddrOverlong(attrs []byte) bool {
	for a := nl.NewAttrs(attrs); a.Next(); {
		if d := a.Data(); a.Type() == nfqaHwAddr && len(d) >= 2 && binary.BigEndian.Uint16(d) > 8 {
			return true
		}
	}
	return false
}

func mustAttrs(t testing.TB, attrs []netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzParseMessageOracle: on every packet message the kernel can send
// (attributes as its nla_ok accepts them) that go-nfqueue parses without
// an error, parseMessage reads the same packet id, hardware
// protocol, mark and payload, and treats a message without a packet
// header as malformed, as go-nfqueue's user would have to.
func FuzzParseMessageOracle(f *testing.F) {
	f.Add([]byte{2, 0, 0, 7}, mustAttrs(f, []netlink.Attribute{
		{Type: nfqaPacketHdr, Data: packetHdr(7, 0x0800)}, {Type: nfqaMark, Data: be32(3)}, {Type: nfqaPayload, Data: []byte{0x45, 0}},
	}))
	f.Add([]byte{10, 0, 0, 7}, mustAttrs(f, []netlink.Attribute{
		{Type: nfqaPacketHdr, Data: append(packetHdr(9, 0x86dd), 0)}, {Type: 5, Data: be32(2)}, {Type: nfqaPayload},
	}))
	f.Add([]byte{2, 0, 0, 7}, mustAttrs(f, []netlink.Attribute{{Type: nfqaMark, Data: be32(1)}}))
	f.Add([]byte{2, 0, 0, 7}, mustAttrs(f, []netlink.Attribute{{Type: nfqaPacketHdr | 0x8000, Data: append(packetHdr(1, 0x0800), 0)}}))
	o := newNfqueueOracle(f)
	defer o.Close()
	f.Fuzz(func(t *testing.T, nfgen, attrs []byte) {
		if len(nfgen) != nfgenHdrLen || !wellFormedAttrs(attrs) {
			// mdlayher/netlink yields a zero-length attribute as an
			// empty one of its type; the kernel never sends one, and
			// parseMessage ends the walk there.
			return
		}
		if hwAddrOverlong(attrs) {
			// go-nfqueue v2.1.0 panics on an NFQA_HWADDR whose
			// hw_addrlen runs past the attribute (4+hw_addrlen wraps
			// in uint16); the kernel's is at most 8 bytes.
			return
		}
		body := append(bytes.Clone(nfgen), attrs...)
		m := netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(subsysQueueShift | nfqnlMsgPacket), Length: uint32(16 + len(body))},
			Data:   body,
		}
		raw, err := m.MarshalBinary()
		if err != nil {
			return
		}
		var in inbound
		ours := parseMessage(raw, &in)

		want, ok := o.parse(t, m)
		if !ok {
			return // go-nfqueue refused the message; parseMessage may be more lenient
		}
		if want.PacketID == nil {
			if ours.kind != msgMalformed {
				t.Fatalf("no packet header: parseMessage says kind %d, want malformed", ours.kind)
			}
			return
		}
		if ours.kind != msgPacket {
			t.Fatalf("go-nfqueue read packet %d; parseMessage says kind %d", *want.PacketID, ours.kind)
		}
		var wantMark uint32
		if want.Mark != nil {
			wantMark = *want.Mark
		}
		var wantPayload []byte
		if want.Payload != nil {
			wantPayload = *want.Payload
		}
		if in.id != *want.PacketID || in.hwProto != *want.HwProtocol || in.mark != wantMark ||
			in.hasPayload != (want.Payload != nil) || !bytes.Equal(in.payload, wantPayload) {
			t.Fatalf("parseMessage: id %d proto %#x mark %#x payload %v (%x)\ngo-nfqueue:   id %d proto %#x mark %#x payload %v (%x)",
				in.id, in.hwProto, in.mark, in.hasPayload, in.payload,
				*want.PacketID, *want.HwProtocol, wantMark, want.Payload != nil, wantPayload)
		}
	})
}
