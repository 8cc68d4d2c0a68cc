package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nfmasq/nfmasq/internal/who"
)

type whoFlags struct {
	translated, at, since, until, proto, pod, dst string
	tolerance                                     time.Duration
	maxOpen                                       int
}

func newWhoCmd() *cobra.Command {
	var f whoFlags
	cmd := &cobra.Command{
		Use:   "who (--translated ADDR:PORT --at TIME | --pod NAMESPACE/NAME | --dst ADDR[:PORT]) [flags] [FILE|DIR ...]",
		Short: "Answer from the flow log which pod was behind a node address and port, or what a pod or destination saw",
		Long: `Read flow-log files (a directory stands for the flow log and its rotated
files, gzip-compressed ones included; no file or "-" reads standard input)
and print one JSON line per matching flow, joined across its decision, nat
and end (or fallback) records, with the flow log's field names: the pod,
its address and port, the destination, the translated source the remote
side saw, the deciding rule and policy, and the flow's start and end ("end"
is absent, and "open" true, while the log holds no end for it).

  nfmasq who --translated 192.168.77.1:61417 --at 2026-12-06T17:28:16Z /var/log/nfmasq/
  nfmasq who --pod default/web-0 --since 2026-12-06T17:00:00Z --until 2026-12-06T18:00:00Z flows.log
  nfmasq who --dst 203.0.113.10:443 --since 2026-12-06T17:00:00Z < flows.log

A flow matches --at T when T lies between its start and its end, each
widened by --tolerance (default 1s) for the granularity of the clock T
comes from; --since/--until select flows alive at some time between
them. Flows are printed as they end in the log, flows still open last.
Translations of flows still open are known only from nat records
(nfmasq agent --flow-log-nat); without them a flow's translation is known
once it ends.

Exit status: 0 when a flow matched, 1 when none did, 2 on a usage error
or an unreadable file. Malformed lines are skipped and counted, and
losses the log reports in gap records are summed, on standard error.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runWho(&f, args, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.translated, "translated", "", "the translated source ADDR:PORT the remote side saw (with --at)")
	fs.StringVar(&f.at, "at", "", "the time the remote side saw it (RFC 3339)")
	fs.StringVar(&f.since, "since", "", "flows alive at or after this time (RFC 3339)")
	fs.StringVar(&f.until, "until", "", "flows alive at or before this time (RFC 3339)")
	fs.StringVar(&f.proto, "proto", "", "only flows of this protocol: tcp, udp, sctp, icmp, ...")
	fs.StringVar(&f.pod, "pod", "", "flows of the pod NAMESPACE/NAME")
	fs.StringVar(&f.dst, "dst", "", "flows to ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)")
	fs.DurationVar(&f.tolerance, "tolerance", time.Second, "widen every flow's lifetime by this much on both sides when matching times")
	fs.IntVar(&f.maxOpen, "max-open", who.DefaultMaxOpen, "most flows held open while reading (the oldest is given up, as open, beyond it)")
	return cmd
}

// query checks the flags and returns the query they ask.
func (f *whoFlags) query() (who.Query, error) {
	q := who.Query{Proto: f.proto, Pod: f.pod, Tolerance: f.tolerance}
	var err error
	modes := 0
	if f.translated != "" {
		modes++
		if q.Translated, err = netip.ParseAddrPort(f.translated); err != nil {
			return q, fmt.Errorf("--translated %q: want ADDR:PORT ([ADDR]:PORT for IPv6)", f.translated)
		}
		q.Translated = netip.AddrPortFrom(q.Translated.Addr().Unmap(), q.Translated.Port())
		if f.at == "" {
			return q, errors.New("--translated needs --at: a translated port is reused by other flows over time")
		}
	}
	if f.pod != "" {
		modes++
		if ns, name, ok := strings.Cut(f.pod, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return q, fmt.Errorf("--pod %q: want NAMESPACE/NAME", f.pod)
		}
	}
	if f.dst != "" {
		modes++
		if ap, err := netip.ParseAddrPort(f.dst); err == nil {
			q.Dst, q.DstPort = ap.Addr().Unmap(), ap.Port()
		} else if a, err := netip.ParseAddr(strings.Trim(f.dst, "[]")); err == nil {
			q.Dst = a.Unmap()
		} else {
			return q, fmt.Errorf("--dst %q: want ADDR, ADDR:PORT or [ADDR]:PORT", f.dst)
		}
	}
	if modes != 1 {
		return q, errors.New("give exactly one of --translated (with --at), --pod, --dst")
	}
	for _, t := range []struct {
		flag, v string
		to      *time.Time
	}{{"--at", f.at, &q.At}, {"--since", f.since, &q.Since}, {"--until", f.until, &q.Until}} {
		if t.v == "" {
			continue
		}
		if *t.to, err = time.Parse(time.RFC3339Nano, t.v); err != nil {
			return q, fmt.Errorf("%s %q: want an RFC 3339 time such as 2026-12-06T17:28:16Z", t.flag, t.v)
		}
	}
	switch {
	case !q.Since.IsZero() && !q.Until.IsZero() && q.Until.Before(q.Since):
		return q, errors.New("--until is before --since")
	case f.tolerance < 0:
		return q, fmt.Errorf("--tolerance %v: must not be negative", f.tolerance)
	case f.maxOpen < 1:
		return q, fmt.Errorf("--max-open %d: must be at least 1", f.maxOpen)
	}
	return q, nil
}

func runWho(f *whoFlags, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	q, err := f.query()
	if err != nil {
		return &usageError{err}
	}
	var files []string
	stdinOnly := len(args) == 0 || len(args) == 1 && args[0] == "-"
	if !stdinOnly {
		if files, err = who.Files(args); err != nil {
			return &exitError{code: exitConfig, err: err}
		}
	}
	out := bufio.NewWriter(stdout)
	enc := json.NewEncoder(out)
	var writeErr error
	j := who.NewJoiner(q, who.Options{MaxOpen: f.maxOpen}, func(fl *who.Flow) {
		if writeErr == nil {
			writeErr = enc.Encode(fl)
		}
	})
	var readErrs []string
	if stdinOnly {
		if err := j.Read(stdin, "stdin"); err != nil {
			readErrs = append(readErrs, fmt.Sprintf("stdin: %v", err))
		}
	}
	for _, path := range files {
		rc, err := who.Open(path)
		if err != nil {
			return &exitError{code: exitConfig, err: err}
		}
		if err := j.Read(rc, path); err != nil {
			// A compressed file cut short: what it held is read.
			readErrs = append(readErrs, fmt.Sprintf("%s: %v", path, err))
		}
		rc.Close()
	}
	j.Finish()
	if err := out.Flush(); writeErr == nil {
		writeErr = err
	}
	if writeErr != nil {
		return &exitError{code: exitFailure, err: fmt.Errorf("writing the answer: %w", writeErr)}
	}
	st := j.Stats()
	for _, e := range readErrs {
		fmt.Fprintf(stderr, "nfmasq who: read error, records after it are missing: %s\n", e)
	}
	if st.Malformed > 0 {
		fmt.Fprintf(stderr, "nfmasq who: skipped %d malformed lines of %d (first: %s)\n", st.Malformed, st.Lines, st.FirstMalformed)
	}
	if st.Lost > 0 {
		fmt.Fprintf(stderr, "nfmasq who: the log reports %d records lost between %s and %s (gap records): the answer may be incomplete\n",
			st.Lost, st.LostFrom.Format(time.RFC3339), st.LostTo.Format(time.RFC3339))
	}
	if st.Evicted > 0 {
		fmt.Fprintf(stderr, "nfmasq who: %d flows without an end were given up as open to stay within --max-open %d\n", st.Evicted, f.maxOpen)
	}
	if st.Matched == 0 {
		return &exitError{code: exitFailure}
	}
	return nil
}
