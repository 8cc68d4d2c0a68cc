package queue

import (
	"encoding/binary"
	"testing"

	"github.com/mdlayher/netlink"
)

func TestAppendVerdict(t *testing.T) {
	tests := []struct {
		name    string
		num     uint16
		id      uint32
		mark    uint32
		setMark bool
	}{
		{"unmarked", 7, 1, 0, false},
		{"marked", 0x0102, 0xdeadbeef, 0xffff5000, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := appendVerdict(nil, tt.num, tt.id, tt.mark, tt.setMark)
			var m netlink.Message
			if err := m.UnmarshalBinary(b); err != nil {
				t.Fatalf("not a netlink message: %v", err)
			}
			if int(m.Header.Length) != len(b) || len(b) > verdictLen {
				t.Errorf("length field %d, message %d bytes (max %d)", m.Header.Length, len(b), verdictLen)
			}
			if m.Header.Type != 3<<8|1 || m.Header.Flags != netlink.Request {
				t.Errorf("header %+v, want type NFNL_SUBSYS_QUEUE<<8|NFQNL_MSG_VERDICT, flags request", m.Header)
			}
			if m.Data[0] != 0 || m.Data[1] != 0 || binary.BigEndian.Uint16(m.Data[2:]) != tt.num {
				t.Errorf("nfgenmsg % x, want family 0, version 0, queue %d", m.Data[:4], tt.num)
			}
			ad, err := netlink.NewAttributeDecoder(m.Data[4:])
			if err != nil {
				t.Fatal(err)
			}
			ad.ByteOrder = binary.BigEndian
			var gotHdr []byte
			var gotMark *uint32
			for ad.Next() {
				switch ad.Type() {
				case 2:
					gotHdr = ad.Bytes()
				case 3:
					v := ad.Uint32()
					gotMark = &v
				default:
					t.Errorf("unexpected attribute %d", ad.Type())
				}
			}
			if err := ad.Err(); err != nil {
				t.Fatal(err)
			}
			if len(gotHdr) != 8 || binary.BigEndian.Uint32(gotHdr) != 1 || binary.BigEndian.Uint32(gotHdr[4:]) != tt.id {
				t.Errorf("verdict header % x, want NF_ACCEPT for id %d", gotHdr, tt.id)
			}
			switch {
			case tt.setMark && (gotMark == nil || *gotMark != tt.mark):
				t.Errorf("mark %v, want %#x", gotMark, tt.mark)
			case !tt.setMark && gotMark != nil:
				t.Errorf("unmarked verdict carries mark %#x", *gotMark)
			}
		})
	}
}

func TestAppendVerdictAllocs(t *testing.T) {
	buf := make([]byte, 0, verdictLen)
	if n := testing.AllocsPerRun(100, func() { buf = appendVerdict(buf[:0], 1, 2, 3, true) }); n != 0 {
		t.Errorf("appendVerdict allocated %v times", n)
	}
}
