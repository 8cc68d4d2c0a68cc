package nat

import (
	"net/netip"
)

// Workloads is the per-source half of the decision: for each pod address
// on the node, the PolicySet of the MasqueradePolicies that select the pod
// (nil when none does), and the ranges whose unknown sources wait for
// their identity. It is immutable; the agent publishes a new one when a
// pod, a namespace or a policy changes, and the queue reads it per packet.
type Workloads struct {
	// v4 and v6 index pods by address bits: hashing a uint32 or 16 bytes
	// costs a third of hashing a netip.Addr, whose zone handle is part
	// of the key.
	v4   map[uint32]*PolicySet
	v6   map[[16]byte]*PolicySet
	hold []netip.Prefix
	sets int
}

// NewWorkloads returns the snapshot. pods maps every known pod address of
// the node to its PolicySet (nil: no policy selects the pod); hold lists
// the pod ranges whose addresses missing from pods are not known yet (nil
// when no MasqueradePolicy exists: then nothing ever waits).
func NewWorkloads(pods map[netip.Addr]*PolicySet, hold []netip.Prefix) *Workloads {
	w := &Workloads{hold: hold, v4: map[uint32]*PolicySet{}, v6: map[[16]byte]*PolicySet{}}
	seen := map[*PolicySet]bool{}
	for a, s := range pods {
		if s != nil && !seen[s] {
			seen[s] = true
		}
		if a = a.Unmap(); a.Is4() {
			w.v4[v4key(a)] = s
		} else {
			w.v6[a.As16()] = s
		}
	}
	w.sets = len(seen)
	return w
}

func v4key(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// Decide returns the decision for a flow from src to dst: the source pod's
// PolicySet's when it decides, pol's otherwise. It does not allocate.
func (w *Workloads) Decide(pol *Policy, src, dst netip.Addr) Decision {
	set, _ := w.Pod(src)
	return set.DecideOr(pol, dst)
}

// DecideOr returns the set's decision for dst when it decides, pol's
// otherwise; a nil set leaves it to pol. It does not allocate.
func (s *PolicySet) DecideOr(pol *Policy, dst netip.Addr) Decision {
	if s != nil {
		if d, ok := s.Decide(dst); ok {
			return d
		}
	}
	return pol.Decide(dst)
}

// Unknown reports whether src is an address of the node's pod ranges that
// no known pod has, while MasqueradePolicies exist: a pod whose identity
// has not arrived yet. It does not allocate.
func (w *Workloads) Unknown(src netip.Addr) bool {
	_, known := w.Pod(src)
	return !known && w.Waits(src)
}

// Waits reports whether src, if unknown, waits for its identity: it is in
// the node's pod ranges while MasqueradePolicies exist.
func (w *Workloads) Waits(src netip.Addr) bool {
	if w == nil {
		return false
	}
	for _, p := range w.hold {
		if p.Contains(src) {
			return true
		}
	}
	return false
}

// Pod returns the PolicySet of the pod with address a (nil when no policy
// selects it) and whether the pod is known. It does not allocate.
func (w *Workloads) Pod(a netip.Addr) (*PolicySet, bool) {
	if w == nil {
		return nil, false
	}
	var s *PolicySet
	var ok bool
	if a.Is4() {
		s, ok = w.v4[v4key(a)]
	} else {
		s, ok = w.v6[a.As16()]
	}
	return s, ok
}

// Len returns the number of pod addresses known.
func (w *Workloads) Len() int {
	if w == nil {
		return 0
	}
	return len(w.v4) + len(w.v6)
}

// Sets returns the number of distinct PolicySets in use.
func (w *Workloads) Sets() int {
	if w == nil {
		return 0
	}
	return w.sets
}

// Holding reports whether unknown sources wait for their identity.
func (w *Workloads) Holding() bool { return w != nil && len(w.hold) > 0 }

// Each calls f for every known pod address and its PolicySet.
func (w *Workloads) Each(f func(netip.Addr, *PolicySet)) {
	if w == nil {
		return
	}
	for k, s := range w.v4 {
		f(netip.AddrFrom4([4]byte{byte(k >> 24), byte(k >> 16), byte(k >> 8), byte(k)}), s)
	}
	for k, s := range w.v6 {
		f(netip.AddrFrom16(k), s)
	}
}
