package queue

import "encoding/binary"

// Netlink and nfnetlink_queue constants for verdict messages
// (linux/netlink.h, linux/netfilter/nfnetlink_queue.h). They are plain
// numbers, kept here so that the encoding is testable on any platform.
const (
	nlmsgHdrLen     = 16
	nlmFRequest     = 0x1
	nfqnlMsgVerdict = 1
	// nfqnlMsgVerdictBatch applies one verdict (and mark) to every packet
	// of the queue up to the given id.
	nfqnlMsgVerdictBatch = 3
	nfqaVerdictHdr       = 2
	nfqaMark             = 3
	nfAccept             = 1
	subsysQueueShift     = 3 << 8 // NFNL_SUBSYS_QUEUE in the message type's high byte
	// verdictLen is the longest message appendVerdict writes.
	verdictLen = nlmsgHdrLen + 4 + 12 + 8
)

// appendVerdict appends an NF_ACCEPT verdict message for packet id of
// queue num, with NFQA_MARK when setMark. Netlink headers are in host byte
// order, nfnetlink payloads in network byte order.
func appendVerdict(b []byte, num uint16, id, mark uint32, setMark bool) []byte {
	return appendVerdictMsg(b, nfqnlMsgVerdict, num, id, mark, setMark)
}

// appendBatchVerdict appends an NF_ACCEPT verdict, with NFQA_MARK when
// setMark, for every packet of queue num up to and including id.
func appendBatchVerdict(b []byte, num uint16, id, mark uint32, setMark bool) []byte {
	return appendVerdictMsg(b, nfqnlMsgVerdictBatch, num, id, mark, setMark)
}

func appendVerdictMsg(b []byte, typ uint16, num uint16, id, mark uint32, setMark bool) []byte {
	n := uint32(nlmsgHdrLen + 4 + 12)
	if setMark {
		n += 8
	}
	b = binary.NativeEndian.AppendUint32(b, n)
	b = binary.NativeEndian.AppendUint16(b, subsysQueueShift|typ)
	b = binary.NativeEndian.AppendUint16(b, nlmFRequest)
	b = binary.NativeEndian.AppendUint32(b, 0) // sequence
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel fills in ours
	b = append(b, 0, 0)                        // nfgenmsg: AF_UNSPEC, NFNETLINK_V0
	b = binary.BigEndian.AppendUint16(b, num)
	b = binary.NativeEndian.AppendUint16(b, 12)
	b = binary.NativeEndian.AppendUint16(b, nfqaVerdictHdr)
	b = binary.BigEndian.AppendUint32(b, nfAccept)
	b = binary.BigEndian.AppendUint32(b, id)
	if setMark {
		b = binary.NativeEndian.AppendUint16(b, 8)
		b = binary.NativeEndian.AppendUint16(b, nfqaMark)
		b = binary.BigEndian.AppendUint32(b, mark)
	}
	return b
}
