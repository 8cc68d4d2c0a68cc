package flowlog

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Defaults for Options fields left zero.
const (
	DefaultBuffer        = 16384
	DefaultMaxFileMB     = 100
	DefaultMaxFiles      = 5
	DefaultCheckInterval = time.Second
	DefaultLinger        = 10 * time.Millisecond
	DefaultCloseTimeout  = 5 * time.Second
)

// batchBytes bounds one write to the sink: large enough to amortise the
// system call, small enough that a failed write loses few records and
// that lumberjack never refuses it (its minimum file size is 1 MB).
const batchBytes = 64 << 10

// Options configure a Logger.
type Options struct {
	// Sink is where records go (see ParseSink).
	Sink Sink
	// Writer, when set, receives the records instead of Sink. The Logger
	// never closes it. For tests and for embedding.
	Writer io.Writer
	// Node is written in every record that does not name one.
	Node string
	// Buffer is how many records may wait for the writer (DefaultBuffer).
	Buffer int
	// Sample keeps one decision record in Sample (0 and 1 keep all).
	// Flow-end, fallback and gap records are never sampled.
	Sample uint32
	// Ceiling caps the records per second reaching the buffer, with a
	// burst of one second's worth; 0 means no ceiling.
	Ceiling int
	// MaxFileMB is the size at which a file sink rotates (DefaultMaxFileMB).
	MaxFileMB int
	// MaxFiles is how many rotated files a file sink keeps (DefaultMaxFiles).
	MaxFiles int
	// Compress gzips a file sink's rotated files.
	Compress bool
	// Linger is how long a busy writer lets records gather before it
	// writes them (DefaultLinger): records reach the sink at most this
	// late, and the dataplane never wakes the writer while it is busy.
	Linger time.Duration
	// CheckInterval is how often an idle writer looks for losses to report
	// and whether the log file was deleted (DefaultCheckInterval).
	CheckInterval time.Duration
	// CloseTimeout bounds how long Close waits for a stalled sink
	// (DefaultCloseTimeout).
	CloseTimeout time.Duration
}

// Stats is a snapshot of a Logger's counters, for metrics.
type Stats struct {
	// Written counts records written to the sink, by kind.
	Written [NumKinds]uint64
	// Dropped counts records not written, by reason and kind. A gap record
	// that fails to write is not counted: it is retried until written. One
	// written to a file later found deleted is (ReasonFileDeleted), so the
	// next gap record says that an earlier one was lost.
	Dropped [NumReasons][NumKinds]uint64
	// WriteErrors counts failed writes to the sink (each may hold many records).
	WriteErrors uint64
	// LastWriteError is the text of the most recent write error, if any.
	LastWriteError string
	// Buffered is the number of records waiting for the writer.
	Buffered int
}

// Lost returns the number of records of kind k that are a hole in the trail.
func (s *Stats) Lost(k Kind) uint64 {
	var n uint64
	for r := range Reason(NumReasons) {
		if r.Lost() {
			n += s.Dropped[r][k]
		}
	}
	return n
}

// Logger sends records to a sink through a bounded buffer. See the package
// documentation for its concurrency guarantees.
type Logger struct {
	off     bool
	node    string
	sample  uint64
	limiter *rate.Limiter

	// Records are encoded by the producer, under bufMu, into pending,
	// which the writer swaps for an empty one once per batch: a producer
	// pays one short lock and the encoding (no copy of the Record, which
	// the writer, often on another CPU, would read back), and the writer
	// only writes bytes. wake (capacity 1) tells an idle writer that
	// pending is no longer empty.
	bufMu   sync.Mutex
	pending batch
	enc     encoder // its time cache; used under bufMu
	limit   int     // most records pending
	wake    chan struct{}

	// mu orders Log against Close: Log holds it shared while it sends, so
	// once Close holds it exclusively no record can slip into the buffer
	// unseen by the final drain.
	mu     sync.RWMutex
	closed bool

	decisions   atomic.Uint64
	dropped     [NumReasons][NumKinds]atomic.Uint64
	written     [NumKinds]atomic.Uint64
	writeErrors atomic.Uint64
	lastErr     atomic.Pointer[string]

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error

	w w
}

// w is the writer goroutine's state, touched by no other goroutine until
// it has exited.
type w struct {
	sink         io.Writer
	closer       io.Closer
	file         string // path of a file sink, checked for deletion
	checkEvery   time.Duration
	linger       time.Duration
	closeTimeout time.Duration

	spare batch  // the pending batch of the last swap, emptied
	line  []byte // a gap record being written
	// partial is set when a failed write left half a line in the sink; the
	// next write starts with a newline so the following records parse.
	partial bool
	// reported is the loss already described by gap records.
	reported [NumReasons][NumKinds]uint64
	// clean is the last time the writer saw no unreported loss: the start
	// of the next gap's interval.
	clean time.Time
	// sinceCheck counts records written to the file since it was last seen
	// to exist, by kind.
	sinceCheck [NumKinds]uint64
}

// batch is encoded records, one per line, and where each line ends.
type batch struct {
	buf  []byte
	ends []lineEnd
}

type lineEnd struct {
	end  int
	kind Kind
}

// New starts a Logger and its writer goroutine. Call Close to stop it.
func New(opts Options) (*Logger, error) {
	l := &Logger{node: opts.Node}
	if opts.Writer == nil && opts.Sink.Kind == SinkOff {
		l.off = true
		return l, nil
	}
	if opts.Buffer < 0 || opts.Ceiling < 0 || opts.MaxFileMB < 0 || opts.MaxFiles < 0 || opts.CheckInterval < 0 || opts.Linger < 0 || opts.CloseTimeout < 0 {
		return nil, errors.New("flow log options must not be negative")
	}
	l.w.checkEvery = orDefault(opts.CheckInterval, DefaultCheckInterval)
	l.w.linger = orDefault(opts.Linger, DefaultLinger)
	l.w.closeTimeout = orDefault(opts.CloseTimeout, DefaultCloseTimeout)
	opts.MaxFileMB = orDefault(opts.MaxFileMB, DefaultMaxFileMB)
	opts.MaxFiles = orDefault(opts.MaxFiles, DefaultMaxFiles)
	if opts.Writer != nil {
		l.w.sink = opts.Writer
	} else {
		sink, closer, err := openSink(opts.Sink, &opts)
		if err != nil {
			return nil, err
		}
		l.w.sink, l.w.closer = sink, closer
		if opts.Sink.Kind == SinkFile {
			l.w.file = opts.Sink.Path
		}
	}
	if opts.Sample > 1 {
		l.sample = uint64(opts.Sample)
	}
	if opts.Ceiling > 0 {
		l.limiter = rate.NewLimiter(rate.Limit(opts.Ceiling), opts.Ceiling)
	}
	l.limit = orDefault(opts.Buffer, DefaultBuffer)
	l.wake = make(chan struct{}, 1)
	l.w.line = make([]byte, 0, 1024)
	l.w.clean = time.Now()
	l.stop = make(chan struct{})
	l.done = make(chan struct{})
	go l.run()
	return l, nil
}

func orDefault[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Off reports whether the Logger discards every record (SinkOff).
func (l *Logger) Off() bool { return l.off }

// Log encodes r into the buffer and returns at once. It never blocks, and does
// not allocate once the buffer has grown to its working size: when the
// record is sampled out, over the ceiling or finds the buffer full, it is
// counted as dropped instead. Records of kind
// KindGap or of unknown kinds are ignored: gap records are the Logger's own.
func (l *Logger) Log(r Record) {
	if l.off || r.Kind == KindGap || r.Kind >= NumKinds {
		return
	}
	if r.Kind == KindDecision && l.sample > 1 {
		if (l.decisions.Add(1)-1)%l.sample != 0 {
			l.dropped[ReasonSampled][r.Kind].Add(1)
			return
		}
		r.Sample = uint32(l.sample)
	}
	if l.limiter != nil && !l.limiter.Allow() {
		l.dropped[ReasonRateLimit][r.Kind].Add(1)
		return
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	l.mu.RLock()
	if l.closed {
		l.mu.RUnlock()
		l.dropped[ReasonClosed][r.Kind].Add(1)
		return
	}
	if r.Node == "" {
		r.Node = l.node
	}
	l.bufMu.Lock()
	n := len(l.pending.ends)
	if n < l.limit {
		l.pending.buf = l.enc.appendJSON(l.pending.buf, &r)
		l.pending.ends = append(l.pending.ends, lineEnd{end: len(l.pending.buf), kind: r.Kind})
	}
	l.bufMu.Unlock()
	l.mu.RUnlock()
	switch {
	case n == l.limit:
		l.dropped[ReasonOverflow][r.Kind].Add(1)
	case n == 0:
		// The first pending record: wake the writer if it sleeps. While
		// it lingers, it drains on its timer and this token waits.
		select {
		case l.wake <- struct{}{}:
		default:
		}
	}
}

// take swaps the pending records for spare (emptied) and returns them.
func (l *Logger) take(spare batch) batch {
	l.bufMu.Lock()
	b := l.pending
	l.pending = batch{buf: spare.buf[:0], ends: spare.ends[:0]}
	l.bufMu.Unlock()
	return b
}

// ReportLost counts n records of kind k lost elsewhere for reason r (the
// conntrack listener's overruns, for instance), so that the next gap record
// reports them. It never blocks.
func (l *Logger) ReportLost(r Reason, k Kind, n uint64) {
	if l.off || r >= NumReasons || k >= NumKinds {
		return
	}
	l.dropped[r][k].Add(n)
}

// Stats returns a snapshot of the counters.
func (l *Logger) Stats() Stats {
	var s Stats
	if l.off {
		return s
	}
	for k := range Kind(NumKinds) {
		s.Written[k] = l.written[k].Load()
		for r := range Reason(NumReasons) {
			s.Dropped[r][k] = l.dropped[r][k].Load()
		}
	}
	s.WriteErrors = l.writeErrors.Load()
	if p := l.lastErr.Load(); p != nil {
		s.LastWriteError = *p
	}
	l.bufMu.Lock()
	s.Buffered = len(l.pending.ends)
	l.bufMu.Unlock()
	return s
}

// Close stops accepting records, writes what is buffered and a last gap
// record if anything was lost, and closes the sink. If the sink does not
// drain within Options.CloseTimeout, Close counts what is still buffered
// as dropped (ReasonClosed) and returns an error; the writer goroutine
// then stays blocked in the sink's Write until it returns.
func (l *Logger) Close() error {
	if l.off {
		return nil
	}
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
		close(l.stop)
		timer := time.NewTimer(l.w.closeTimeout)
		defer timer.Stop()
		select {
		case <-l.done:
			if l.w.closer != nil {
				l.closeErr = l.w.closer.Close()
			}
		case <-timer.C:
			// The writer is stuck in the sink; what it has not taken
			// is lost.
			b := l.take(batch{})
			for _, e := range b.ends {
				l.dropped[ReasonClosed][e.kind].Add(1)
			}
			n := len(b.ends)
			l.closeErr = fmt.Errorf("flow log sink did not drain in %v: %d buffered records dropped", l.w.closeTimeout, n)
		}
	})
	return l.closeErr
}

func (l *Logger) run() {
	defer close(l.done)
	tick := time.NewTicker(l.w.checkEvery)
	defer tick.Stop()
	// While records keep coming, the writer drains the buffer on a timer
	// instead of waking for each record: a producer's send then never
	// wakes a goroutine, which on a busy node would compete with the
	// dataplane for the CPU at every decision. When a timer tick finds
	// the buffer empty, the writer goes back to blocking on it, so an idle
	// agent has no periodic wake-ups.
	linger := time.NewTimer(0)
	<-linger.C
	var drain <-chan time.Time // nil: idle, wait for a wake-up
	for {
		var wake <-chan struct{}
		if drain == nil {
			wake = l.wake
		}
		select {
		case <-wake:
			l.drainAll()
			linger.Reset(l.w.linger)
			drain = linger.C
		case <-drain:
			if l.drainAll() {
				linger.Reset(l.w.linger)
			} else {
				drain = nil
			}
		case <-tick.C:
			l.checkFile()
			l.writeGap()
		case <-l.stop:
			l.drainAll()
			l.checkFile()
			l.writeGap()
			return
		}
	}
}

// drainAll writes every pending record, in writes of about batchBytes,
// and reports whether there was any.
func (l *Logger) drainAll() bool {
	b := l.take(l.w.spare)
	// Write in pieces of at most batchBytes that end at a line end.
	from, start := 0, 0
	for i, e := range b.ends {
		if e.end-start > batchBytes && i > from {
			l.flush(b.buf[start:b.ends[i-1].end], start, b.ends[from:i])
			from, start = i, b.ends[i-1].end
		}
	}
	if from < len(b.ends) {
		l.flush(b.buf[start:], start, b.ends[from:])
		l.writeGap()
	}
	l.w.spare = b
	return len(b.ends) > 0
}

// flush writes out, the lines ends (offsets from base) of a batch, and
// counts each line written or lost.
func (l *Logger) flush(out []byte, base int, ends []lineEnd) {
	if l.w.partial {
		// A failed write left half a line: end it, so the records
		// that follow parse.
		if _, err := l.write([]byte{'\n'}); err != nil {
			for _, e := range ends {
				l.dropped[ReasonWriteError][e.kind].Add(1)
			}
			return
		}
	}
	n, _ := l.write(out)
	for _, e := range ends {
		if e.end-base <= n {
			l.written[e.kind].Add(1)
			l.w.sinceCheck[e.kind]++
		} else {
			l.dropped[ReasonWriteError][e.kind].Add(1)
		}
	}
}

// write writes p to the sink and records the outcome of the call.
func (l *Logger) write(p []byte) (int, error) {
	n, err := l.w.sink.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		l.writeErrors.Add(1)
		msg := err.Error()
		l.lastErr.Store(&msg)
		if n > 0 {
			l.w.partial = p[n-1] != '\n'
		}
		return n, err
	}
	l.w.partial = false
	return n, nil
}

// writeGap writes a gap record if losses happened since the last one. A
// gap record that cannot be written is not lost: the next attempt reports
// the same losses and more, over a longer interval.
func (l *Logger) writeGap() {
	now := time.Now()
	var cur [NumReasons][NumKinds]uint64
	changed := false
	for r := range Reason(NumReasons) {
		if !r.Lost() || r == ReasonClosed {
			continue
		}
		for k := range Kind(NumKinds) {
			cur[r][k] = l.dropped[r][k].Load()
			changed = changed || cur[r][k] != l.w.reported[r][k]
		}
	}
	if !changed {
		l.w.clean = now
		return
	}
	gap := Gap{Start: l.w.clean, End: now}
	for r := range Reason(NumReasons) {
		for k := range Kind(NumKinds) {
			gap.Dropped[r][k] = cur[r][k] - l.w.reported[r][k]
		}
	}
	rec := Record{Kind: KindGap, Time: now, Node: l.node, Gap: &gap}
	line := l.w.line[:0]
	if l.w.partial {
		line = append(line, '\n')
	}
	line = AppendJSON(line, &rec)
	l.w.line = line
	if _, err := l.write(line); err != nil {
		return
	}
	l.written[KindGap].Add(1)
	l.w.sinceCheck[KindGap]++
	l.w.reported = cur
	l.w.clean = now
}

// checkFile notices a log file deleted under the writer, which would
// otherwise swallow every later record into an unlinked inode: the records
// written since the file was last seen are counted as lost and the file is
// reopened.
func (l *Logger) checkFile() {
	if l.w.file == "" {
		return
	}
	_, err := os.Stat(l.w.file)
	if !errors.Is(err, fs.ErrNotExist) {
		l.w.sinceCheck = [NumKinds]uint64{}
		return
	}
	for k, n := range l.w.sinceCheck {
		if n > 0 {
			l.dropped[ReasonFileDeleted][k].Add(n)
		}
	}
	l.w.sinceCheck = [NumKinds]uint64{}
	if r, ok := l.w.sink.(interface{ Rotate() error }); ok {
		if err := r.Rotate(); err != nil {
			l.writeErrors.Add(1)
			msg := err.Error()
			l.lastErr.Store(&msg)
		}
	}
}
