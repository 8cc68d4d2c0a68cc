package queue

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// ProcStatsPath is where the kernel reports its NFQUEUE instances for the
// network namespace of the reading thread's process. Inside another
// namespace, read /proc/thread-self/net/netfilter/nfnetlink_queue from a
// thread switched into it.
const ProcStatsPath = "/proc/net/netfilter/nfnetlink_queue"

// ProcStats is one line of ProcStatsPath: the kernel's own counters for a
// bound queue.
type ProcStats struct {
	// QueueNum is the queue number.
	QueueNum uint16
	// PortID is the netlink port of the bound listener.
	PortID uint32
	// QueueTotal is how many packets wait for a verdict right now.
	QueueTotal uint32
	// CopyMode is 0 (none), 1 (metadata) or 2 (packet).
	CopyMode uint8
	// CopyRange is how many bytes of each packet are copied.
	CopyRange uint32
	// QueueDropped counts packets dropped because the queue was full and
	// fail-open was off. With fail-open on, overflowing packets are
	// accepted unmarked and counted nowhere by the kernel.
	QueueDropped uint32
	// UserDropped counts packets the kernel could not deliver to the
	// socket (receive buffer full) with fail-open off.
	UserDropped uint32
	// IDSequence is the last packet id handed out: every packet that got
	// as far as delivery, including those the socket then refused.
	IDSequence uint32
}

// ReadProcStats parses the format of ProcStatsPath: nine whitespace
// separated unsigned fields per queue, the last being a constant 1.
// Blank lines are ignored; any other deviation is an error naming the line.
func ReadProcStats(r io.Reader) ([]ProcStats, error) {
	var out []ProcStats
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 8 {
			return nil, fmt.Errorf("nfnetlink_queue line %d: %d fields, want at least 8", line, len(f))
		}
		var v [8]uint64
		for i, bits := range [8]int{16, 32, 32, 8, 32, 32, 32, 32} {
			n, err := strconv.ParseUint(f[i], 10, bits)
			if err != nil {
				return nil, fmt.Errorf("nfnetlink_queue line %d field %d: %w", line, i+1, err)
			}
			v[i] = n
		}
		out = append(out, ProcStats{
			QueueNum:     uint16(v[0]),
			PortID:       uint32(v[1]),
			QueueTotal:   uint32(v[2]),
			CopyMode:     uint8(v[3]),
			CopyRange:    uint32(v[4]),
			QueueDropped: uint32(v[5]),
			UserDropped:  uint32(v[6]),
			IDSequence:   uint32(v[7]),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading nfnetlink_queue: %w", err)
	}
	return out, nil
}
