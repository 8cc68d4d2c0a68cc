package kube

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeaderElection names the Lease that replicas compete for and how they
// use it. Zero durations take client-go's usual values (15s, 10s, 2s).
type LeaderElection struct {
	Namespace string
	Name      string
	// Identity is this replica's name in the Lease; empty means the
	// hostname (the pod name) plus a random suffix, so a restarted pod
	// does not mistake the old holder for itself.
	Identity      string
	LeaseDuration time.Duration
	RenewDeadline time.Duration
	RetryPeriod   time.Duration
}

// ErrLostLeadership is returned by RunLeading when the Lease was lost
// while run was still working; the process should exit so that it never
// acts next to the new leader.
var ErrLostLeadership = errors.New("lost the leader lease")

// RunLeading blocks until this replica holds the Lease, then calls run
// with a context that ends when ctx ends or the Lease is lost. It returns
// once run has returned: run's error, ErrLostLeadership when the Lease was
// lost, else nil. The Lease is released on return so a successor starts
// at once.
func RunLeading(ctx context.Context, client kubernetes.Interface, le LeaderElection, run func(context.Context) error) error {
	if le.Identity == "" {
		host, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("leader election: %w", err)
		}
		var b [4]byte
		_, _ = rand.Read(b[:])
		le.Identity = host + "_" + hex.EncodeToString(b[:])
	}
	orDefault := func(d, def time.Duration) time.Duration {
		if d == 0 {
			return def
		}
		return d
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: le.Namespace, Name: le.Name},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: le.Identity},
	}
	// client-go starts OnStartedLeading in a goroutine and may return from
	// Run before that goroutine has begun. closed settles the race: a
	// callback that starts after Run returned does not call run, and one
	// that started is waited for, so run never outlives RunLeading.
	// electing ends the elector when run returns on its own, which client-go
	// would not notice: it would go on renewing a lease nobody uses.
	electing, stopElecting := context.WithCancel(ctx)
	defer stopElecting()
	var (
		mu      sync.Mutex
		closed  bool
		running bool
		runErr  error
		lost    bool
		done    = make(chan struct{})
	)
	elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		Name:            le.Name,
		LeaseDuration:   orDefault(le.LeaseDuration, 15*time.Second),
		RenewDeadline:   orDefault(le.RenewDeadline, 10*time.Second),
		RetryPeriod:     orDefault(le.RetryPeriod, 2*time.Second),
		ReleaseOnCancel: true,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(leading context.Context) {
				mu.Lock()
				if closed {
					mu.Unlock()
					return
				}
				running = true
				mu.Unlock()
				defer close(done)
				runErr = run(leading)
				// The lease was lost if run's context ended while the
				// caller's had not; checked before stopElecting ends it.
				lost = leading.Err() != nil && ctx.Err() == nil
				stopElecting()
			},
			OnStoppedLeading: func() {},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	// Run returns when ctx ends, run returns, or the lease is lost; in
	// every case the context given to run is already cancelled.
	elector.Run(electing)
	mu.Lock()
	closed = true
	led := running
	mu.Unlock()
	if !led {
		if ctx.Err() == nil {
			return ErrLostLeadership // acquired and lost before run began
		}
		return nil
	}
	<-done
	switch {
	case runErr != nil:
		return runErr
	case lost:
		return ErrLostLeadership
	}
	return nil
}
