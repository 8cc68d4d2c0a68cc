package queue

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/mdlayher/netlink"

	"github.com/nfmasq/nfmasq/internal/nl"
)

// packetMsg builds an NFQNL_MSG_PACKET message as the kernel sends it.
func packetMsg(t testing.TB, attrs []netlink.Attribute) []byte {
	t.Helper()
	data, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		t.Fatal(err)
	}
	body := append([]byte{2, 0, 0, 7}, data...) // nfgenmsg: AF_INET, v0, queue 7
	m := netlink.Message{
		Header: netlink.Header{Length: uint32(nl.HdrLen + len(body)), Type: subsysQueueShift | nfqnlMsgPacket},
		Data:   body,
	}
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func packetHdr(id uint32, proto uint16) []byte {
	return append(binary.BigEndian.AppendUint16(be32(id), proto), 3) // hook 3: FORWARD... padded below
}

func errorMsg(seq uint32, errno int32) []byte {
	b := make([]byte, nl.HdrLen+4+nl.HdrLen)
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], nl.TypeError)
	binary.NativeEndian.PutUint32(b[nl.HdrLen:], uint32(errno)) // the kernel sends -errno
	binary.NativeEndian.PutUint32(b[nl.HdrLen+4:], nl.HdrLen)   // echoed header: length
	binary.NativeEndian.PutUint32(b[nl.HdrLen+4+8:], seq)       // echoed header: sequence
	return b
}

func TestParsePacketMessage(t *testing.T) {
	payload := []byte{0x45, 0, 0, 20, 1, 2, 3}
	msg := packetMsg(t, []netlink.Attribute{
		{Type: nfqaPacketHdr, Data: packetHdr(0xdeadbeef, 0x0800)},
		{Type: nfqaMark, Data: be32(0x4000)},
		{Type: 5, Data: be32(2)},                   // NFQA_IFINDEX_INDEV: skipped
		{Type: 4 | 0x8000, Data: make([]byte, 16)}, // a nested flag: skipped
		{Type: nfqaPayload, Data: payload},
	})
	var in inbound
	m := parseMessage(msg, &in)
	if m.kind != msgPacket {
		t.Fatalf("kind %d, want packet", m.kind)
	}
	if in.id != 0xdeadbeef || in.mark != 0x4000 || in.hwProto != 0x0800 || !in.hasPayload || !bytes.Equal(in.payload, payload) {
		t.Errorf("parsed %+v", in)
	}

	// An empty payload attribute is a payload (of a non-IP packet).
	msg = packetMsg(t, []netlink.Attribute{{Type: nfqaPacketHdr, Data: packetHdr(1, 0)}, {Type: nfqaPayload}})
	if m := parseMessage(msg, &in); m.kind != msgPacket || !in.hasPayload || len(in.payload) != 0 {
		t.Errorf("empty payload: %+v %+v", m, in)
	}

	// Without a packet header nothing can be answered.
	msg = packetMsg(t, []netlink.Attribute{{Type: nfqaMark, Data: be32(1)}})
	if m := parseMessage(msg, &in); m.kind != msgMalformed {
		t.Errorf("no packet header: kind %d, want malformed", m.kind)
	}

	// A payload cut short by the buffer: the id survives, the payload
	// does not.
	msg = packetMsg(t, []netlink.Attribute{{Type: nfqaPacketHdr, Data: packetHdr(9, 0x86dd)}, {Type: nfqaPayload, Data: make([]byte, 100)}})
	cut := msg[:len(msg)-50]
	binary.NativeEndian.PutUint32(cut, uint32(len(cut)))
	if m := parseMessage(cut, &in); m.kind != msgPacket || in.id != 9 || in.hasPayload {
		t.Errorf("truncated: %+v %+v", m, in)
	}
}

func TestParseErrorMessage(t *testing.T) {
	var in inbound
	if m := parseMessage(errorMsg(42, 0), &in); m != (parsedMsg{kind: msgError, seq: 42}) {
		t.Errorf("ack: %+v", m)
	}
	if m := parseMessage(errorMsg(0, -2), &in); m != (parsedMsg{kind: msgError, errno: 2}) {
		t.Errorf("ENOENT: %+v", m)
	}
	short := errorMsg(1, 0)[:nl.HdrLen+4]
	binary.NativeEndian.PutUint32(short, uint32(len(short)))
	if m := parseMessage(short, &in); m.kind != msgMalformed {
		t.Errorf("short error: %+v", m)
	}
	done := make([]byte, nl.HdrLen)
	binary.NativeEndian.PutUint32(done, nl.HdrLen)
	binary.NativeEndian.PutUint16(done[4:], 3) // NLMSG_DONE
	if m := parseMessage(done, &in); m.kind != msgOther {
		t.Errorf("done: %+v", m)
	}
}

// FuzzParseMessage: no input makes the decoder panic or read outside the
// message, and on every well-formed packet message (attributes as the
// kernel's nla_ok accepts them, which mdlayher/netlink also decodes) the
// two decoders agree on id, mark and payload.
func FuzzParseMessage(f *testing.F) {
	f.Add(packetMsg(f, []netlink.Attribute{{Type: nfqaPacketHdr, Data: packetHdr(7, 0x0800)}, {Type: nfqaMark, Data: be32(3)}, {Type: nfqaPayload, Data: []byte{0x45, 0}}}))
	f.Add(errorMsg(3, -1))
	f.Add(append(errorMsg(0, -2), errorMsg(9, 0)...))
	f.Fuzz(func(t *testing.T, dgram []byte) {
		for rest := dgram; len(rest) > 0; {
			msg, r, ok := nl.NextMessage(rest)
			if !ok {
				return
			}
			rest = r
			var in inbound
			m := parseMessage(msg, &in)
			if m.kind != msgPacket {
				continue
			}
			var nm netlink.Message
			if err := nm.UnmarshalBinary(msg); err != nil || len(nm.Data) < nfgenHdrLen {
				continue
			}
			if !wellFormedAttrs(nm.Data[nfgenHdrLen:]) {
				continue
			}
			ad, err := netlink.NewAttributeDecoder(nm.Data[nfgenHdrLen:])
			if err != nil {
				continue
			}
			var want inbound
			for ad.Next() {
				switch ad.Type() {
				case nfqaPacketHdr:
					if b := ad.Bytes(); len(b) >= 6 {
						want.id, want.hwProto = binary.BigEndian.Uint32(b), binary.BigEndian.Uint16(b[4:])
					}
				case nfqaMark:
					if b := ad.Bytes(); len(b) >= 4 {
						want.mark = binary.BigEndian.Uint32(b)
					}
				case nfqaPayload:
					want.payload, want.hasPayload = ad.Bytes(), true
				}
			}
			if ad.Err() != nil {
				continue
			}
			if in.id != want.id || in.mark != want.mark || in.hwProto != want.hwProto || in.hasPayload != want.hasPayload || !bytes.Equal(in.payload, want.payload) {
				t.Fatalf("parsed %+v, mdlayher/netlink %+v", in, want)
			}
		}
	})
}

func TestBusyPollAdapts(t *testing.T) {
	p := busyPoll{max: 50 * time.Microsecond}
	p.slept(30 * time.Microsecond) // short sleep: start polling
	if p.window != busyPollStart {
		t.Fatalf("window %v after a short sleep, want %v", p.window, busyPollStart)
	}
	for range 10 {
		p.slept(60 * time.Microsecond) // under twice max: grow
	}
	if p.window != p.max {
		t.Fatalf("window %v after short sleeps, want the max %v", p.window, p.max)
	}
	p.slept(time.Millisecond) // long sleep: halve
	if p.window != p.max/2 {
		t.Fatalf("window %v after a long sleep, want %v", p.window, p.max/2)
	}
	for range 4 {
		p.slept(time.Millisecond)
	}
	if p.window != 0 {
		t.Fatalf("window %v after long sleeps, want 0 (no polling)", p.window)
	}
	off := busyPoll{}
	off.slept(time.Microsecond)
	if off.window != 0 {
		t.Fatalf("disabled busy poll opened a window of %v", off.window)
	}
}

// wellFormedAttrs reports whether b is a sequence of attributes each at
// least a header long and within b (the kernel's nla_ok).
func wellFormedAttrs(b []byte) bool {
	for len(b) > 0 {
		if len(b) < nl.AttrHdrLen {
			return false
		}
		n := int(binary.NativeEndian.Uint16(b))
		if n < nl.AttrHdrLen || n > len(b) {
			return false
		}
		b = b[min(nl.Align(n), len(b)):]
	}
	return true
}

// BenchmarkParsePacket decodes a message shaped like the kernel's for a
// forwarded packet: header, mark, two interfaces, hardware address,
// timestamp, 128 payload bytes.
func BenchmarkParsePacket(b *testing.B) {
	msg := packetMsg(b, []netlink.Attribute{
		{Type: nfqaPacketHdr, Data: packetHdr(7, 0x0800)},
		{Type: nfqaMark, Data: be32(0)},
		{Type: 5, Data: be32(2)},
		{Type: 6, Data: be32(3)},
		{Type: 9, Data: make([]byte, 12)},
		{Type: 4, Data: make([]byte, 16)},
		{Type: nfqaPayload, Data: make([]byte, 128)},
	})
	var in inbound
	b.ReportAllocs()
	for b.Loop() {
		if parseMessage(msg, &in).kind != msgPacket {
			b.Fatal("not a packet")
		}
	}
}
