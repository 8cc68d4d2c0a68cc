package replay_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/nfmasq/nfmasq/internal/pcapgen"
	"github.com/nfmasq/nfmasq/internal/replay"
)

// maxSeedLen caps seeds taken from the captures: the BIG TCP records are
// 80 KB, and a cut copy exercises the truncation path as well.
const maxSeedLen = 4096

// fuzzSeeds are the real captures and hand-built ones for the link types
// and layouts the real ones lack.
func fuzzSeeds(t testing.TB) [][]byte {
	var seeds [][]byte
	for _, path := range capturePaths(t) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, b[:min(len(b), maxSeedLen)])
	}
	gen, _ := generate(t, pcapgen.Config{Flows: 4, PacketsPerFlow: 2, InternetFraction: 0.5, IPv6Fraction: 0.5, UDPFraction: 0.5, Seed: 3})
	seeds = append(seeds,
		gen,
		pcapBigEndian(replay.LinkSLL, sll(0x0800, ip4Packet), sll(0x86dd, ip6Packet)),
		pcapFile(t, replay.LinkSLL2, true, sll2(0x0800, ip4Packet), sll2(0x0806, nil)),
		pcapFile(t, replay.LinkNull, false, cat(le32(2), ip4Packet), cat(le32(30), ip6Packet)),
		pcapFile(t, replay.LinkLoop, false, cat(be32(2), ip4Packet)),
		pcapFile(t, replay.LinkEthernet, false, ether(0x8100, vlan(0x0800, ip4Packet)), ether(0x0806, nil)),
		pcapngFile(t, []layers.LinkType{replay.LinkEthernet, replay.LinkSLL2, replay.LinkRaw},
			ngRecord{0, ether(0x0800, ip4Packet)}, ngRecord{1, sll2(0x86dd, ip6Packet)}, ngRecord{2, ip6Packet}),
		gzipped(t, pcapFile(t, replay.LinkRaw, false, ip4Packet)),
	)
	return seeds
}

// TestWriteFuzzCorpus regenerates testdata/fuzz/FuzzReplay with -update.
// `go test` runs the committed files as seed cases, so FuzzReplay's checks
// apply to every capture without -fuzz.
func TestWriteFuzzCorpus(t *testing.T) {
	if !*update {
		t.Skip("run with -update to rewrite the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzReplay")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range fuzzSeeds(t) {
		name := fmt.Sprintf("seed-%x", sha256.Sum256(b))[:21]
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzReplay replays arbitrary bytes as a capture. Whatever they are, the
// replay must not panic; when the header reads, every record must be
// accounted for and every flow record must be valid JSON.
func FuzzReplay(f *testing.F) {
	policy := testPolicy(f)
	f.Add([]byte{})
	f.Add(ip4Packet)
	f.Fuzz(func(t *testing.T, data []byte) {
		var log bytes.Buffer
		r := replay.New(policy, replay.Options{Log: &log})
		if err := r.Replay(bytes.NewReader(data)); err != nil {
			if s := r.Summary(); s.Records != 0 {
				t.Fatalf("header error %v after %d records", err, s.Records)
			}
			return
		}
		s := r.Summary()
		checkBalance(t, s)
		if lines := uint64(bytes.Count(log.Bytes(), []byte("\n"))); lines != s.Flows {
			t.Fatalf("%d flow records for %d flows", lines, s.Flows)
		}
		checkFlowLog(t, log.Bytes())
	})
}
