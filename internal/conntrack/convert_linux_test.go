package conntrack

import (
	"net/netip"
	"testing"
	"time"

	ct "github.com/ti-mo/conntrack"
)

func TestFromCT(t *testing.T) {
	start := time.Unix(1700000000, 5)
	udp := ct.NewFlow(17, ct.StatusSeenReply|ct.StatusSrcNAT, netip.MustParseAddr("::ffff:10.244.0.2"), netip.MustParseAddr("11.0.0.10"), 4000, 53, 30, 0x1000)
	udp.ID, udp.Zone = 42, 3
	udp.TupleReply.IP.DestinationAddress = netip.MustParseAddr("192.168.77.1")
	udp.TupleReply.Proto.DestinationPort = 61000
	udp.CountersOrig = ct.Counter{Packets: 2, Bytes: 256}
	udp.CountersReply = ct.Counter{Direction: true, Packets: 1, Bytes: 128}
	udp.Timestamp = ct.Timestamp{Start: start, Stop: start.Add(time.Second)}

	icmp := ct.NewFlow(58, 0, netip.MustParseAddr("fd00:10:244::2"), netip.MustParseAddr("2001:db8::1"), 0, 0, 30, 0)
	icmp.TupleOrig.Proto.ICMPv6, icmp.TupleOrig.Proto.ICMPType, icmp.TupleOrig.Proto.ICMPID = true, 128, 9

	tests := []struct {
		name string
		in   ct.Flow
		want Flow
	}{
		{"masqueraded udp", udp, Flow{
			ID: 42, Proto: 17, Zone: 3, Mark: 0x1000, Status: uint32(ct.StatusSeenReply | ct.StatusSrcNAT),
			Orig:      Tuple{netip.MustParseAddrPort("10.244.0.2:4000"), netip.MustParseAddrPort("11.0.0.10:53")},
			Reply:     Tuple{netip.MustParseAddrPort("11.0.0.10:53"), netip.MustParseAddrPort("192.168.77.1:61000")},
			Accounted: true, OrigCounters: Counters{2, 256}, ReplyCounters: Counters{1, 128},
			Start: start, Stop: start.Add(time.Second),
		}},
		{"icmpv6 without accounting", icmp, Flow{
			Proto: 58,
			Orig:  Tuple{netip.MustParseAddrPort("[fd00:10:244::2]:0"), netip.MustParseAddrPort("[2001:db8::1]:0")},
			Reply: Tuple{netip.MustParseAddrPort("[2001:db8::1]:0"), netip.MustParseAddrPort("[fd00:10:244::2]:0")},
			ICMP:  ICMP{Type: 128, ID: 9},
		}},
	}
	for _, tt := range tests {
		if got := fromCT(&tt.in); got != tt.want {
			t.Errorf("%s:\n got %+v\nwant %+v", tt.name, got, tt.want)
		}
	}
}
