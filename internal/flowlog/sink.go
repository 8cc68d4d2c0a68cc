package flowlog

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/natefinch/lumberjack.v2"
)

// SinkKind says where records go.
type SinkKind uint8

// Sink kinds.
const (
	// SinkOff discards records without counting them: there is no trail.
	SinkOff SinkKind = iota
	// SinkStdout writes to standard output, what Kubernetes log collectors read.
	SinkStdout
	// SinkFile writes to a file rotated by size.
	SinkFile
)

// Sink is a parsed --flow-log value.
type Sink struct {
	Kind SinkKind
	// Path is the log file of a SinkFile; rotated files sit beside it.
	Path string
}

// String returns the sink in the form ParseSink accepts.
func (s Sink) String() string {
	switch s.Kind {
	case SinkStdout:
		return "stdout"
	case SinkFile:
		return "file:" + s.Path
	default:
		return "off"
	}
}

// ParseSink parses a --flow-log value: "stdout", "off", or "file:PATH".
func ParseSink(s string) (Sink, error) {
	switch {
	case s == "stdout":
		return Sink{Kind: SinkStdout}, nil
	case s == "off":
		return Sink{Kind: SinkOff}, nil
	case strings.HasPrefix(s, "file:"):
		path := strings.TrimPrefix(s, "file:")
		switch {
		case path == "":
			return Sink{}, errors.New(`flow log sink "file:" needs a path, as in file:/var/log/nfmasq/flows.log`)
		case strings.HasSuffix(path, "/") || filepath.Base(path) == "." || filepath.Base(path) == "..":
			return Sink{}, fmt.Errorf("flow log sink %q names a directory, not a file", s)
		case strings.ContainsRune(path, 0):
			return Sink{}, fmt.Errorf("flow log sink %q: path contains a NUL byte", s)
		}
		return Sink{Kind: SinkFile, Path: filepath.Clean(path)}, nil
	case s == "":
		return Sink{}, errors.New("empty flow log sink: want stdout, file:PATH or off")
	default:
		return Sink{}, fmt.Errorf("unknown flow log sink %q: want stdout, file:PATH or off", s)
	}
}

// openSink returns the writer for a sink and what to close at the end
// (nil when nothing).
func openSink(s Sink, opts *Options) (io.Writer, io.Closer, error) {
	switch s.Kind {
	case SinkStdout:
		return openStdout()
	case SinkFile:
		// Open once now so that a bad path or missing permission is a
		// start-up error rather than a stream of counted write errors.
		if err := os.MkdirAll(filepath.Dir(s.Path), 0o750); err != nil {
			return nil, nil, fmt.Errorf("flow log directory: %w", err)
		}
		f, err := os.OpenFile(s.Path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("flow log file: %w", err)
		}
		if err := f.Close(); err != nil {
			return nil, nil, fmt.Errorf("flow log file: %w", err)
		}
		lj := &lumberjack.Logger{
			Filename:   s.Path,
			MaxSize:    opts.MaxFileMB,
			MaxBackups: opts.MaxFiles,
			Compress:   opts.Compress,
		}
		return lj, lj, nil
	default:
		return nil, nil, fmt.Errorf("flow log sink %v has no writer", s)
	}
}
