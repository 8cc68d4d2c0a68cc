package replay_test

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/nfmasq/nfmasq/internal/replay"
)

var captureTime = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// pcapFile writes frames as a little-endian pcap of link type lt, with
// nanosecond timestamps when nanos is set.
func pcapFile(t testing.TB, lt layers.LinkType, nanos bool, frames ...[]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := pcapgo.NewWriter(&buf)
	if nanos {
		w = pcapgo.NewWriterNanos(&buf)
	}
	if err := w.WriteFileHeader(65535, lt); err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		ci := gopacket.CaptureInfo{Timestamp: captureTime, CaptureLength: len(f), Length: len(f)}
		if err := w.WritePacket(ci, f); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

// pcapBigEndian writes frames as a big-endian, microsecond pcap, which
// pcapgo cannot write but SPARC and PowerPC machines did.
func pcapBigEndian(lt layers.LinkType, frames ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0xa1b2c3d4)
	b = binary.BigEndian.AppendUint16(b, 2)
	b = binary.BigEndian.AppendUint16(b, 4)
	b = append(b, make([]byte, 8)...)
	b = binary.BigEndian.AppendUint32(b, 65535)
	b = binary.BigEndian.AppendUint32(b, uint32(lt))
	for _, f := range frames {
		b = binary.BigEndian.AppendUint32(b, uint32(captureTime.Unix()))
		b = binary.BigEndian.AppendUint32(b, 0)
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

type ngRecord struct {
	iface int
	frame []byte
}

// pcapngFile writes a pcapng with one interface per link type, and each
// record on its interface.
func pcapngFile(t testing.TB, lts []layers.LinkType, recs ...ngRecord) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := pcapgo.NewNgWriter(&buf, lts[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, lt := range lts[1:] {
		if _, err := w.AddInterface(pcapgo.NgInterface{LinkType: lt, SnapLength: 65535}); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range recs {
		ci := gopacket.CaptureInfo{Timestamp: captureTime, CaptureLength: len(r.frame), Length: len(r.frame), InterfaceIndex: r.iface}
		if err := w.WritePacket(ci, r.frame); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipped(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type record struct {
	lt    layers.LinkType
	frame []byte
}

// readAll reads every record; the error is the one that ended the
// capture (nil at a clean end).
func readAll(t testing.TB, data []byte) (replay.Format, []record, error) {
	t.Helper()
	rd, err := replay.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("NewReader: %v", err)
	}
	var recs []record
	for {
		lt, b, err := rd.Next()
		if err == io.EOF {
			return rd.Format(), recs, nil
		}
		if err != nil {
			return rd.Format(), recs, err
		}
		recs = append(recs, record{lt, bytes.Clone(b)})
	}
}

func TestReaderFormats(t *testing.T) {
	eth4, sll6 := ether(0x0800, ip4Packet), sll(0x86dd, ip6Packet)
	tests := []struct {
		name   string
		data   []byte
		format replay.Format
		want   []record
	}{
		{"pcap little-endian microseconds", pcapFile(t, replay.LinkEthernet, false, eth4, eth4), replay.PCAP,
			[]record{{replay.LinkEthernet, eth4}, {replay.LinkEthernet, eth4}}},
		{"pcap little-endian nanoseconds", pcapFile(t, replay.LinkRaw, true, ip6Packet), replay.PCAP,
			[]record{{replay.LinkRaw, ip6Packet}}},
		{"pcap big-endian", pcapBigEndian(replay.LinkSLL, sll6), replay.PCAP,
			[]record{{replay.LinkSLL, sll6}}},
		{"pcap gzip", gzipped(t, pcapFile(t, replay.LinkIPv4, false, ip4Packet)), replay.PCAP,
			[]record{{replay.LinkIPv4, ip4Packet}}},
		{"pcap no records", pcapFile(t, replay.LinkEthernet, false), replay.PCAP, nil},
		{"pcap empty record", pcapFile(t, replay.LinkRaw, false, []byte{}), replay.PCAP,
			[]record{{replay.LinkRaw, []byte{}}}},
		{"pcapng one interface", pcapngFile(t, []layers.LinkType{replay.LinkEthernet}, ngRecord{0, eth4}), replay.PCAPNG,
			[]record{{replay.LinkEthernet, eth4}}},
		{"pcapng mixed link types", pcapngFile(t, []layers.LinkType{replay.LinkEthernet, replay.LinkSLL, replay.LinkSLL2},
			ngRecord{0, eth4}, ngRecord{1, sll6}, ngRecord{2, sll2(0x0800, ip4Packet)}, ngRecord{0, eth4}), replay.PCAPNG,
			[]record{{replay.LinkEthernet, eth4}, {replay.LinkSLL, sll6}, {replay.LinkSLL2, sll2(0x0800, ip4Packet)}, {replay.LinkEthernet, eth4}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			format, recs, err := readAll(t, tc.data)
			if err != nil {
				t.Fatal(err)
			}
			if format != tc.format {
				t.Errorf("format %v, want %v", format, tc.format)
			}
			if len(recs) != len(tc.want) {
				t.Fatalf("%d records, want %d", len(recs), len(tc.want))
			}
			for i, r := range recs {
				if r.lt != tc.want[i].lt || !bytes.Equal(r.frame, tc.want[i].frame) {
					t.Errorf("record %d: link type %d, % x; want %d, % x", i, r.lt, r.frame, tc.want[i].lt, tc.want[i].frame)
				}
			}
		})
	}
}

func TestNewReaderErrors(t *testing.T) {
	good := pcapFile(t, replay.LinkEthernet, false, ether(0x0800, ip4Packet))
	goodNG := pcapngFile(t, []layers.LinkType{replay.LinkEthernet}, ngRecord{0, ether(0x0800, ip4Packet)})
	badVersion := bytes.Clone(good)
	badVersion[4] = 9
	tests := []struct {
		name      string
		data      []byte
		truncated bool
		unknown   bool
		contains  string
	}{
		{"empty", nil, false, false, "empty file"},
		{"three bytes", good[:3], true, false, "capture header"},
		{"pcap header cut", good[:20], true, false, "pcap header"},
		{"pcapng header cut", goodNG[:20], true, false, "pcapng header"},
		{"text file", []byte("hello, world\n"), false, true, "magic 0x68656c6c"},
		{"pcap bad version", badVersion[:24], false, false, "major version"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := replay.NewReader(bytes.NewReader(tc.data))
			if err == nil {
				t.Fatal("no error")
			}
			if errors.Is(err, replay.ErrTruncated) != tc.truncated {
				t.Errorf("errors.Is(%v, ErrTruncated) = %v", err, !tc.truncated)
			}
			if errors.Is(err, replay.ErrUnknownFormat) != tc.unknown {
				t.Errorf("errors.Is(%v, ErrUnknownFormat) = %v", err, !tc.unknown)
			}
			if !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("error %q does not mention %q", err, tc.contains)
			}
		})
	}
}

// boundaries maps the offset where each record of a capture ends to the
// number of records complete there (the end of the file header counts as
// 0 records). Every pcapng block ends on a boundary, packet or not.
func boundaries(t testing.TB, data []byte) map[int]int {
	t.Helper()
	ends := map[int]int{}
	if binary.BigEndian.Uint32(data) == 0x0a0d0d0a {
		recs := 0
		for off := 0; off+8 <= len(data); {
			typ, n := binary.LittleEndian.Uint32(data[off:]), int(binary.LittleEndian.Uint32(data[off+4:]))
			off += n
			if typ == 6 { // enhanced packet block
				recs++
			}
			ends[off] = recs
		}
		return ends
	}
	off := 24
	ends[off] = 0
	for recs := 1; off+16 <= len(data); recs++ {
		off += 16 + int(binary.LittleEndian.Uint32(data[off+8:]))
		ends[off] = recs
	}
	return ends
}

// TestReaderTruncation cuts captures at every byte: a cut on a record
// boundary is a clean end after the records before it, any other cut ends
// with ErrTruncated, either as soon as the file header is incomplete or
// after the whole records before the cut.
func TestReaderTruncation(t *testing.T) {
	frames := [][]byte{ether(0x0800, ip4Packet), ether(0x86dd, ip6Packet), ether(0x0806, make([]byte, 28))}
	captures := map[string][]byte{
		"pcap": pcapFile(t, replay.LinkEthernet, false, frames...),
		"pcapng": pcapngFile(t, []layers.LinkType{replay.LinkEthernet},
			ngRecord{0, frames[0]}, ngRecord{0, frames[1]}, ngRecord{0, frames[2]}),
	}
	for name, data := range captures {
		t.Run(name, func(t *testing.T) {
			ends := boundaries(t, data)
			if ends[len(data)] != len(frames) {
				t.Fatalf("boundaries %v do not end at %d with %d records", ends, len(data), len(frames))
			}
			headerFrom := -1
			for n := 0; n <= len(data); n++ {
				rd, err := replay.NewReader(bytes.NewReader(data[:n]))
				if err != nil {
					if headerFrom >= 0 {
						t.Fatalf("header reads at %d bytes but not at %d: %v", headerFrom, n, err)
					}
					if n > 0 && !errors.Is(err, replay.ErrTruncated) {
						t.Errorf("header cut at %d: %v, want ErrTruncated", n, err)
					}
					continue
				}
				if headerFrom < 0 {
					headerFrom = n
				}
				got := 0
				for {
					if _, _, err = rd.Next(); err != nil {
						break
					}
					got++
				}
				want, boundary := ends[n]
				switch {
				case boundary && (err != io.EOF || got != want):
					t.Errorf("cut at %d, after record %d: %d records and %v, want io.EOF", n, want, got, err)
				case !boundary && !errors.Is(err, replay.ErrTruncated):
					t.Errorf("cut at %d, inside a record: %v after %d records, want ErrTruncated", n, err, got)
				}
				// The error sticks: pcap cannot resynchronise.
				if _, _, again := rd.Next(); again != err {
					t.Errorf("cut at %d: Next after %v returned %v", n, err, again)
				}
			}
		})
	}
}

func TestReaderBadRecord(t *testing.T) {
	data := pcapFile(t, replay.LinkRaw, false, ip4Packet, ip4Packet)
	// The second record claims 1 MiB, beyond the snap length and libpcap's
	// maximum: pcapgo refuses it, and nothing after it can be trusted.
	second := 24 + 16 + len(ip4Packet)
	binary.LittleEndian.PutUint32(data[second+8:], 1<<20)
	binary.LittleEndian.PutUint32(data[second+12:], 1<<20)
	_, recs, err := readAll(t, data)
	if len(recs) != 1 {
		t.Errorf("%d records before the bad one, want 1", len(recs))
	}
	if err == nil || errors.Is(err, replay.ErrTruncated) {
		t.Errorf("error %v, want a bad record", err)
	}
}

func TestReaderNextDoesNotAllocate(t *testing.T) {
	data, st := generate(t, benchConfig)
	rd, err := replay.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	// The first record sizes the reader's buffer.
	if _, _, err := rd.Next(); err != nil {
		t.Fatal(err)
	}
	runs := min(1000, int(st.Packets)-2)
	allocs := testing.AllocsPerRun(runs, func() {
		if _, _, err := rd.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Next allocates %v times per record", allocs)
	}
}
