// Package ipfix exports NAT session events to an IPFIX collector, as
// RFC 8158 describes them: a create event when conntrack confirms a
// masqueraded pod flow, a delete event, with the flow's counters, when it
// ends. Messages are built and sent by github.com/vmware/go-ipfix (the
// encoder Antrea's flow exporter uses).
//
// The dataplane hands events over without ever waiting: Created and
// Deleted queue them in a bounded buffer, or count them as dropped when it
// is full. One goroutine owns the connection: it batches events into
// messages, reconnects after an outage (logging once per outage), and,
// over UDP, resends the templates every TemplateRefresh so that a
// collector that starts late or restarts decodes what follows.
package ipfix

import (
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vmware/go-ipfix/pkg/entities"
	"github.com/vmware/go-ipfix/pkg/exporter"
	"github.com/vmware/go-ipfix/pkg/registry"

	"github.com/nfmasq/nfmasq/internal/conntrack"
	"github.com/nfmasq/nfmasq/internal/netns"
)

// NAT event values (IANA "natEvent Values" registry).
const (
	// EventNAT44Create and EventNAT44Delete are NAT44 session create and
	// delete (RFC 8158): an IPv4 flow masqueraded.
	EventNAT44Create uint8 = 4
	EventNAT44Delete uint8 = 5
	// EventCreate and EventDelete are the registry's family-neutral "NAT
	// translation create" and "delete" (1 and 2, marked historic since
	// RFC 8158). The registry has no NAT66 session events; masqueraded
	// IPv6 flows use these.
	EventCreate uint8 = 1
	EventDelete uint8 = 2
)

// Defaults for Config fields left zero.
const (
	DefaultBuffer          = 8192
	DefaultTemplateRefresh = 10 * time.Second
	// DefaultMaxMessage is the largest UDP message sent, for a path MTU
	// of 1500 with IPv4 or IPv6 and UDP headers; TCP messages may be
	// larger.
	DefaultMaxMessage = 1500 - 40 - 8
	// batchWait is how long the sender lets events gather into one
	// message when they trickle in.
	batchWait = 20 * time.Millisecond
	// retryMin and retryMax bound the wait between connection attempts.
	retryMin = time.Second
	retryMax = 30 * time.Second
	// closeWait bounds how long Close waits for the sender, which may be
	// stuck connecting to an unreachable collector.
	closeWait = 5 * time.Second
)

// Config configures an Exporter.
type Config struct {
	// Collector is the collector's HOST:PORT.
	Collector string
	// Transport is "udp" or "tcp".
	Transport string
	// ObservationDomain identifies this exporting process to the
	// collector; 0 derives it from Node, so that every node has its own.
	ObservationDomain uint32
	// Node is the node name (for the observation domain and logs).
	Node string
	// TemplateRefresh is how often templates are resent over UDP
	// (DefaultTemplateRefresh).
	TemplateRefresh time.Duration
	// Buffer is how many events may wait for the sender (DefaultBuffer).
	Buffer int
	// Logger receives connection state changes.
	Logger *slog.Logger
	// NetNS is an open file descriptor of the network namespace to
	// export from; 0 means the caller's.
	NetNS int
}

// Stats counts what an Exporter did.
type Stats struct {
	// Sent counts events sent, created and deleted.
	Created, Deleted uint64
	// Dropped counts events not sent: overflow (the buffer was full),
	// down (no connection to the collector), send_error (a write
	// failed), lost (never reached the exporter: the conntrack event
	// socket overran).
	Overflow, Down, SendError, Lost uint64
	// Connects counts connections established, Connected says whether
	// one is up.
	Connects  uint64
	Connected bool
	// Templates counts the times the templates were sent.
	Templates uint64
}

// event is one NAT session event waiting to be sent.
type event struct {
	create   bool
	proto    uint8
	src, dst netip.AddrPort
	xlate    netip.AddrPort
	at       time.Time
	start    time.Time // delete: conntrack's start and stop times
	counters [2]conntrack.Counters
}

// Exporter sends NAT session events. Create it with New.
type Exporter struct {
	cfg    Config
	log    *slog.Logger
	events chan event

	created, deleted, overflow, down, sendError, lost, connects, templates atomic.Uint64
	connected                                                              atomic.Bool

	stop     chan struct{}
	done     chan struct{}
	stopOnce sync.Once
}

// New checks cfg and starts the sender. A collector that cannot be
// reached yet is not an error: the sender keeps trying.
func New(cfg Config) (*Exporter, error) {
	switch cfg.Transport {
	case "udp", "tcp":
	default:
		return nil, fmt.Errorf("transport %q: want udp or tcp", cfg.Transport)
	}
	host, port, err := net.SplitHostPort(cfg.Collector)
	if err != nil || host == "" || port == "" {
		return nil, fmt.Errorf("collector %q: want HOST:PORT", cfg.Collector)
	}
	if cfg.Buffer < 0 || cfg.TemplateRefresh < 0 {
		return nil, errors.New("buffer and template refresh must not be negative")
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = DefaultBuffer
	}
	if cfg.TemplateRefresh == 0 {
		cfg.TemplateRefresh = DefaultTemplateRefresh
	}
	if cfg.ObservationDomain == 0 {
		cfg.ObservationDomain = DomainOf(cfg.Node)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := loadRegistry(); err != nil {
		return nil, err
	}
	e := &Exporter{
		cfg:    cfg,
		log:    cfg.Logger.With("collector", cfg.Collector, "transport", cfg.Transport),
		events: make(chan event, cfg.Buffer),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	go func() {
		// The sender's sockets belong to cfg.NetNS (see netns.Do).
		if err := netns.Do(cfg.NetNS, func() error { e.run(); return nil }); err != nil {
			e.log.Error("IPFIX exporter cannot run", "err", err)
			close(e.done)
		}
	}()
	return e, nil
}

// DomainOf derives an observation domain ID from a node name: FNV-1a, never 0.
func DomainOf(node string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(node))
	if v := h.Sum32(); v != 0 {
		return v
	}
	return 1
}

// Created implements agent.NATExporter: a create event for f.
func (e *Exporter) Created(f *conntrack.Flow) {
	e.queue(event{create: true, proto: f.Proto, src: f.Orig.Src, dst: f.Orig.Dst, xlate: f.Translated(), at: time.Now()})
}

// Deleted implements agent.NATExporter: a delete event for f, with its
// counters and times.
func (e *Exporter) Deleted(f *conntrack.Flow) {
	at := f.Stop
	if at.IsZero() {
		at = time.Now()
	}
	e.queue(event{proto: f.Proto, src: f.Orig.Src, dst: f.Orig.Dst, xlate: f.Translated(), at: at, start: f.Start,
		counters: [2]conntrack.Counters{f.OrigCounters, f.ReplyCounters}})
}

// Lost implements agent.NATExporter: n events lost before reaching it.
func (e *Exporter) Lost(n uint64) { e.lost.Add(n) }

func (e *Exporter) queue(ev event) {
	select {
	case e.events <- ev:
	default:
		e.overflow.Add(1)
	}
}

// Stats returns the counters.
func (e *Exporter) Stats() Stats {
	return Stats{
		Created: e.created.Load(), Deleted: e.deleted.Load(),
		Overflow: e.overflow.Load(), Down: e.down.Load(), SendError: e.sendError.Load(), Lost: e.lost.Load(),
		Connects: e.connects.Load(), Connected: e.connected.Load(), Templates: e.templates.Load(),
	}
}

// Close sends what is queued, if the collector is reachable, and stops
// the sender; it waits at most a few seconds for a stuck connection.
func (e *Exporter) Close() {
	e.stopOnce.Do(func() { close(e.stop) })
	select {
	case <-e.done:
	case <-time.After(closeWait):
		e.log.Warn("IPFIX exporter did not stop in time; events still queued are lost")
	}
}

var (
	registryOnce sync.Once
	registryErr  error
)

func loadRegistry() error {
	registryOnce.Do(func() {
		registry.LoadRegistry()
		for _, name := range elementNames {
			if _, err := registry.GetInfoElement(name, registry.IANAEnterpriseID); err != nil {
				registryErr = fmt.Errorf("IPFIX registry: %w", err)
				return
			}
		}
	})
	return registryErr
}

// sender is the state of the goroutine that owns the connection.
type sender struct {
	e         *Exporter
	ep        *exporter.ExportingProcess
	templates []*template
	batch     map[*template][]entities.Record
	outage    bool // an outage has been logged and not yet ended
	lastTmpl  time.Time
}

func (e *Exporter) run() {
	defer close(e.done)
	s := &sender{e: e, batch: map[*template][]entities.Record{}}
	defer s.disconnect()
	retry := retryMin
	var next time.Time // no connection attempt before this
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if s.ep == nil && !time.Now().Before(next) {
			if err := s.connect(); err != nil {
				if !s.outage {
					s.outage = true
					e.log.Warn("IPFIX collector unreachable; NAT events are dropped and counted until it is back", "err", err)
				}
				next = time.Now().Add(retry)
				retry = min(2*retry, retryMax)
			} else {
				retry = retryMin
			}
		}
		// Wait for the first event of a batch, or for a template
		// refresh, a reconnection attempt, or the end.
		wait := time.Hour
		if s.ep != nil && e.cfg.Transport == "udp" {
			wait = max(0, e.cfg.TemplateRefresh-time.Since(s.lastTmpl))
		}
		if s.ep == nil {
			wait = max(0, time.Until(next))
		}
		timer.Reset(wait)
		select {
		case ev := <-e.events:
			s.add(ev)
			s.gather()
			s.flush()
		case <-timer.C:
			if s.ep != nil && e.cfg.Transport == "udp" {
				s.sendTemplates()
			}
		case <-e.stop:
			for {
				select {
				case ev := <-e.events:
					s.add(ev)
				default:
					s.flush()
					return
				}
			}
		}
	}
}

// gather takes the events that arrive within batchWait, up to one
// message's worth per template.
func (s *sender) gather() {
	deadline := time.NewTimer(batchWait)
	defer deadline.Stop()
	for n := 1; n < 256; n++ {
		select {
		case ev := <-s.e.events:
			s.add(ev)
		case <-deadline.C:
			return
		case <-s.e.stop:
			return
		}
	}
}

// connect opens the exporting process and sends the templates.
func (s *sender) connect() error {
	e := s.e
	ep, err := exporter.InitExportingProcess(exporter.ExporterInput{
		CollectorAddress:    e.cfg.Collector,
		CollectorProtocol:   e.cfg.Transport,
		ObservationDomainID: e.cfg.ObservationDomain,
		// The sender resends templates itself, on its own goroutine:
		// the library's refresh goroutine would write the connection
		// and its sequence number concurrently with the sender.
		TempRefTimeout:    1 << 30,
		MaxMsgSize:        maxMessage(e.cfg.Transport),
		CheckConnInterval: time.Second,
	})
	if err != nil {
		return err
	}
	s.ep = ep
	if s.templates == nil {
		for _, kind := range templateKinds {
			s.templates = append(s.templates, newTemplate(ep.NewTemplateID(), kind))
		}
	}
	if err := s.sendTemplates(); err != nil && e.cfg.Transport == "tcp" {
		s.disconnect()
		return err
	}
	// Over UDP a refused datagram (no collector listening yet) leaves
	// the socket usable: the next refresh sends the templates again.
	e.connects.Add(1)
	e.connected.Store(true)
	if s.outage {
		e.log.Info("IPFIX collector reachable again")
	} else {
		e.log.Info("IPFIX exporter connected", "observationDomain", e.cfg.ObservationDomain)
	}
	s.outage = false
	return nil
}

func maxMessage(transport string) int {
	if transport == "tcp" {
		return entities.MaxSocketMsgSize
	}
	return DefaultMaxMessage
}

func (s *sender) disconnect() {
	if s.ep != nil {
		s.ep.CloseConnToCollector()
		s.ep = nil
	}
	s.e.connected.Store(false)
}

// sendTemplates sends every template in one message.
func (s *sender) sendTemplates() error {
	s.lastTmpl = time.Now()
	set := entities.NewSet(false)
	if err := set.PrepareSet(entities.Template, entities.TemplateSetID); err != nil {
		return err
	}
	for _, t := range s.templates {
		els := make([]entities.InfoElementWithValue, len(t.elements))
		for i, ie := range t.elements {
			var err error
			if els[i], err = entities.DecodeAndCreateInfoElementWithValue(ie, nil); err != nil {
				return err
			}
		}
		if err := set.AddRecord(els, t.id); err != nil {
			return err
		}
	}
	if _, err := s.ep.SendSet(set); err != nil {
		s.failed(err)
		return err
	}
	s.e.templates.Add(1)
	return nil
}

// add encodes ev into the batch of its template; without a connection it
// is counted as lost at once.
func (s *sender) add(ev event) {
	if s.ep == nil {
		s.e.down.Add(1)
		return
	}
	t := s.templateFor(ev)
	s.batch[t] = append(s.batch[t], t.record(&ev))
}

// templateFor returns ev's template; the templates exist once connected.
func (s *sender) templateFor(ev event) *template {
	k := templateKind{v6: !ev.src.Addr().Unmap().Is4(), delete: !ev.create}
	for _, t := range s.templates {
		if t.kind == k {
			return t
		}
	}
	panic("ipfix: no template for an event")
}

// flush sends the batched records, one message per template and size.
func (s *sender) flush() {
	for t, recs := range s.batch {
		if len(recs) == 0 {
			continue
		}
		n := uint64(len(recs))
		switch {
		case s.ep == nil:
			s.e.down.Add(n)
		default:
			sent, _, err := s.ep.SendDataRecords(t.id, recs, nil)
			s.count(t, uint64(sent))
			if err != nil {
				s.e.sendError.Add(n - uint64(sent))
				s.failed(err)
			} else if s.outage {
				s.outage = false
				s.e.log.Info("IPFIX collector reachable again")
			}
		}
		clear(recs)
		s.batch[t] = recs[:0]
	}
}

func (s *sender) count(t *template, n uint64) {
	if t.kind.delete {
		s.e.deleted.Add(n)
	} else {
		s.e.created.Add(n)
	}
}

// failed handles a write error: over TCP the connection is gone and is
// reopened; over UDP an error says the collector refused a datagram (it
// is down), and the socket stays usable.
func (s *sender) failed(err error) {
	if !s.outage {
		s.outage = true
		s.e.log.Warn("IPFIX collector write failed; NAT events are dropped and counted until it is back", "err", err)
	}
	if s.e.cfg.Transport == "tcp" {
		s.disconnect()
	}
}

var (
	descEvents    = prometheus.NewDesc("nfmasq_ipfix_events_total", "NAT session events sent to the IPFIX collector, by event (create, delete).", []string{"event"}, nil)
	descDropped   = prometheus.NewDesc("nfmasq_ipfix_dropped_total", "NAT session events not sent, by reason: overflow (buffer full), down (no connection), send_error (a write failed), lost (conntrack event socket overrun).", []string{"reason"}, nil)
	descConnected = prometheus.NewDesc("nfmasq_ipfix_connected", "1 while the exporter has a connection to the IPFIX collector (over UDP: a socket, whether or not a collector listens).", nil, nil)
	descConnects  = prometheus.NewDesc("nfmasq_ipfix_connects_total", "Connections made to the IPFIX collector (each after the first follows an outage).", nil, nil)
	descTemplates = prometheus.NewDesc("nfmasq_ipfix_template_sends_total", "Times the templates were sent (at each connection, and every template refresh over UDP).", nil, nil)
)

// Describe implements prometheus.Collector.
func (e *Exporter) Describe(ch chan<- *prometheus.Desc) {
	ch <- descEvents
	ch <- descDropped
	ch <- descConnected
	ch <- descConnects
	ch <- descTemplates
}

// Collect implements prometheus.Collector.
func (e *Exporter) Collect(ch chan<- prometheus.Metric) {
	s := e.Stats()
	ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(s.Created), "create")
	ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(s.Deleted), "delete")
	for _, d := range []struct {
		reason string
		n      uint64
	}{{"overflow", s.Overflow}, {"down", s.Down}, {"send_error", s.SendError}, {"lost", s.Lost}} {
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(d.n), d.reason)
	}
	connected := 0.0
	if s.Connected {
		connected = 1
	}
	ch <- prometheus.MustNewConstMetric(descConnected, prometheus.GaugeValue, connected)
	ch <- prometheus.MustNewConstMetric(descConnects, prometheus.CounterValue, float64(s.Connects))
	ch <- prometheus.MustNewConstMetric(descTemplates, prometheus.CounterValue, float64(s.Templates))
}
