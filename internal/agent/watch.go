package agent

import (
	"log/slog"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// configWatch reports changes to the config file. It watches the file's
// directory, not the file: a ConfigMap volume replaces its files by
// swapping a symlink (..data), which a watch on the file itself misses.
// Bursts of events (the swap is several renames) are coalesced. When the
// directory cannot be watched (it does not exist yet), the periodic resync
// still picks changes up; the watch is retried on each Changed call.
type configWatch struct {
	dir     string
	log     *slog.Logger
	w       *fsnotify.Watcher
	changed chan struct{}
	done    chan struct{}
}

// debounce is how long a burst of events may last before one reload:
// kubelet's ConfigMap update is a few renames within a millisecond or two,
// and a file written in place must be whole before it is read.
const debounce = 20 * time.Millisecond

// dataLink is the symlink kubelet's atomic writer swaps to publish a new
// version of a ConfigMap volume: it renames "..data_tmp", which points at
// a directory of complete files, to "..data". When "..data" appears the
// new config is whole, so the reload starts at once instead of after the
// debounce; the events that follow (the old version's removal) still
// coalesce into one more reload, which finds nothing changed.
const dataLink = "..data"

// published reports whether ev is kubelet publishing a new version of the
// volume in dir.
func published(ev fsnotify.Event, dir string) bool {
	return ev.Has(fsnotify.Create) && ev.Name == filepath.Join(dir, dataLink)
}

func newConfigWatch(path string, log *slog.Logger) *configWatch {
	cw := &configWatch{dir: filepath.Dir(path), log: log, changed: make(chan struct{}, 1), done: make(chan struct{})}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		log.Warn("cannot watch the config directory; relying on the periodic resync", "err", err)
		return cw
	}
	if err := w.Add(cw.dir); err != nil {
		log.Warn("cannot watch the config directory; relying on the periodic resync", "dir", cw.dir, "err", err)
		w.Close()
		return cw
	}
	cw.w = w
	go cw.run()
	return cw
}

func (cw *configWatch) run() {
	var timer *time.Timer
	var fire <-chan time.Time
	for {
		select {
		case ev, ok := <-cw.w.Events:
			if !ok {
				return
			}
			if published(ev, cw.dir) {
				if timer != nil {
					timer.Stop()
				}
				fire = nil
				cw.signal()
				continue
			}
			// Any event in the directory may be the file: editors and
			// kubelet write through temporary names and renames.
			if timer == nil {
				timer = time.NewTimer(debounce)
			} else {
				timer.Reset(debounce)
			}
			fire = timer.C
		case err, ok := <-cw.w.Errors:
			if !ok {
				return
			}
			cw.log.Warn("config watch error; the periodic resync still applies", "err", err)
		case <-fire:
			fire = nil
			cw.signal()
		case <-cw.done:
			return
		}
	}
}

// signal delivers a change unless one is already waiting.
func (cw *configWatch) signal() {
	select {
	case cw.changed <- struct{}{}:
	default:
	}
}

// Changed delivers one value per burst of changes in the directory.
func (cw *configWatch) Changed() <-chan struct{} { return cw.changed }

// Close stops the watch.
func (cw *configWatch) Close() {
	close(cw.done)
	if cw.w != nil {
		cw.w.Close()
	}
}
