package packet_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/nfmasq/nfmasq/queue/packet"
)

var update = flag.Bool("update", false, "rewrite golden files and the committed fuzz seed corpus")

// ipPayload strips the link layer of one capture record. version is the
// IP version the link layer announces (0 when it announces none); skip is
// a reason when the record carries no IP packet.
func ipPayload(lt layers.LinkType, frame []byte) (b []byte, version uint8, skip string) {
	etherType := func(et uint16, rest []byte) ([]byte, uint8, string) {
		switch et {
		case 0x0800:
			return rest, 4, ""
		case 0x86dd:
			return rest, 6, ""
		}
		return nil, 0, fmt.Sprintf("ethertype_%#04x", et)
	}
	switch lt {
	case layers.LinkTypeEthernet:
		if len(frame) < 14 {
			return nil, 0, "short_link_header"
		}
		et, rest := binary.BigEndian.Uint16(frame[12:]), frame[14:]
		for et == 0x8100 || et == 0x88a8 {
			if len(rest) < 4 {
				return nil, 0, "short_link_header"
			}
			et, rest = binary.BigEndian.Uint16(rest[2:]), rest[4:]
		}
		return etherType(et, rest)
	case layers.LinkTypeRaw, 12, 14:
		return frame, 0, ""
	case layers.LinkTypeIPv4:
		return frame, 4, ""
	case layers.LinkTypeIPv6:
		return frame, 6, ""
	case layers.LinkTypeLinuxSLL:
		if len(frame) < 16 {
			return nil, 0, "short_link_header"
		}
		return etherType(binary.BigEndian.Uint16(frame[14:]), frame[16:])
	case layers.LinkTypeLinuxSLL2:
		if len(frame) < 20 {
			return nil, 0, "short_link_header"
		}
		return etherType(binary.BigEndian.Uint16(frame[0:]), frame[20:])
	case layers.LinkTypeNull, layers.LinkTypeLoop:
		if len(frame) < 4 {
			return nil, 0, "short_link_header"
		}
		// The family is in host byte order of the capturing machine.
		fam := binary.LittleEndian.Uint32(frame)
		if fam > 0xffff {
			fam = binary.BigEndian.Uint32(frame)
		}
		switch fam {
		case 2:
			return frame[4:], 4, ""
		case 10, 24, 28, 30:
			return frame[4:], 6, ""
		}
		return nil, 0, fmt.Sprintf("family_%d", fam)
	}
	return nil, 0, fmt.Sprintf("linktype_%d", lt)
}

// record is one IP packet read from a capture.
type record struct {
	b       []byte
	version uint8
}

// readCapture returns the IP packets of a pcap or pcapng file and the
// count of records skipped by reason.
func readCapture(t testing.TB, path string) ([]record, map[string]int) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var (
		lt   layers.LinkType
		next func() ([]byte, error)
	)
	if strings.HasSuffix(path, ".pcapng") {
		r, err := pcapgo.NewNgReader(bytes.NewReader(data), pcapgo.DefaultNgReaderOptions)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		lt = r.LinkType()
		next = func() ([]byte, error) { b, _, err := r.ReadPacketData(); return b, err }
	} else {
		r, err := pcapgo.NewReader(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		lt = r.LinkType()
		next = func() ([]byte, error) { b, _, err := r.ReadPacketData(); return b, err }
	}
	var recs []record
	skipped := map[string]int{}
	for {
		frame, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// Malformed captures end in a broken record; count it.
			skipped["read_error"]++
			break
		}
		b, v, skip := ipPayload(lt, frame)
		if skip != "" {
			skipped[skip]++
			continue
		}
		recs = append(recs, record{b: append([]byte(nil), b...), version: v})
	}
	return recs, skipped
}

func capturePaths(t testing.TB) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join("testdata", "pcaps", "*.pcap*"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no captures in testdata/pcaps: %v", err)
	}
	sort.Strings(paths)
	return paths
}

func decodeRecord(p *packet.Parsed, r record) {
	if r.version != 0 {
		p.DecodeVersion(r.b, r.version)
	} else {
		p.Decode(r.b)
	}
}

// TestCaptures decodes every packet of every capture in testdata/pcaps and
// compares the status counts with a golden file, so a change in how the
// decoder classifies real (and deliberately broken) traffic is reviewed.
func TestCaptures(t *testing.T) {
	var out strings.Builder
	for _, path := range capturePaths(t) {
		recs, skipped := readCapture(t, path)
		var counts [packet.NumStatus]int
		var p packet.Parsed
		for _, r := range recs {
			decodeRecord(&p, r)
			counts[p.Status]++
			if p.Status.Valid() && !p.Dst.IsValid() {
				t.Errorf("%s: valid status without destination: %v", path, p.String())
			}
		}
		fmt.Fprintf(&out, "%s: ip=%d", filepath.Base(path), len(recs))
		for s, n := range counts {
			if n > 0 {
				fmt.Fprintf(&out, " %v=%d", packet.Status(s), n)
			}
		}
		reasons := make([]string, 0, len(skipped))
		for r := range skipped {
			reasons = append(reasons, r)
		}
		sort.Strings(reasons)
		for _, r := range reasons {
			fmt.Fprintf(&out, " skipped:%s=%d", r, skipped[r])
		}
		out.WriteByte('\n')
	}
	golden := filepath.Join("testdata", "captures.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(out.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if out.String() != string(want) {
		t.Errorf("status counts differ from %s (rerun with -update if intended):\n got:\n%s\nwant:\n%s", golden, out.String(), want)
	}
}

// TestCaptureSpotChecks pins what a few captures must decode to.
func TestCaptureSpotChecks(t *testing.T) {
	tests := []struct {
		file  string
		index int
		check func(p *packet.Parsed) bool
		want  string
	}{
		{"ipv4_invalid_hdr_length.pcap", 0, func(p *packet.Parsed) bool { return p.Status == packet.BadHeaderLength }, "bad header length"},
		{"ipv6-bad-version.pcap", 1, func(p *packet.Parsed) bool { return p.Status == packet.BadVersion }, "bad version"},
		{"ipv6-routing-header.pcap", 2, func(p *packet.Parsed) bool {
			return p.Status == packet.OK && p.Proto == packet.UDP && p.DstPort == 5642 && p.ExtHeaders == 1
		}, "udp to 5642 behind a routing header"},
		{"bigtcp-ipv4.pcap", 0, func(p *packet.Parsed) bool { return p.Status == packet.OK && p.Proto == packet.TCP }, "tcp with total length 0"},
		{"bigtcp-ipv6.pcap", 0, func(p *packet.Parsed) bool { return p.Status == packet.OK && p.Proto == packet.TCP }, "tcp with payload length 0"},
		{"LINKTYPE_IPV4.pcap", 0, func(p *packet.Parsed) bool {
			return p.Status == packet.OK && p.Dst.String() == "9.9.9.9" && p.DstPort == 53
		}, "udp to 9.9.9.9:53"},
		{"ip6_frag_asan.pcap", 0, func(p *packet.Parsed) bool { return p.Status == packet.Snapped && p.Dst.IsValid() }, "snapped with a destination"},
		{"udp-length-heapoverflow.pcap", 0, func(p *packet.Parsed) bool { return p.Status == packet.Snapped && p.Dst.IsValid() }, "snapped with a destination"},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			recs, _ := readCapture(t, filepath.Join("testdata", "pcaps", tt.file))
			if tt.index >= len(recs) {
				t.Fatalf("only %d IP records", len(recs))
			}
			var p packet.Parsed
			decodeRecord(&p, recs[tt.index])
			if !tt.check(&p) {
				t.Errorf("record %d decoded to %v, want %s", tt.index, p.String(), tt.want)
			}
		})
	}
}
