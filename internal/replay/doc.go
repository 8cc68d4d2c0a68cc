// Package replay decides the flows of a packet capture offline, with the
// code the agent runs on its queue: link header stripped here, IP decoded
// by queue/packet, flows keyed by packet.FlowKey, each new flow decided by
// (*nat.Policy).Decide. It backs `nfmasq replay` and the offline replay
// benchmark.
//
// A Reader yields the records of a pcap or pcapng file (gopacket's pcapgo,
// told apart by the magic number) with their link types; IPPacket strips
// the Ethernet (with VLAN tags), Linux cooked v1 and v2, loopback and raw
// link headers. Records of other link types, and records that carry no
// decodable IP packet, are counted as skipped by reason, so that every
// record read is accounted for: records = ip_packets + sum(skipped).
//
// Flows are one-directional, as in the agent's queue: a reply seen in the
// capture is a flow of its own, decided by its own destination (Options.
// PodCIDRs leaves out what does not come from a pod, as the queue rule
// does). Later IP fragments carry no ports, so they form a flow of their
// own with ports 0, to the same destination and so with the same
// decision; the kernel reassembles before the queue, so the agent never
// sees them apart.
//
// # Cost
//
// Once a flow has been seen, replaying another of its packets reads,
// strips, decodes and looks up one map entry without allocating. New flows
// allocate their map entry, and their flow record when a log is written.
//
// # Concurrency and ownership
//
// A Replayer and a Reader belong to one goroutine at a time. The bytes a
// Reader returns are its own and valid until the next call to Next;
// Replayer.Record does not retain what it is given. The *nat.Policy is
// shared read-only, as in the agent. Malformed input never panics: it is
// counted, and a damaged record ends the capture with the reason in the
// Summary.
package replay
