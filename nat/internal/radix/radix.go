// Package radix sorts integer keys, for compiling large prefix lists: at
// 100,000 keys it is several times faster than slices.Sort.
package radix

// Sort sorts keys in place (least significant byte first, skipping bytes
// every key shares). It allocates one scratch copy of keys.
func Sort(keys []uint64) {
	if len(keys) < 256 {
		insertion(keys)
		return
	}
	src, dst := keys, make([]uint64, len(keys))
	var count [256]int
	for shift := uint(0); shift < 64; shift += 8 {
		count = [256]int{}
		for _, k := range src {
			count[byte(k>>shift)]++
		}
		if count[byte(src[0]>>shift)] == len(src) {
			continue // every key has this digit: the pass would change nothing
		}
		pos := 0
		for d, c := range count {
			count[d] = pos
			pos += c
		}
		for _, k := range src {
			d := byte(k >> shift)
			dst[count[d]] = k
			count[d]++
		}
		src, dst = dst, src
	}
	if &src[0] != &keys[0] {
		copy(keys, src)
	}
}

// insertion is Sort for short slices.
func insertion(keys []uint64) {
	for i := 1; i < len(keys); i++ {
		k := keys[i]
		j := i
		for ; j > 0 && keys[j-1] > k; j-- {
			keys[j] = keys[j-1]
		}
		keys[j] = k
	}
}
