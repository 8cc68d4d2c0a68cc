package ipfix

import (
	"net"
	"time"

	"github.com/vmware/go-ipfix/pkg/entities"
	"github.com/vmware/go-ipfix/pkg/registry"
)

// templateKind is one of the four templates: IPv4 or IPv6, create or delete.
type templateKind struct{ v6, delete bool }

var templateKinds = []templateKind{{false, false}, {false, true}, {true, false}, {true, true}}

// elementNames are every information element the templates use.
var elementNames = []string{
	"observationTimeMilliseconds", "natEvent", "protocolIdentifier",
	"sourceIPv4Address", "destinationIPv4Address", "postNATSourceIPv4Address",
	"sourceIPv6Address", "destinationIPv6Address", "postNATSourceIPv6Address",
	"sourceTransportPort", "destinationTransportPort", "postNAPTSourceTransportPort",
	"flowStartMilliseconds", "flowEndMilliseconds",
	"octetDeltaCount", "packetDeltaCount", "responderOctets", "responderPackets",
}

// fields lists a template's elements in order. Create events carry the
// 5-tuple and the translation (RFC 8158 section 4.1.1's NAT44 session
// create); delete events add the flow's start and end and, for the
// direction the pod sent, octetDeltaCount and packetDeltaCount, and for
// the replies responderOctets and responderPackets.
func (k templateKind) fields() []string {
	src, dst, xlate := "sourceIPv4Address", "destinationIPv4Address", "postNATSourceIPv4Address"
	if k.v6 {
		src, dst, xlate = "sourceIPv6Address", "destinationIPv6Address", "postNATSourceIPv6Address"
	}
	f := []string{"observationTimeMilliseconds", "natEvent", "protocolIdentifier",
		src, "sourceTransportPort", dst, "destinationTransportPort", xlate, "postNAPTSourceTransportPort"}
	if k.delete {
		f = append(f, "flowStartMilliseconds", "flowEndMilliseconds",
			"octetDeltaCount", "packetDeltaCount", "responderOctets", "responderPackets")
	}
	return f
}

// template is one template with its ID.
type template struct {
	id       uint16
	kind     templateKind
	elements []*entities.InfoElement
}

func newTemplate(id uint16, kind templateKind) *template {
	t := &template{id: id, kind: kind}
	for _, name := range kind.fields() {
		ie, err := registry.GetInfoElement(name, registry.IANAEnterpriseID)
		if err != nil {
			panic("ipfix: " + err.Error()) // loadRegistry checked every name
		}
		t.elements = append(t.elements, ie)
	}
	return t
}

// record encodes an event as a data record of t.
func (t *template) record(ev *event) entities.Record {
	event := EventNAT44Create
	switch {
	case t.kind.v6 && !t.kind.delete:
		event = EventCreate
	case t.kind.v6:
		event = EventDelete
	case t.kind.delete:
		event = EventNAT44Delete
	}
	ip := func(a net.IP) net.IP {
		if !t.kind.v6 {
			return a.To4()
		}
		return a.To16()
	}
	els := make([]entities.InfoElementWithValue, 0, len(t.elements))
	for _, ie := range t.elements {
		var v entities.InfoElementWithValue
		switch ie.Name {
		case "observationTimeMilliseconds":
			v = entities.NewDateTimeMillisecondsInfoElement(ie, millis(ev.at))
		case "natEvent":
			v = entities.NewUnsigned8InfoElement(ie, event)
		case "protocolIdentifier":
			v = entities.NewUnsigned8InfoElement(ie, ev.proto)
		case "sourceIPv4Address", "sourceIPv6Address":
			v = entities.NewIPAddressInfoElement(ie, ip(ev.src.Addr().Unmap().AsSlice()))
		case "destinationIPv4Address", "destinationIPv6Address":
			v = entities.NewIPAddressInfoElement(ie, ip(ev.dst.Addr().Unmap().AsSlice()))
		case "postNATSourceIPv4Address", "postNATSourceIPv6Address":
			v = entities.NewIPAddressInfoElement(ie, ip(ev.xlate.Addr().Unmap().AsSlice()))
		case "sourceTransportPort":
			v = entities.NewUnsigned16InfoElement(ie, ev.src.Port())
		case "destinationTransportPort":
			v = entities.NewUnsigned16InfoElement(ie, ev.dst.Port())
		case "postNAPTSourceTransportPort":
			v = entities.NewUnsigned16InfoElement(ie, ev.xlate.Port())
		case "flowStartMilliseconds":
			v = entities.NewDateTimeMillisecondsInfoElement(ie, millis(ev.start))
		case "flowEndMilliseconds":
			v = entities.NewDateTimeMillisecondsInfoElement(ie, millis(ev.at))
		case "octetDeltaCount":
			v = entities.NewUnsigned64InfoElement(ie, ev.counters[0].Bytes)
		case "packetDeltaCount":
			v = entities.NewUnsigned64InfoElement(ie, ev.counters[0].Packets)
		case "responderOctets":
			v = entities.NewUnsigned64InfoElement(ie, ev.counters[1].Bytes)
		case "responderPackets":
			v = entities.NewUnsigned64InfoElement(ie, ev.counters[1].Packets)
		}
		els = append(els, v)
	}
	return entities.NewDataRecordFromElements(t.id, els)
}

func millis(t time.Time) uint64 {
	if t.IsZero() {
		return 0
	}
	return uint64(t.UnixMilli())
}
