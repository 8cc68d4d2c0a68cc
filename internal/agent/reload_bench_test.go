package agent

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nfmasq/nfmasq/internal/mark"
)

// BenchmarkReload100k is the userspace part of the agent's reload of a
// 100,000-CIDR config, as the live benchmark writes it: read the YAML
// file, parse, compile the Policy and build the rules' config. The kernel
// part (iptables-restore, the ipset swap) follows the swap and is measured
// by bench/live.
func BenchmarkReload100k(b *testing.B) {
	path := filepath.Join(b.TempDir(), "config")
	if err := os.WriteFile(path, yamlConfig(100_000), 0o644); err != nil {
		b.Fatal(err)
	}
	src := PolicySource{ConfigPath: path, Agent: true, AllReservedRanges: true}
	dp := Dataplane{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}, Marks: mark.Default, QueueNum: 150, Queues: 1, ToPorts: "32768-65535", IPSetThreshold: 64}
	for b.Loop() {
		src.last = nil // a changed file: Load skips a rebuild of the same bytes
		pol, _, err := src.Load()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := dp.RulesConfig(pol); err != nil {
			b.Fatal(err)
		}
	}
}

// yamlConfig is a config file of n distinct random IPv4 CIDRs (/16 to
// /32) from a fixed seed.
func yamlConfig(n int) []byte {
	r := rand.New(rand.NewPCG(2, 0))
	seen := make(map[netip.Prefix]bool, n)
	var s strings.Builder
	s.WriteString("masqLinkLocal: false\nresyncInterval: 60s\nnonMasqueradeCIDRs:\n")
	for len(seen) < n {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())}), 16+r.IntN(17)).Masked()
		if !seen[p] {
			seen[p] = true
			fmt.Fprintf(&s, "- %s\n", p)
		}
	}
	return []byte(s.String())
}
