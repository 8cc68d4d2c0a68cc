package who

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// rotated matches the time lumberjack puts in a rotated file's name,
// NAME-2006-01-02T15-04-05.000.EXT: rotated files sort by it.
var rotated = regexp.MustCompile(`-(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})\.[^/]*$`)

// Files expands the paths given to nfmasq who: a directory stands for
// every regular file in it (the flow log and its rotated files, compressed
// or not), in the order they were written: rotated files oldest first,
// then the others by name. Files are taken as given, in the order given.
func Files(paths []string) ([]string, error) {
	var out []string
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		if !st.IsDir() {
			out = append(out, p)
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			return nil, err
		}
		var names []string
		for _, e := range entries {
			if e.Type().IsRegular() {
				names = append(names, e.Name())
			}
		}
		if len(names) == 0 {
			return nil, fmt.Errorf("%s: no files in the directory", p)
		}
		slices.SortFunc(names, func(a, b string) int {
			ra, rb := rotated.FindStringSubmatch(a), rotated.FindStringSubmatch(b)
			switch {
			case ra != nil && rb != nil && ra[1] != rb[1]:
				return strings.Compare(ra[1], rb[1])
			case ra != nil && rb == nil:
				return -1
			case ra == nil && rb != nil:
				return 1
			}
			return strings.Compare(a, b)
		})
		for _, n := range names {
			out = append(out, filepath.Join(p, n))
		}
	}
	return out, nil
}

// Open opens a flow-log file for reading, through gzip when it is
// compressed (told by its first bytes, not its name).
func Open(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(f, 256<<10)
	magic, err := br.Peek(2)
	if err == nil && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return readCloser{zr, f}, nil
	}
	return readCloser{br, f}, nil
}

type readCloser struct {
	io.Reader
	c io.Closer
}

func (r readCloser) Close() error { return r.c.Close() }
