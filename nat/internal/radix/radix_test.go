package radix

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestSortMatchesStableSort checks Sort against slices.SortStableFunc on
// the same bits, at sizes on both sides of the insertion-sort cutoff and
// with keys that share high digits (skipped passes).
func TestSortMatchesStableSort(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 100, 255, 256, 257, 5000} {
		for _, lo := range []uint{0, 7, 8, 24, 26, 32, 56} {
			for _, mask := range []uint64{^uint64(0), 0xff00_0000_00ff_ffff, 0x0000_00ff_0000_0f0f} {
				keys := make([]uint64, n)
				for i := range keys {
					keys[i] = r.Uint64() & mask
				}
				want := slices.Clone(keys)
				slices.SortStableFunc(want, func(a, b uint64) int {
					a, b = a>>(lo&^7), b>>(lo&^7)
					switch {
					case a < b:
						return -1
					case a > b:
						return 1
					}
					return 0
				})
				Sort(keys, lo)
				if !slices.Equal(keys, want) {
					t.Fatalf("n=%d lo=%d mask=%#x: Sort differs from a stable sort", n, lo, mask)
				}
			}
		}
	}
}

func BenchmarkSort100k(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	in := make([]uint64, 100_000)
	for i := range in {
		in[i] = uint64(r.Uint32())<<32 | uint64(i)
	}
	keys := make([]uint64, len(in))
	b.Run("radix", func(b *testing.B) {
		for b.Loop() {
			copy(keys, in)
			Sort(keys, 24)
		}
	})
	b.Run("slices.Sort", func(b *testing.B) {
		for b.Loop() {
			copy(keys, in)
			slices.Sort(keys)
		}
	})
}
