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

// sentMsg is one verdict message as the kernel would read it.
type sentMsg struct {
	batch   bool
	id      uint32
	mark    uint32
	setMark bool
}

func decodeVerdicts(t *testing.T, b []byte) []sentMsg {
	t.Helper()
	var out []sentMsg
	for len(b) > 0 {
		var m netlink.Message
		if err := m.UnmarshalBinary(b); err != nil {
			t.Fatalf("not a netlink message: %v", err)
		}
		b = b[m.Header.Length:]
		s := sentMsg{batch: m.Header.Type == 3<<8|3}
		if !s.batch && m.Header.Type != 3<<8|1 {
			t.Fatalf("message type %#x", m.Header.Type)
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			t.Fatal(err)
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			switch ad.Type() {
			case 2:
				s.id = binary.BigEndian.Uint32(ad.Bytes()[4:])
			case 3:
				s.mark, s.setMark = ad.Uint32(), true
			}
		}
		out = append(out, s)
	}
	return out
}

// TestVerdictBatchRuns: consecutive packets with the same verdict and
// mark go out as one batch verdict up to the run's last id; a run of one
// is a plain verdict; the write carries them in packet order.
func TestVerdictBatchRuns(t *testing.T) {
	var written [][]byte
	vb := verdictBatch{num: 7, write: func(b []byte) error {
		written = append(written, append([]byte(nil), b...))
		return nil
	}}
	adds := []sentVerdict{
		{1, 0x1000, true}, {2, 0x1000, true}, {3, 0x1000, true}, // a run of three
		{4, 0x2000, true},                      // a run of one
		{5, 0x4000, false}, {6, 0x4000, false}, // unmarked: mark ignored
		{7, 0x5000, true}, {8, 0x1000, true}, // a foreign bit: a different mark
	}
	for _, a := range adds {
		vb.add(a.id, a.mark, a.setMark, false)
	}
	if err := vb.flush(); err != nil {
		t.Fatal(err)
	}
	if len(written) != 1 {
		t.Fatalf("%d writes, want 1", len(written))
	}
	got := decodeVerdicts(t, written[0])
	want := []sentMsg{
		{batch: true, id: 3, mark: 0x1000, setMark: true},
		{id: 4, mark: 0x2000, setMark: true},
		{batch: true, id: 6},
		{id: 7, mark: 0x5000, setMark: true},
		{id: 8, mark: 0x1000, setMark: true},
	}
	if len(got) != len(want) {
		t.Fatalf("messages %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("message %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if err := vb.flush(); err != nil || len(written) != 1 {
		t.Errorf("an empty flush wrote (%d writes, %v)", len(written), err)
	}
}
