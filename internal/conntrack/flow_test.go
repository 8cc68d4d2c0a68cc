package conntrack

import (
	"net/netip"
	"testing"
	"time"
)

func TestFlowTranslation(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		name string
		flow Flow
		masq bool
	}{
		{"masqueraded", Flow{Orig: Tuple{ap("10.244.0.2:4000"), ap("11.0.0.10:53")}, Reply: Tuple{ap("11.0.0.10:53"), ap("192.168.77.1:61000")}}, true},
		{"kept", Flow{Orig: Tuple{ap("10.244.0.2:4000"), ap("10.200.0.10:53")}, Reply: Tuple{ap("10.200.0.10:53"), ap("10.244.0.2:4000")}}, false},
		{"port only", Flow{Orig: Tuple{ap("10.244.0.2:4000"), ap("10.200.0.10:53")}, Reply: Tuple{ap("10.200.0.10:53"), ap("10.244.0.2:4001")}}, false},
		{"ipv6", Flow{Orig: Tuple{ap("[fd00:10:244::2]:4000"), ap("[2001:db8::1]:53")}, Reply: Tuple{ap("[2001:db8::1]:53"), ap("[fd00:77::1]:4000")}}, true},
		{"mapped", Flow{Orig: Tuple{ap("10.244.0.2:4000"), ap("10.200.0.10:53")}, Reply: Tuple{ap("10.200.0.10:53"), ap("[::ffff:10.244.0.2]:4000")}}, false},
		{"no reply tuple", Flow{Orig: Tuple{ap("10.244.0.2:4000"), ap("10.200.0.10:53")}}, false},
	}
	for _, tt := range tests {
		if got := tt.flow.Masqueraded(); got != tt.masq {
			t.Errorf("%s: Masqueraded() = %v, want %v", tt.name, got, tt.masq)
		}
		if got := tt.flow.Translated(); got != tt.flow.Reply.Dst {
			t.Errorf("%s: Translated() = %v", tt.name, got)
		}
	}
}

func TestDuration(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := start.Add(time.Minute)
	tests := []struct {
		f    Flow
		want time.Duration
	}{
		{Flow{}, 0},
		{Flow{Start: start}, time.Minute},
		{Flow{Start: start, Stop: start.Add(time.Second)}, time.Second},
	}
	for _, tt := range tests {
		if got := tt.f.Duration(now); got != tt.want {
			t.Errorf("Duration(%v..%v) = %v, want %v", tt.f.Start, tt.f.Stop, got, tt.want)
		}
	}
}

func TestInPrefixes(t *testing.T) {
	pods := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/64")}
	tests := []struct {
		prefixes []netip.Prefix
		addr     string
		want     bool
	}{
		{pods, "10.244.3.4", true},
		{pods, "::ffff:10.244.3.4", true},
		{pods, "10.245.0.1", false},
		{pods, "fd00:10:244::9", true},
		{pods, "fd00:10:245::9", false},
		{nil, "1.2.3.4", true},
	}
	for _, tt := range tests {
		if got := InPrefixes(tt.prefixes, netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("InPrefixes(%v, %s) = %v", tt.prefixes, tt.addr, got)
		}
	}
}

// TestDeliverNeverBlocks drives the reader's delivery path without a
// socket: a full channel drops and counts, and filtered flows are ignored.
func TestDeliverNeverBlocks(t *testing.T) {
	var dropped []Event
	l := &Listener{
		cfg: Config{
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")},
			OnDrop:   func(ev Event) { dropped = append(dropped, ev) },
		},
		events: make(chan Event, 2),
	}
	pod := Flow{Orig: Tuple{Src: netip.MustParseAddrPort("10.244.0.2:1")}}
	node := Flow{Orig: Tuple{Src: netip.MustParseAddrPort("192.168.77.1:1")}}
	for range 5 {
		l.deliver(Event{Type: EventDestroy, Flow: pod})
	}
	l.deliver(Event{Type: EventDestroy, Flow: node})
	want := Stats{Received: 6, Ignored: 1, Delivered: 2, Dropped: 3}
	if got := l.Stats(); got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
	}
	if len(dropped) != 3 || dropped[0].Flow.Orig != pod.Orig {
		t.Errorf("OnDrop saw %v", dropped)
	}
}
