// Package ipfixtest runs IPFIX collectors nobody here wrote (goflow2,
// nfdump's nfcapd, pmacct's nfacctd, tshark on a capture) inside a test's network
// namespaces and reads back the NAT events they decoded, for the
// exporter's tests and the agent's.
package ipfixtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nfmasq/nfmasq/internal/netns"
	"github.com/nfmasq/nfmasq/internal/netnstest"
)

// NAT event values (as internal/ipfix sends them).
const (
	nat44Delete = 5
	createV6    = 1
	deleteV6    = 2
)

// Event is one decoded NAT event, as a collector saw it.
type Event struct {
	NatEvent uint8
	Proto    uint8
	Src, Dst netip.AddrPort
	Xlate    netip.AddrPort
	Bytes    uint64 // octetDeltaCount, on delete events (0 when not decoded)
}

func (e Event) String() string {
	return fmt.Sprintf("event=%d proto=%d %v->%v xlate=%v bytes=%d", e.NatEvent, e.Proto, e.Src, e.Dst, e.Xlate, e.Bytes)
}

func Sort(evs []Event) []Event {
	slices.SortFunc(evs, func(a, b Event) int { return strings.Compare(a.String(), b.String()) })
	return evs
}

// listening waits until something in ns listens on proto port.
func Listening(t *testing.T, ns *netns.NS, proto string, port int) {
	t.Helper()
	flag := "-Hlun"
	if proto == "tcp" {
		flag = "-Hltn"
	}
	netnstest.Poll(t, 20*time.Second, 10*time.Millisecond, fmt.Sprintf("a collector listening on %s port %d", proto, port), func() bool {
		out, err := ns.Try("ss", flag, fmt.Sprintf("sport = :%d", port))
		return err == nil && strings.TrimSpace(out) != ""
	})
}

// daemon is a collector process started in a namespace.
type Daemon struct {
	cmd    *exec.Cmd
	output netnstest.Buffer // written by the process, read by the test
	done   chan struct{}
}

func StartDaemon(t *testing.T, ns *netns.NS, args ...string) *Daemon {
	t.Helper()
	d := &Daemon{cmd: ns.Command(context.Background(), args...), done: make(chan struct{})}
	d.cmd.Stdout, d.cmd.Stderr = &d.output, &d.output
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() { d.Stop(t) })
	return d
}

// stop ends the daemon with SIGINT (collectors flush their files on it)
// and waits for it.
// Output returns what the daemon printed so far.
func (d *Daemon) Output() string { return d.output.String() }

// Stop ends the daemon with SIGINT and waits for it.
func (d *Daemon) Stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		t.Errorf("%v did not stop on SIGINT:\n%s", d.cmd.Args, d.output.String())
	}
}

func CheckEvents(t *testing.T, who string, got, wanted []Event) {
	t.Helper()
	got = Sort(got)
	if !slices.Equal(got, wanted) {
		t.Errorf("%s decoded %d events, want %d:\ngot:\n%v\nwant:\n%v", who, len(got), len(wanted), got, wanted)
	}
}

// num reads a JSON number, or a number in a string (nfdump writes some
// fields as strings).
func num(v any) float64 {
	switch x := v.(type) {
	case float64:
		return x
	case string:
		f, _ := strconv.ParseFloat(x, 64)
		return f
	}
	return -1
}

func addrPort(a, p any) netip.AddrPort {
	s, _ := a.(string)
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(num(p)))
}

// goflow2Mapping maps the NAT elements goflow2 does not decode by default.
const goflow2Mapping = `formatter:
  fields: [type, src_addr, dst_addr, src_port, dst_port, proto, bytes, nat_event, post_nat_src_addr, post_nat_src_port, observation_time_ms]
  protobuf:
    - {name: nat_event, index: 1001, type: varint}
    - {name: post_nat_src_addr, index: 1002, type: string}
    - {name: post_nat_src_port, index: 1003, type: varint}
    - {name: observation_time_ms, index: 1004, type: varint}
  render:
    post_nat_src_addr: ip
ipfix:
  mapping:
    - {field: 230, destination: nat_event}
    - {field: 225, destination: post_nat_src_addr}
    - {field: 281, destination: post_nat_src_addr}
    - {field: 227, destination: post_nat_src_port}
    - {field: 323, destination: observation_time_ms}
`

// goflow2 is a goflow2 collector writing JSON lines to a file.
type Goflow2 struct {
	*Daemon
	out string
}

func StartGoflow2(t *testing.T, ns *netns.NS, listen string, out string) *Goflow2 {
	t.Helper()
	mapping := filepath.Join(filepath.Dir(out), "mapping.yaml")
	if err := os.WriteFile(mapping, []byte(goflow2Mapping), 0o644); err != nil {
		t.Fatal(err)
	}
	// One socket and one worker: the lines of concurrent workers
	// interleave in the file, garbling records.
	d := StartDaemon(t, ns, "goflow2", "-listen", "netflow://"+listen+"?count=1&workers=1", "-mapping", mapping, "-format", "json",
		"-transport", "file", "-transport.file", out, "-loglevel", "warn")
	return &Goflow2{Daemon: d, out: out}
}

// Out is the file goflow2 writes its JSON lines to.
func (g *Goflow2) Out() string { return g.out }

// events reads the NAT events goflow2 has written so far.
func (g *Goflow2) Events() []Event {
	data, _ := os.ReadFile(g.out)
	var got []Event
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var r map[string]any
		if json.Unmarshal(sc.Bytes(), &r) != nil || r["nat_event"] == nil {
			continue
		}
		ev := Event{
			NatEvent: uint8(num(r["nat_event"])), Proto: protoNum(r["proto"]),
			Src: addrPort(r["src_addr"], r["src_port"]), Dst: addrPort(r["dst_addr"], r["dst_port"]),
			Xlate: addrPort(r["post_nat_src_addr"], r["post_nat_src_port"]),
		}
		if ev.NatEvent == nat44Delete || ev.NatEvent == deleteV6 {
			ev.Bytes = uint64(num(r["bytes"]))
		}
		got = append(got, ev)
	}
	return got
}

func protoNum(v any) uint8 {
	if s, ok := v.(string); ok {
		switch strings.ToLower(s) {
		case "tcp":
			return 6
		case "udp":
			return 17
		}
	}
	return uint8(num(v))
}

// tsharkEvents decodes the NAT events in a capture of IPFIX over TCP.
func TsharkEvents(t *testing.T, pcap string, port int) []Event {
	t.Helper()
	fields := []string{"cflow.nat_event", "cflow.protocol", "cflow.srcaddr", "cflow.srcaddrv6", "cflow.srcport",
		"cflow.dstaddr", "cflow.dstaddrv6", "cflow.dstport", "cflow.post_natsource_ipv4_address",
		"cflow.post_nat_source_ipv6_address", "cflow.post_naptsource_transport_port", "cflow.octets"}
	args := []string{"-r", pcap, "-d", fmt.Sprintf("tcp.port==%d,cflow", port), "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"}
	for _, f := range fields {
		args = append(args, "-e", f)
	}
	out, err := exec.Command("tshark", args...).Output()
	if err != nil {
		t.Logf("tshark -r: %v (a capture still being written may end in a cut packet)", err)
	}
	var got []Event
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		cols := strings.Split(line, "|")
		if len(cols) != len(fields) || cols[0] == "" {
			continue
		}
		// One packet can hold many records: each column lists them in order.
		split := func(i int) []string { return strings.Split(cols[i], ",") }
		evs, protos, sports, dports, xports := split(0), split(1), split(4), split(7), split(10)
		src4, src6, dst4, dst6, x4, x6, octets := split(2), split(3), split(5), split(6), split(8), split(9), split(11)
		i4, i6, del4, del6 := 0, 0, 0, 0
		for i := range evs {
			ev := Event{NatEvent: uint8(num(evs[i])), Proto: uint8(num(protos[i]))}
			sp, dp, xp := uint16(num(sports[i])), uint16(num(dports[i])), uint16(num(xports[i]))
			v6 := ev.NatEvent == createV6 || ev.NatEvent == deleteV6
			if v6 {
				ev.Src, ev.Dst, ev.Xlate = ap(src6, i6, sp), ap(dst6, i6, dp), ap(x6, i6, xp)
				i6++
			} else {
				ev.Src, ev.Dst, ev.Xlate = ap(src4, i4, sp), ap(dst4, i4, dp), ap(x4, i4, xp)
				i4++
			}
			if ev.NatEvent == nat44Delete || ev.NatEvent == deleteV6 {
				ev.Bytes = uint64(num(at(octets, del4+del6)))
				if v6 {
					del6++
				} else {
					del4++
				}
			}
			got = append(got, ev)
		}
	}
	return got
}

func at(s []string, i int) string {
	if i < len(s) {
		return s[i]
	}
	return ""
}

func ap(addrs []string, i int, port uint16) netip.AddrPort {
	a, err := netip.ParseAddr(at(addrs, i))
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a, port)
}

// Nfcapd is nfdump's collector daemon, writing into a directory.
type Nfcapd struct {
	*Daemon
	dir string
	ns  *netns.NS
}

// StartNfcapd starts nfcapd in ns on addr:port (UDP) and waits until it
// listens.
func StartNfcapd(t *testing.T, ns *netns.NS, addr string, port int) *Nfcapd {
	t.Helper()
	dir := t.TempDir()
	d := StartDaemon(t, ns, "nfcapd", "-b", addr, "-p", strconv.Itoa(port), "-w", dir, "-t", "3600")
	Listening(t, ns, "udp", port)
	return &Nfcapd{Daemon: d, dir: dir, ns: ns}
}

// Events stops nfcapd once its socket holds nothing unread (it writes
// its file at rotation or exit) and returns what nfdump decodes of it.
func (n *Nfcapd) Events(t *testing.T, port int) []Event {
	t.Helper()
	netnstest.Poll(t, 10*time.Second, 50*time.Millisecond, "nfcapd received every datagram", func() bool {
		out, _ := n.ns.Try("ss", "-Hlun", fmt.Sprintf("sport = :%d", port))
		f := strings.Fields(out)
		return len(f) > 1 && f[1] == "0" // Recv-Q empty
	})
	n.Stop(t)
	out, err := exec.Command("nfdump", "-R", n.dir, "-o", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("nfdump: %v\n%s\nnfcapd:\n%s", err, out, n.Output())
	}
	var recs []map[string]any
	if err := json.Unmarshal(out, &recs); err != nil {
		t.Fatalf("nfdump -o json: %v\n%s", err, out)
	}
	var got []Event
	for _, r := range recs {
		ev := Event{
			NatEvent: uint8(num(r["nat_event_id"])), Proto: uint8(num(r["proto"])),
			Src: addrPort(r["src4_addr"], r["src_port"]), Dst: addrPort(r["dst4_addr"], r["dst_port"]),
			Xlate: addrPort(r["src4_xlt_ip"], r["src_xlt_port"]),
		}
		if ev.NatEvent == nat44Delete {
			ev.Bytes = uint64(num(r["in_bytes"]))
		}
		got = append(got, ev)
	}
	return got
}

// DiscardTCP listens on hostPort (TCP) in ns and reads and discards
// whatever its connections send, until t ends: a collector that is up.
func DiscardTCP(t *testing.T, ns *netns.NS, hostPort string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", hostPort)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	return ln
}

// Tshark is a TCP listener that reads and discards what it is sent,
// captured by tshark.
type Tshark struct {
	*Daemon
	pcap string
	ln   net.Listener
}

// StartTshark listens on addr:port (TCP) in ns and captures the port's
// traffic, and returns once packets are in the capture.
func StartTshark(t *testing.T, ns *netns.NS, addr string, port int) *Tshark {
	t.Helper()
	hostPort := net.JoinHostPort(addr, strconv.Itoa(port))
	ln := DiscardTCP(t, ns, hostPort)
	pcap := filepath.Join(t.TempDir(), "ipfix.pcapng")
	if err := os.Chmod(filepath.Dir(pcap), 0o777); err != nil { // dumpcap may drop privileges
		t.Fatal(err)
	}
	d := StartDaemon(t, ns, "tshark", "-i", "any", "-f", fmt.Sprintf("tcp port %d", port), "-w", pcap)
	// tshark says it captures before dumpcap does: probe with
	// connections until one is in the capture.
	netnstest.Poll(t, 30*time.Second, 100*time.Millisecond, "tshark capturing", func() bool {
		_ = ns.Do(func() error {
			c, err := net.Dial("tcp", hostPort)
			if err == nil {
				c.Close()
			}
			return err
		})
		out, _ := exec.Command("tshark", "-r", pcap, "-c1").Output() // the first packet
		return len(bytes.TrimSpace(out)) > 0
	})
	return &Tshark{Daemon: d, pcap: pcap, ln: ln}
}

// Events waits until the capture holds n events or more, stops tshark
// and returns the events it decodes of the capture.
func (ts *Tshark) Events(t *testing.T, port, n int) []Event {
	t.Helper()
	var got []Event
	netnstest.Poll(t, 20*time.Second, 100*time.Millisecond, "every event in the capture", func() bool {
		got = TsharkEvents(t, ts.pcap, port)
		return len(got) >= n
	})
	ts.Stop(t)
	return TsharkEvents(t, ts.pcap, port)
}

// Nfacctd is pmacct's collector with its in-memory plugin, read back
// with the pmacct client.
type Nfacctd struct {
	*Daemon
	ns   *netns.NS
	pipe string
}

// StartNfacctd starts nfacctd in ns on addr:port (UDP), aggregating NAT
// events by their 5-tuple and translation, and waits until it listens.
func StartNfacctd(t *testing.T, ns *netns.NS, addr string, port int) *Nfacctd {
	t.Helper()
	dir := t.TempDir()
	pipe := filepath.Join(dir, "memory.pipe")
	conf := filepath.Join(dir, "nfacctd.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`daemonize: false
nfacctd_ip: %s
nfacctd_port: %d
plugins: memory
imt_path: %s
aggregate: src_host, dst_host, src_port, dst_port, proto, nat_event, post_nat_src_host, post_nat_src_port
`, addr, port, pipe)), 0o644); err != nil {
		t.Fatal(err)
	}
	d := StartDaemon(t, ns, "nfacctd", "-f", conf)
	Listening(t, ns, "udp", port)
	return &Nfacctd{Daemon: d, ns: ns, pipe: pipe}
}

// Events returns the NAT events nfacctd holds (its aggregates carry no
// per-event byte counts: Bytes is 0).
func (n *Nfacctd) Events(t *testing.T) []Event {
	t.Helper()
	out, err := n.ns.Try("pmacct", "-p", n.pipe, "-s", "-O", "json")
	if err != nil {
		t.Logf("pmacct -s: %v", err)
		return nil
	}
	var got []Event
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var r map[string]any
		if json.Unmarshal([]byte(line), &r) != nil || r["nat_event"] == nil {
			continue
		}
		got = append(got, Event{
			NatEvent: uint8(num(r["nat_event"])), Proto: protoNum(r["ip_proto"]),
			Src: addrPort(r["ip_src"], r["port_src"]), Dst: addrPort(r["ip_dst"], r["port_dst"]),
			Xlate: addrPort(r["post_nat_ip_src"], r["post_nat_port_src"]),
		})
	}
	return got
}
