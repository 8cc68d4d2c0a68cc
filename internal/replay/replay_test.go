package replay_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/internal/pcapgen"
	"github.com/nfmasq/nfmasq/internal/replay"
	"github.com/nfmasq/nfmasq/nat"
)

var update = flag.Bool("update", false, "rewrite golden files and the committed fuzz seed corpus")

// sharedCaptures is where the project keeps its real-world captures;
// testdata/pcaps holds copies, so that the tests run from a clean checkout.
const sharedCaptures = "../../../shared/pcaps"

func capturePaths(t testing.TB) []string {
	t.Helper()
	var paths []string
	for _, pat := range []string{"*.pcap", "*.pcapng"} {
		m, err := filepath.Glob(filepath.Join("testdata", "pcaps", pat))
		if err != nil {
			t.Fatal(err)
		}
		paths = append(paths, m...)
	}
	if len(paths) == 0 {
		t.Fatal("no captures in testdata/pcaps")
	}
	return paths
}

// checkBalance asserts that every record is accounted for.
func checkBalance(t testing.TB, s replay.Summary) {
	t.Helper()
	sum := s.IPPackets
	for _, n := range s.Skipped {
		sum += n
	}
	if sum != s.Records {
		t.Errorf("records %d != ip_packets %d + skipped %v", s.Records, s.IPPackets, s.Skipped)
	}
	if d := s.Decisions["masquerade"] + s.Decisions["passthrough"]; d != s.Flows {
		t.Errorf("decisions %v do not add up to %d flows", s.Decisions, s.Flows)
	}
	var src uint64
	for _, n := range s.Sources {
		src += n
	}
	if src != s.Flows {
		t.Errorf("sources %v do not add up to %d flows", s.Sources, s.Flows)
	}
	if s.Flows > s.IPPackets {
		t.Errorf("%d flows from %d IP packets", s.Flows, s.IPPackets)
	}
}

// stable drops the timing fields, which change from run to run, and the
// policy hash, which is the nat package's business.
func stable(s replay.Summary) replay.Summary {
	s.Elapsed, s.RecordsPerSecond, s.PolicyHash = 0, 0, ""
	return s
}

func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -update rewrites it)\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

// TestReplayCaptures replays every real capture, the malformed ones
// included: none may fail or panic, every record is accounted for, and the
// summary and the flow log match their goldens.
func TestReplayCaptures(t *testing.T) {
	policy := testPolicy(t)
	for _, path := range capturePaths(t) {
		name := filepath.Base(path)
		t.Run(name, func(t *testing.T) {
			var log bytes.Buffer
			r := replay.New(policy, replay.Options{Log: &log})
			if err := r.ReplayFile(path); err != nil {
				t.Fatal(err)
			}
			s := r.Summary()
			checkBalance(t, s)
			if s.Records == 0 {
				t.Error("no records read")
			}
			if s.ReadError != "" {
				t.Errorf("read error %q", s.ReadError)
			}
			if lines := uint64(bytes.Count(log.Bytes(), []byte("\n"))); lines != s.Flows {
				t.Errorf("%d flow records for %d flows", lines, s.Flows)
			}
			checkFlowLog(t, log.Bytes())

			js, err := json.MarshalIndent(stable(s), "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			golden(t, filepath.Join("testdata", "golden", name+".json"), append(js, '\n'))
			golden(t, filepath.Join("testdata", "golden", name+".flows"), log.Bytes())
		})
	}
}

// TestSharedCapturesCopied keeps testdata/pcaps in step with the shared
// captures when they are there.
func TestSharedCapturesCopied(t *testing.T) {
	shared, err := filepath.Glob(filepath.Join(sharedCaptures, "*.pcap*"))
	if err != nil || len(shared) == 0 {
		t.Skipf("no shared captures at %s", sharedCaptures)
	}
	for _, src := range shared {
		want, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join("testdata", "pcaps", filepath.Base(src)))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("testdata/pcaps/%s is missing or differs from %s", filepath.Base(src), src)
		}
	}
}

// checkFlowLog asserts that every line is a FlowRecord that encoding/json
// writes identically, so the hand-written encoder and the documented
// struct cannot drift apart.
func checkFlowLog(t testing.TB, log []byte) {
	t.Helper()
	sc := bufio.NewScanner(bytes.NewReader(log))
	for sc.Scan() {
		var rec replay.FlowRecord
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rec); err != nil {
			t.Fatalf("flow record %s: %v", sc.Bytes(), err)
		}
		again, err := json.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, sc.Bytes()) {
			t.Errorf("flow record\n%s\nre-encodes as\n%s", sc.Bytes(), again)
		}
		if rec.Packet == 0 || !rec.Dst.IsValid() || !rec.Src.IsValid() {
			t.Errorf("flow record %s lacks its packet index or addresses", sc.Bytes())
		}
	}
}

// TestReplayLinkTypes replays one capture per link type: IP packets of
// both families are decided, everything else is skipped by reason.
func TestReplayLinkTypes(t *testing.T) {
	internet4 := pkt4(udpHeader(1000, 53)) // to 8.8.8.8
	internal4 := bytes.Clone(internet4)
	copy(internal4[16:20], []byte{10, 1, 2, 3})
	internet6 := pkt6(udpHeader(1000, 53)) // to 2001::1
	tests := []struct {
		name    string
		lt      layers.LinkType
		frames  [][]byte
		masq    uint64
		pass    uint64
		skipped map[string]uint64
	}{
		{"ethernet", replay.LinkEthernet, [][]byte{
			ether(0x0800, internet4), ether(0x8100, vlan(0x0800, internal4)), ether(0x86dd, internet6),
			ether(0x0806, nil), ether(0x88cc, nil), []byte{1, 2},
		}, 2, 1, map[string]uint64{"ethertype:0x0806": 1, "ethertype:0x88cc": 1, "short_link_header": 1}},
		{"raw", replay.LinkRaw, [][]byte{internet4, internal4, internet6, {0x20}, nil}, 2, 1,
			map[string]uint64{"not_ip": 2}},
		{"ipv4", replay.LinkIPv4, [][]byte{internet4, internal4, internet6}, 1, 1,
			map[string]uint64{"bad_version": 1}},
		{"ipv6", replay.LinkIPv6, [][]byte{internet6, internet4, internet6[:30]}, 1, 0,
			map[string]uint64{"bad_version": 1, "truncated": 1}},
		{"linux sll", replay.LinkSLL, [][]byte{sll(0x0800, internet4), sll(0x0800, internal4), sll(0x86dd, internet6), sll(0x0806, nil)}, 2, 1,
			map[string]uint64{"ethertype:0x0806": 1}},
		{"linux sll2", replay.LinkSLL2, [][]byte{sll2(0x0800, internet4), sll2(0x0800, internal4), sll2(0x86dd, internet6), make([]byte, 10)}, 2, 1,
			map[string]uint64{"short_link_header": 1}},
		{"null", replay.LinkNull, [][]byte{cat(le32(2), internet4), cat(le32(2), internal4), cat(le32(30), internet6), cat(le32(17), nil)}, 2, 1,
			map[string]uint64{"family:17": 1}},
		{"loop", replay.LinkLoop, [][]byte{cat(be32(2), internet4), cat(be32(24), internet6)}, 2, 0, map[string]uint64{}},
		{"unknown", layers.LinkType(147), [][]byte{internet4, internal4}, 0, 0, map[string]uint64{"linktype:147": 2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := replay.New(testPolicy(t), replay.Options{})
			if err := r.Replay(bytes.NewReader(pcapFile(t, tc.lt, false, tc.frames...))); err != nil {
				t.Fatal(err)
			}
			s := r.Summary()
			checkBalance(t, s)
			if s.Records != uint64(len(tc.frames)) {
				t.Errorf("%d records, want %d", s.Records, len(tc.frames))
			}
			if s.Decisions["masquerade"] != tc.masq || s.Decisions["passthrough"] != tc.pass {
				t.Errorf("decisions %v, want %d masquerade, %d passthrough", s.Decisions, tc.masq, tc.pass)
			}
			if !equalCounts(s.Skipped, tc.skipped) {
				t.Errorf("skipped %v, want %v", s.Skipped, tc.skipped)
			}
		})
	}
}

func equalCounts(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestReplayMixedPCAPNG replays a pcapng whose interfaces have different
// link types, each record with its own.
func TestReplayMixedPCAPNG(t *testing.T) {
	data := pcapngFile(t, []layers.LinkType{replay.LinkEthernet, replay.LinkSLL2, layers.LinkTypeIEEE802_11},
		ngRecord{0, ether(0x0800, ip4Packet)}, ngRecord{1, sll2(0x86dd, ip6Packet)}, ngRecord{2, ip4Packet})
	r := replay.New(testPolicy(t), replay.Options{})
	if err := r.Replay(bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	s := r.Summary()
	checkBalance(t, s)
	if s.IPPackets != 2 || s.Flows != 2 || s.Skipped["linktype:105"] != 1 {
		t.Errorf("summary %+v, want 2 IP packets in 2 flows and one 802.11 record skipped", s)
	}
}

// TestReplayPodCIDRs decides only what the agent's queue rule would hand
// it: packets from the pod CIDRs.
func TestReplayPodCIDRs(t *testing.T) {
	request := pkt4(udpHeader(40000, 53)) // 10.244.0.2 > 8.8.8.8
	reply := bytes.Clone(request)
	copy(reply[12:16], request[16:20])
	copy(reply[16:20], request[12:16])
	node := bytes.Clone(request)
	copy(node[12:16], []byte{10, 128, 0, 5})
	data := pcapFile(t, replay.LinkRaw, false, request, reply, node, ip6Packet, request)
	r := replay.New(testPolicy(t), replay.Options{PodCIDRs: []netip.Prefix{
		netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00::1/64"),
	}})
	if err := r.Replay(bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	s := r.Summary()
	checkBalance(t, s)
	if s.IPPackets != 3 || s.Flows != 2 || s.Skipped["not_from_pod"] != 2 {
		t.Errorf("summary %+v, want 3 IP packets from pods in 2 flows, 2 packets not from a pod", s)
	}
}

// TestReplayTruncated counts the record a cut capture ends in, and says why
// reading stopped.
func TestReplayTruncated(t *testing.T) {
	data := pcapFile(t, replay.LinkRaw, false, ip4Packet, ip6Packet)
	r := replay.New(testPolicy(t), replay.Options{})
	if err := r.Replay(bytes.NewReader(data[:len(data)-5])); err != nil {
		t.Fatal(err)
	}
	s := r.Summary()
	checkBalance(t, s)
	if s.Records != 2 || s.IPPackets != 1 || s.Skipped["truncated_record"] != 1 {
		t.Errorf("summary %+v, want 2 records: one IP packet, one truncated", s)
	}
	if !strings.Contains(s.ReadError, "capture ends inside a record") {
		t.Errorf("read error %q does not say the capture was cut", s.ReadError)
	}
}

// TestReplayGenerated checks the replay against the generator's own
// account: every generated flow is one flow, decided by its class.
func TestReplayGenerated(t *testing.T) {
	tests := []pcapgen.Config{
		{Flows: 2000, PacketsPerFlow: 3, InternetFraction: 0.5, LinkLocalFraction: 0.1, IPv6Fraction: 0.3, UDPFraction: 0.5, Seed: 7},
		{Flows: 500, PacketsPerFlow: 2, InternetFraction: 1, Seed: 8, LinkType: layers.LinkTypeEthernet, PayloadSize: 100},
		{Flows: 300, InternetFraction: 0, IPv6Fraction: 1, Seed: 9},
	}
	for _, cfg := range tests {
		data, st := generate(t, cfg)
		var log bytes.Buffer
		r := replay.New(testPolicy(t), replay.Options{Log: &log})
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		s := r.Summary()
		checkBalance(t, s)
		checkFlowLog(t, log.Bytes())
		if s.Records != st.Packets || s.IPPackets != st.Packets || s.Flows != st.Flows {
			t.Errorf("seed %d: replayed %d records, %d IP packets, %d flows; generated %d packets, %d flows",
				cfg.Seed, s.Records, s.IPPackets, s.Flows, st.Packets, st.Flows)
		}
		want := map[string]uint64{
			"masquerade":  st.Classes["internet"],
			"passthrough": st.Classes["non_masquerade"] + st.Classes["link_local"],
		}
		if !equalCounts(s.Decisions, want) {
			t.Errorf("seed %d: decisions %v, want %v", cfg.Seed, s.Decisions, want)
		}
		if s.Sources["link-local"] != st.Classes["link_local"] || s.Sources["config"] != st.Classes["non_masquerade"] {
			t.Errorf("seed %d: sources %v, generated %v", cfg.Seed, s.Sources, st.Classes)
		}
	}
}

// TestRecordSteadyStateDoesNotAllocate is the zero-allocation target:
// once its flow is known, a packet costs no allocation, log or not.
func TestRecordSteadyStateDoesNotAllocate(t *testing.T) {
	data, _ := generate(t, benchConfig)
	var recs []record
	_, recs, err := readAll(t, data)
	if err != nil {
		t.Fatal(err)
	}
	for _, log := range []bool{false, true} {
		var w *bytes.Buffer
		r := replay.New(testPolicy(t), replay.Options{})
		if log {
			w = &bytes.Buffer{}
			r = replay.New(testPolicy(t), replay.Options{Log: w})
		}
		for _, rec := range recs {
			r.Record(rec.lt, rec.frame)
		}
		i := 0
		allocs := testing.AllocsPerRun(len(recs)-1, func() {
			r.Record(recs[i].lt, recs[i].frame)
			i++
		})
		if allocs != 0 {
			t.Errorf("log %v: Record allocates %v times per packet of a known flow", log, allocs)
		}
	}
}

// TestReplayAllocationsDoNotGrowWithPackets checks the whole Replay: its
// allocations (reader set-up) are the same for a capture twice as long.
func TestReplayAllocationsDoNotGrowWithPackets(t *testing.T) {
	cfg := benchConfig
	cfg.PacketsPerFlow = 10
	short, _ := generate(t, cfg)
	cfg.PacketsPerFlow = 20
	long, _ := generate(t, cfg)
	r := replay.New(testPolicy(t), replay.Options{})
	if err := r.Replay(bytes.NewReader(long)); err != nil {
		t.Fatal(err)
	}
	measure := func(data []byte) float64 {
		return testing.AllocsPerRun(5, func() {
			if err := r.Replay(bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
		})
	}
	a, b := measure(short), measure(long)
	t.Logf("allocations per replay: %v for %d flows x 10 packets, %v for x 20", a, cfg.Flows, b)
	if b > a {
		t.Errorf("a capture twice as long allocates %v times, not %v: allocations per packet", b, a)
	}
}

// TestReplayAccumulates replays two captures into one account.
func TestReplayAccumulates(t *testing.T) {
	data := pcapFile(t, replay.LinkRaw, false, ip4Packet, ip6Packet, []byte{0x10})
	r := replay.New(testPolicy(t), replay.Options{})
	for range 2 {
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
	}
	s := r.Summary()
	checkBalance(t, s)
	if s.Records != 6 || s.IPPackets != 4 || s.Flows != 2 || s.Skipped["not_ip"] != 2 {
		t.Errorf("summary %+v, want 6 records, 4 IP packets, 2 flows, 2 not IP", s)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestReplayErrors(t *testing.T) {
	dir := t.TempDir()
	notCapture := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notCapture, []byte("not a capture"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.pcap")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		run  func(r *replay.Replayer) error
		want []string
	}{
		{"missing file", func(r *replay.Replayer) error { return r.ReplayFile(filepath.Join(dir, "nope.pcap")) },
			[]string{"nope.pcap", "no such file"}},
		{"not a capture", func(r *replay.Replayer) error { return r.ReplayFile(notCapture) },
			[]string{"notes.txt", "not a pcap or pcapng capture"}},
		{"empty file", func(r *replay.Replayer) error { return r.ReplayFile(empty) },
			[]string{"empty.pcap", "empty file"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(replay.New(testPolicy(t), replay.Options{}))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}

	t.Run("log write fails", func(t *testing.T) {
		r := replay.New(testPolicy(t), replay.Options{Log: failingWriter{}})
		err := r.Replay(bytes.NewReader(pcapFile(t, replay.LinkRaw, false, ip4Packet)))
		if err == nil || !strings.Contains(err.Error(), "disk full") || !errors.Is(err, replay.ErrFlowLog) {
			t.Errorf("error %v, want the log's, marked ErrFlowLog", err)
		}
	})
}

// TestFlowRecordEscapesOrigin checks that an egress policy's name cannot
// break a flow record.
func TestFlowRecordEscapesOrigin(t *testing.T) {
	names := []string{"plain", `quote"and\backslash`, "new\nline\t<tag>&", "ctl\x01\x1f", "utf8 ✓ \u2028 sep", "bad \xff utf8"}
	for _, name := range names {
		p, err := nat.Compile(nat.Input{
			Config:            nat.DefaultConfig(true),
			UseEgressPolicies: true,
			EgressPolicies:    []nat.EgressPolicy{{Name: name, Destinations: []netip.Prefix{netip.MustParsePrefix("8.8.8.0/24")}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		var log bytes.Buffer
		r := replay.New(p, replay.Options{Log: &log})
		if err := r.Replay(bytes.NewReader(pcapFile(t, replay.LinkRaw, false, ip4Packet))); err != nil {
			t.Fatal(err)
		}
		if n := bytes.Count(log.Bytes(), []byte("\n")); n != 1 {
			t.Fatalf("origin %q: %d lines", name, n)
		}
		// The line must be what encoding/json writes for the record,
		// invalid UTF-8 and HTML characters included.
		want, err := json.Marshal(replay.FlowRecord{
			Packet: 1, Proto: "udp",
			Src: netip.MustParseAddr("10.244.0.2"), SrcPort: 40000,
			Dst: netip.MustParseAddr("8.8.8.8"), DstPort: 53,
			Action: nat.Passthrough, Prefix: "8.8.8.0/24", Source: nat.SourceEgressPolicy, Origin: name,
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.TrimSuffix(log.Bytes(), []byte("\n")); !bytes.Equal(got, want) {
			t.Errorf("origin %q:\n got %s\nwant %s", name, got, want)
		}
	}
}
