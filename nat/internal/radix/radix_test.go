package radix

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestSortMatchesSlicesSort checks Sort against slices.Sort at sizes on
// both sides of the insertion-sort cutoff and with keys that share bytes
// (skipped passes).
func TestSortMatchesSlicesSort(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 100, 255, 256, 257, 5000} {
		for _, mask := range []uint64{^uint64(0), 0xff00_0000_00ff_ffff, 0x0000_00ff_0000_0f0f, 0} {
			keys := make([]uint64, n)
			for i := range keys {
				keys[i] = r.Uint64() & mask
			}
			want := slices.Clone(keys)
			slices.Sort(want)
			Sort(keys)
			if !slices.Equal(keys, want) {
				t.Fatalf("n=%d mask=%#x: Sort differs from slices.Sort", n, mask)
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
			Sort(keys)
		}
	})
	b.Run("slices.Sort", func(b *testing.B) {
		for b.Loop() {
			copy(keys, in)
			slices.Sort(keys)
		}
	})
}
