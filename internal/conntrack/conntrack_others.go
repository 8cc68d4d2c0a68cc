//go:build !linux

package conntrack

import "context"

type listenerSys struct{}

// Listen returns ErrUnsupported.
func Listen(Config) (*Listener, error) { return nil, ErrUnsupported }

// Close does nothing.
func (l *Listener) Close() error { return nil }

// DeleteStale returns ErrUnsupported.
func DeleteStale(context.Context, int, func(Flow) bool, []uint8) (int, error) {
	return 0, ErrUnsupported
}

// EnableAccounting returns ErrUnsupported.
func EnableAccounting(int) ([]string, error) { return nil, ErrUnsupported }
