package lpm

import (
	"math/rand/v2"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gaissmai/bart"
	"github.com/nfmasq/nfmasq/internal/cputime"
	"go4.org/netipx"
)

// The benchmarks compare Table with the two usual Go answers, in one run so
// the ratios are taken on the same machine state:
//
//   - bart.Table[int]: a longest-prefix match returning a value, the same
//     question Table answers;
//   - bart.Lite: bart's smallest and usually fastest form, which only says
//     whether some prefix matches;
//   - netipx.IPSet: membership only; it merges prefixes into ranges, so it
//     cannot say which prefix matched and is not an LPM.
//
// Each lookup benchmark walks 1<<20 destinations drawn with a fixed seed.
// "ns/op" is wall time per lookup; "cpu-ns/op" the process's CPU time per
// lookup, which is what the ratios use because it does not count the time
// the benchmark was descheduled on a shared machine. "B/table" is the heap kept by the built structure,
// measured as the HeapAlloc difference around building it, with a GC on
// each side (the input slice is allocated before). Table also reports
// "x-bart-time": its CPU time over the faster of bart.Table and bart.Lite measured
// just before it, and "x-bart-mem" its memory over bart.Lite's (the smaller
// bart), and "B/acct" its own accounting (MemoryBytes), which should agree
// with B/table up to allocator rounding. bench/lpm.sh runs them with -count and prints medians.

const numDests = 1 << 20

type benchSet struct {
	name     string
	prefixes []netip.Prefix
	dests    []netip.Addr
}

var (
	benchSetsOnce sync.Once
	benchSetsVal  []*benchSet
)

// gkeDefaults is GKE's default non-masquerade set plus link-local.
func gkeDefaults() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range []string{
		"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
		"192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
		"198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "169.254.0.0/16",
	} {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func benchSets() []*benchSet {
	benchSetsOnce.Do(func() {
		rng := rand.New(rand.NewPCG(2024, 4))
		dests4 := make([]netip.Addr, numDests)
		for i := range dests4 {
			dests4[i] = randomAddr(rng, true)
		}
		// Uniform IPv6 destinations would all miss or all hit one short
		// prefix; keep each one inside the /32 of a random prefix of the
		// set instead, so lookups descend where the prefixes are.
		v6 := randomPrefixes6Under(rng, 10000, netip.MustParsePrefix("2000::/3"), 20, 64)
		dests6 := make([]netip.Addr, numDests)
		for i := range dests6 {
			a := randomAddr(rng, false).As16()
			p := v6[rng.IntN(len(v6))].Addr().As16()
			copy(a[:4], p[:4])
			dests6[i] = netip.AddrFrom16(a)
		}
		benchSetsVal = []*benchSet{
			{"gke12", gkeDefaults(), dests4},
			{"rand1k", randomPrefixes4(rng, 1000, 16, 32), dests4},
			{"rand100k", randomPrefixes4(rng, 100000, 16, 32), dests4},
			{"v6rand10k", v6, dests6},
		}
	})
	return benchSetsVal
}

// randomPrefixes6Under returns n prefixes inside within, lengths uniform in
// [minBits, maxBits].
func randomPrefixes6Under(r *rand.Rand, n int, within netip.Prefix, minBits, maxBits int) []netip.Prefix {
	base := within.Addr().As16()
	out := make([]netip.Prefix, n)
	for i := range out {
		a := randomAddr(r, false).As16()
		for bit := range within.Bits() {
			m := byte(0x80 >> (bit % 8))
			a[bit/8] = a[bit/8]&^m | base[bit/8]&m
		}
		out[i], _ = netip.AddrFrom16(a).Prefix(minBits + r.IntN(maxBits-minBits+1))
	}
	return out
}

// built is one structure under test with the heap it keeps.
type built struct {
	lookup    func([]netip.Addr, int) int // runs n lookups, returns a checksum
	bytes     uint64                      // heap kept, measured
	accounted int                         // Table.MemoryBytes, for lpm
}

// heapKept returns what build allocated and still holds after a GC.
func heapKept(build func() any) (any, uint64) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := build()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(v)
	if after.HeapAlloc < before.HeapAlloc {
		return v, 0
	}
	return v, after.HeapAlloc - before.HeapAlloc
}

// impl is one implementation: how to build it from the prefixes, and a
// lookup loop over what was built (the loops are written out per type so
// that no interface call sits between the loop and the lookup).
type impl struct {
	name    string
	compile func([]netip.Prefix) any
	lookups func(any) func([]netip.Addr, int) int
}

var impls = []impl{
	{
		// The cost of the benchmark loop itself (streaming the
		// destinations); at 12 prefixes every implementation is close to it.
		name: "floor",
		lookups: func(any) func([]netip.Addr, int) int {
			return func(addrs []netip.Addr, n int) int {
				s := 0
				for i := range n {
					if addrs[i&(numDests-1)].Is4() {
						s++
					}
				}
				return s
			}
		},
	},
	{
		name: "bart.Table",
		compile: func(ps []netip.Prefix) any {
			t := new(bart.Table[int])
			for i := len(ps) - 1; i >= 0; i-- { // lowest index wins on duplicates
				t.Insert(ps[i], i)
			}
			return t
		},
		lookups: func(v any) func([]netip.Addr, int) int {
			t := v.(*bart.Table[int])
			return func(addrs []netip.Addr, n int) int {
				s := 0
				for i := range n {
					if v, ok := t.Lookup(addrs[i&(numDests-1)]); ok {
						s += v
					}
				}
				return s
			}
		},
	},
	{
		name: "bart.Lite",
		compile: func(ps []netip.Prefix) any {
			t := new(bart.Lite)
			for _, p := range ps {
				t.Insert(p)
			}
			return t
		},
		lookups: func(v any) func([]netip.Addr, int) int {
			t := v.(*bart.Lite)
			return func(addrs []netip.Addr, n int) int {
				s := 0
				for i := range n {
					if t.Contains(addrs[i&(numDests-1)]) {
						s++
					}
				}
				return s
			}
		},
	},
	{
		name: "netipx.IPSet",
		compile: func(ps []netip.Prefix) any {
			var sb netipx.IPSetBuilder
			for _, p := range ps {
				sb.AddPrefix(p)
			}
			s, err := sb.IPSet()
			if err != nil {
				panic(err)
			}
			return s
		},
		lookups: func(v any) func([]netip.Addr, int) int {
			t := v.(*netipx.IPSet)
			return func(addrs []netip.Addr, n int) int {
				s := 0
				for i := range n {
					if t.Contains(addrs[i&(numDests-1)]) {
						s++
					}
				}
				return s
			}
		},
	},
	{
		name: "lpm",
		compile: func(ps []netip.Prefix) any {
			t, err := Compile(ps)
			if err != nil {
				panic(err)
			}
			return t
		},
		lookups: func(v any) func([]netip.Addr, int) int {
			t := v.(*Table)
			return func(addrs []netip.Addr, n int) int {
				s := 0
				for i := range n {
					s += t.Lookup(addrs[i&(numDests-1)])
				}
				return s
			}
		},
	},
}

func implNamed(name string) impl {
	for _, im := range impls {
		if im.name == name {
			return im
		}
	}
	panic("no implementation " + name)
}

var (
	builtMu    sync.Mutex
	builtCache = map[string]built{}
	sink       int
)

func getBuilt(set *benchSet, im impl) built {
	builtMu.Lock()
	defer builtMu.Unlock()
	key := set.name + "/" + im.name
	if b, ok := builtCache[key]; ok {
		return b
	}
	if im.compile == nil {
		return built{lookup: im.lookups(nil)}
	}
	v, n := heapKept(func() any { return im.compile(set.prefixes) })
	b := built{lookup: im.lookups(v), bytes: n}
	if t, ok := v.(*Table); ok {
		b.accounted = t.MemoryBytes()
	}
	builtCache[key] = b
	return b
}

func BenchmarkLookup(b *testing.B) {
	for _, set := range benchSets() {
		b.Run("set="+set.name, func(b *testing.B) {
			// Per implementation, the time of its longest run (the one
			// the framework reports).
			type result struct {
				n  int
				ns float64
			}
			results := map[string]result{}
			for _, impl := range impls {
				b.Run("impl="+impl.name, func(b *testing.B) {
					bt := getBuilt(set, impl)
					b.ResetTimer()
					cpu := cputime.Process()
					sink += bt.lookup(set.dests, b.N)
					cpu = cputime.Process() - cpu
					b.StopTimer()
					ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
					if cpu > 0 {
						ns = float64(cpu.Nanoseconds()) / float64(b.N)
						b.ReportMetric(ns, "cpu-ns/op")
					}
					if r := results[impl.name]; b.N >= r.n {
						results[impl.name] = result{b.N, ns}
					}
					if impl.compile != nil {
						b.ReportMetric(float64(bt.bytes), "B/table")
					}
					if impl.name != "lpm" {
						return
					}
					b.ReportMetric(float64(bt.accounted), "B/acct")
					bartNs := min(results["bart.Table"].ns, results["bart.Lite"].ns)
					if bartNs > 0 {
						b.ReportMetric(results["lpm"].ns/bartNs, "x-bart-time")
					}
					if lite := getBuilt(set, implNamed("bart.Lite")).bytes; lite > 0 {
						b.ReportMetric(float64(bt.bytes)/float64(lite), "x-bart-mem")
					}
				})
			}
		})
	}
}

func BenchmarkCompile(b *testing.B) {
	for _, set := range benchSets() {
		b.Run("set="+set.name, func(b *testing.B) {
			for _, impl := range impls {
				if impl.compile == nil {
					continue
				}
				b.Run("impl="+impl.name, func(b *testing.B) {
					cpu := cputime.Process()
					for range b.N {
						impl.compile(set.prefixes)
					}
					if cpu > 0 {
						b.ReportMetric(float64(cputime.Process()-cpu)/float64(b.N), "cpu-ns/op")
					}
				})
			}
		})
	}
}

// TestBenchSetsAgree checks that the benchmark data are what the
// comparison claims: Table and bart.Table give the same answers on them.
func TestBenchSetsAgree(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the 100k-prefix benchmark sets")
	}
	start := time.Now()
	for _, set := range benchSets() {
		tbl := mustCompile(t, set.prefixes)
		bt := new(bart.Table[int])
		for i := len(set.prefixes) - 1; i >= 0; i-- {
			bt.Insert(set.prefixes[i], i)
		}
		for _, a := range set.dests[:1<<16] {
			want, ok := bt.Lookup(a)
			if !ok {
				want = NoMatch
			}
			if got := tbl.Lookup(a); got != want {
				t.Fatalf("%s: Lookup(%v) = %d, bart says %d", set.name, a, got, want)
			}
		}
	}
	t.Logf("built and checked in %v", time.Since(start))
}
