//go:build !linux

package queue

import "context"

// Run returns ErrUnsupported: NFQUEUE is a Linux facility.
func (q *Queue) Run(ctx context.Context) error { return ErrUnsupported }

// ProcStats returns ErrUnsupported.
func (q *Queue) ProcStats() ([]ProcStats, error) { return nil, ErrUnsupported }

// ProcStatsIn returns ErrUnsupported.
func ProcStatsIn(int) ([]ProcStats, error) { return nil, ErrUnsupported }
