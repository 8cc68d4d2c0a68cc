package replay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Format is a capture file format.
type Format uint8

// Capture formats NewReader recognises by their magic number.
const (
	// PCAP is libpcap's classic format, in either byte order, with
	// microsecond or nanosecond timestamps, optionally gzip-compressed.
	PCAP Format = iota + 1
	// PCAPNG is the pcap next-generation format.
	PCAPNG
)

// String returns "pcap" or "pcapng".
func (f Format) String() string {
	switch f {
	case PCAP:
		return "pcap"
	case PCAPNG:
		return "pcapng"
	}
	return "unknown"
}

// ErrTruncated says that a capture ends inside a record or a header: the
// writer was interrupted, or the file was cut. Test for it with errors.Is.
var ErrTruncated = errors.New("capture ends inside a record")

// ErrUnknownFormat says that a file starts with neither a pcap nor a pcapng
// magic number.
var ErrUnknownFormat = errors.New("not a pcap or pcapng capture")

// Magic numbers, as the first four bytes of the file read big-endian.
const (
	magicPCAPMicro   = 0xa1b2c3d4
	magicPCAPNano    = 0xa1b23c4d
	magicPCAPMicroLE = 0xd4c3b2a1
	magicPCAPNanoLE  = 0x4d3cb2a1
	magicPCAPNG      = 0x0a0d0d0a
	magicGzip        = 0x1f8b // first two bytes only
)

// readBufferSize is the Reader's buffer: large enough that refilling it is
// rare next to the per-record work.
const readBufferSize = 64 << 10

// Reader yields the records of a pcap or pcapng capture with their link
// types. It reads through gopacket's pcapgo, without allocating per record
// once its buffer has grown to the largest record.
type Reader struct {
	pcap   *pcapgo.Reader
	ng     *pcapgo.NgReader
	format Format
	err    error
}

// NewReader reads the capture's file header from r and returns a Reader
// for its records. A header that is missing, cut short or not a capture is
// an error (ErrUnknownFormat, ErrTruncated, or pcapgo's own).
func NewReader(r io.Reader) (*Reader, error) {
	// pcapgo wraps its input in a bufio.Reader unless it already is one of
	// at least the default size; handing it ours lets the magic be peeked
	// at without a second layer of buffering on every record.
	br := bufio.NewReaderSize(r, readBufferSize)
	magic, err := br.Peek(4)
	switch {
	case len(magic) == 0 && errors.Is(err, io.EOF):
		return nil, errors.New("empty file: no capture header")
	case errors.Is(err, io.EOF):
		return nil, fmt.Errorf("capture header: %w", ErrTruncated)
	case err != nil:
		return nil, fmt.Errorf("capture header: %w", err)
	}
	full := br

	rd := &Reader{}
	switch m := binary.BigEndian.Uint32(magic); {
	case m == magicPCAPMicro, m == magicPCAPNano, m == magicPCAPMicroLE, m == magicPCAPNanoLE, m>>16 == magicGzip:
		rd.format = PCAP
		rd.pcap, err = pcapgo.NewReader(full)
	case m == magicPCAPNG:
		rd.format = PCAPNG
		// Mixed link types: a pcapng file may hold several interfaces, and
		// every record is replayed with its own interface's type.
		rd.ng, err = pcapgo.NewNgReader(full, pcapgo.NgReaderOptions{WantMixedLinkType: true})
	default:
		return nil, fmt.Errorf("%w (magic %#08x)", ErrUnknownFormat, m)
	}
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			err = ErrTruncated
		}
		return nil, fmt.Errorf("%s header: %w", rd.format, err)
	}
	return rd, nil
}

// Format returns the capture's format.
func (r *Reader) Format() Format { return r.format }

// Next returns the next record: its link type and its bytes as captured.
// data is owned by the Reader and valid only until the next call. At the
// end of a well-formed capture Next returns io.EOF. A capture that ends
// inside a record gives an error wrapping ErrTruncated, and an
// inconsistent record another error; either ends the capture, and Next
// then keeps returning that error, because pcap has no way to find the
// next record boundary.
func (r *Reader) Next() (lt layers.LinkType, data []byte, err error) {
	if r.err != nil {
		return 0, nil, r.err
	}
	if r.pcap != nil {
		data, ci, err := r.pcap.ZeroCopyReadPacketData()
		if err == nil {
			return r.pcap.LinkType(), data, nil
		}
		// A complete record header followed by no data also reads as
		// io.EOF; only a clean end has no record header at all.
		if err == io.EOF && ci.CaptureLength == 0 && ci.Length == 0 {
			r.err = io.EOF
		} else {
			r.err = recordError(err)
		}
		return 0, nil, r.err
	}
	data, ci, err := r.ng.ZeroCopyReadPacketData()
	if err != nil {
		// NgReader returns io.EOF only at a block boundary.
		if err == io.EOF {
			r.err = io.EOF
		} else {
			r.err = recordError(err)
		}
		return 0, nil, r.err
	}
	if len(ci.AncillaryData) > 0 {
		if t, ok := ci.AncillaryData[0].(layers.LinkType); ok {
			lt = t
		}
	}
	return lt, data, nil
}

func recordError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("read record: %w", ErrTruncated)
	}
	return fmt.Errorf("read record: %w", err)
}
