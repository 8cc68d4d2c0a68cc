package conntrack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"
)

// DeleteStale dumps the conntrack table of netns (0: the caller's) and
// deletes every entry of one of protos for which pred returns true, so
// that the flow's next packet is decided again. It returns how many
// entries it deleted. Entries that vanish between the dump and the delete
// are not errors.
//
// protos must be explicit: deleting a masqueraded TCP entry breaks the
// connection, so callers name TCP (6) only when asked to reconcile it.
func DeleteStale(ctx context.Context, netns int, pred func(Flow) bool, protos []uint8) (int, error) {
	if len(protos) == 0 {
		return 0, errors.New("delete stale conntrack entries: no protocols given")
	}
	conn, err := ct.Dial(&netlink.Config{NetNS: netns})
	if err != nil {
		return 0, fmt.Errorf("dial conntrack netlink: %w", err)
	}
	defer conn.Close()
	flows, err := conn.Dump(nil)
	if err != nil {
		return 0, fmt.Errorf("dump conntrack table: %w", err)
	}
	deleted := 0
	for i := range flows {
		f := &flows[i]
		if !slices.Contains(protos, f.TupleOrig.Proto.Protocol) || !pred(fromCT(f)) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return deleted, err
		}
		// The ID in f makes the kernel refuse to delete a newer entry that
		// reused the tuples since the dump.
		if err := conn.Delete(*f); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return deleted, fmt.Errorf("delete conntrack entry %d: %w", f.ID, err)
		}
		deleted++
	}
	return deleted, nil
}

// fromCT copies the fields the flow log needs out of a decoded entry.
func fromCT(f *ct.Flow) Flow {
	out := Flow{
		ID:     f.ID,
		Proto:  f.TupleOrig.Proto.Protocol,
		Orig:   tupleFromCT(f.TupleOrig),
		Reply:  tupleFromCT(f.TupleReply),
		Mark:   f.Mark,
		Zone:   f.Zone,
		Status: uint32(f.Status),
		// With accounting on, every entry has seen its first packet.
		Accounted:     f.CountersOrig.Packets != 0,
		OrigCounters:  Counters{Packets: f.CountersOrig.Packets, Bytes: f.CountersOrig.Bytes},
		ReplyCounters: Counters{Packets: f.CountersReply.Packets, Bytes: f.CountersReply.Bytes},
		Start:         f.Timestamp.Start,
		Stop:          f.Timestamp.Stop,
	}
	if p := f.TupleOrig.Proto; p.ICMPv4 || p.ICMPv6 {
		out.ICMP = ICMP{Type: p.ICMPType, Code: p.ICMPCode, ID: p.ICMPID}
	}
	return out
}

func tupleFromCT(t ct.Tuple) Tuple {
	return Tuple{
		Src: netip.AddrPortFrom(t.IP.SourceAddress.Unmap(), t.Proto.SourcePort),
		Dst: netip.AddrPortFrom(t.IP.DestinationAddress.Unmap(), t.Proto.DestinationPort),
	}
}
