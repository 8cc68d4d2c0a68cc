package ipfix

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/conntrack"
)

func TestConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		cfg  Config
		want string
	}{
		{Config{Collector: "10.0.0.1:4739", Transport: "sctp"}, "transport"},
		{Config{Collector: "10.0.0.1", Transport: "udp"}, "HOST:PORT"},
		{Config{Collector: ":4739", Transport: "udp"}, "HOST:PORT"},
		{Config{Collector: "10.0.0.1:4739", Transport: "udp", Buffer: -1}, "negative"},
	} {
		if _, err := New(tt.cfg); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%+v): %v, want an error about %s", tt.cfg, err, tt.want)
		}
	}
}

func TestDomainOf(t *testing.T) {
	if a := DomainOf("node-a"); a == DomainOf("node-b") || a != DomainOf(string([]byte("node-a"))) || DomainOf("") == 0 {
		t.Error("observation domains are not per node and stable")
	}
}

// Each template's records carry the event value of its family and kind,
// the translation, and on delete the counters.
func TestRecords(t *testing.T) {
	if err := loadRegistry(); err != nil {
		t.Fatal(err)
	}
	start := time.Unix(1700000000, 0)
	for _, tt := range []struct {
		kind  templateKind
		src   string
		event uint8
	}{
		{templateKind{}, "10.244.0.2", EventNAT44Create},
		{templateKind{delete: true}, "10.244.0.2", EventNAT44Delete},
		{templateKind{v6: true}, "fd00:10:244::2", EventCreate},
		{templateKind{v6: true, delete: true}, "fd00:10:244::2", EventDelete},
	} {
		tmpl := newTemplate(300, tt.kind)
		f := conntrack.Flow{Proto: 6,
			Orig:         conntrack.Tuple{Src: netip.AddrPortFrom(netip.MustParseAddr(tt.src), 4000)},
			Reply:        conntrack.Tuple{Dst: netip.AddrPortFrom(netip.MustParseAddr(tt.src), 61000)},
			OrigCounters: conntrack.Counters{Packets: 3, Bytes: 180}, Start: start, Stop: start.Add(time.Second)}
		ev := event{create: !tt.kind.delete, proto: 6, src: f.Orig.Src, xlate: f.Reply.Dst, at: f.Stop, start: f.Start,
			counters: [2]conntrack.Counters{f.OrigCounters, f.ReplyCounters}}
		rec := tmpl.record(&ev)
		get := func(name string) uint64 {
			el, _, ok := rec.GetInfoElementWithValue(name)
			if !ok {
				return 0
			}
			switch el.GetDataType() {
			case 1: // unsigned8
				return uint64(el.GetUnsigned8Value())
			case 2:
				return uint64(el.GetUnsigned16Value())
			default:
				return el.GetUnsigned64Value()
			}
		}
		if got := get("natEvent"); got != uint64(tt.event) {
			t.Errorf("%+v: natEvent %d, want %d", tt.kind, got, tt.event)
		}
		if got := get("postNAPTSourceTransportPort"); got != 61000 {
			t.Errorf("%+v: translated port %d", tt.kind, got)
		}
		if tt.kind.delete && (get("octetDeltaCount") != 180 || get("packetDeltaCount") != 3 || get("flowStartMilliseconds") != uint64(start.UnixMilli())) {
			t.Errorf("%+v: counters or start missing", tt.kind)
		}
		if !tt.kind.delete && rec.GetFieldCount() != 9 {
			t.Errorf("%+v: %d fields in a create record, want 9", tt.kind, rec.GetFieldCount())
		}
	}
}
