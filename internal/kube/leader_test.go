package kube

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// fastLease keeps the tests short; the ratios are client-go's usual ones.
func fastLease(identity string) LeaderElection {
	return LeaderElection{
		Namespace: "kube-system", Name: "nfmasq-egress-controller", Identity: identity,
		LeaseDuration: time.Second, RenewDeadline: 500 * time.Millisecond, RetryPeriod: 20 * time.Millisecond,
	}
}

// replica runs RunLeading in the background; running is closed when it
// leads and err receives its result.
type replica struct {
	cancel  context.CancelFunc
	running chan struct{}
	err     chan error
}

func startReplica(t *testing.T, client *fake.Clientset, identity string, run func(context.Context) error) *replica {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &replica{cancel: cancel, running: make(chan struct{}), err: make(chan error, 1)}
	go func() {
		r.err <- RunLeading(ctx, client, fastLease(identity), func(ctx context.Context) error {
			close(r.running)
			if run != nil {
				return run(ctx)
			}
			<-ctx.Done()
			return nil
		})
	}()
	t.Cleanup(cancel)
	return r
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func waitErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("RunLeading did not return")
		return nil
	}
}

func TestRunLeadingOneAtATime(t *testing.T) {
	client := fake.NewClientset()
	var leaseGets atomic.Int64
	client.PrependReactor("get", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		leaseGets.Add(1)
		return false, nil, nil
	})

	a := startReplica(t, client, "a", nil)
	waitClosed(t, a.running, "a to lead")
	b := startReplica(t, client, "b", nil)
	// Let b try the held lease a good number of times.
	target := leaseGets.Load() + 20
	waitFor(t, 10*time.Second, "b's attempts", func(context.Context) (bool, error) {
		return leaseGets.Load() >= target, nil
	})
	select {
	case <-b.running:
		t.Fatal("b leads while a holds the lease")
	default:
	}

	// a steps down and releases the lease: b takes over well before the
	// lease would have expired.
	a.cancel()
	if err := waitErr(t, a.err); err != nil {
		t.Errorf("a: %v", err)
	}
	waitClosed(t, b.running, "b to lead after a released")
	b.cancel()
	if err := waitErr(t, b.err); err != nil {
		t.Errorf("b: %v", err)
	}
}

func TestRunLeadingResults(t *testing.T) {
	t.Run("run's error is returned", func(t *testing.T) {
		boom := errors.New("boom")
		r := startReplica(t, fake.NewClientset(), "a", func(context.Context) error { return boom })
		if err := waitErr(t, r.err); !errors.Is(err, boom) {
			t.Errorf("got %v, want %v", err, boom)
		}
	})
	t.Run("lost lease", func(t *testing.T) {
		client := fake.NewClientset()
		// Reactors must be in place before the client is used: the fake
		// does not guard its reactor list against concurrent calls.
		var refuse atomic.Bool
		client.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
			if refuse.Load() {
				return true, nil, apierrors.NewServiceUnavailable("etcd is gone")
			}
			return false, nil, nil
		})
		r := startReplica(t, client, "a", nil)
		waitClosed(t, r.running, "a to lead")
		refuse.Store(true) // the API server refuses renewals from now on
		if err := waitErr(t, r.err); !errors.Is(err, ErrLostLeadership) {
			t.Errorf("got %v, want %v", err, ErrLostLeadership)
		}
	})
	t.Run("cancelled before leading", func(t *testing.T) {
		client := fake.NewClientset()
		holder := startReplica(t, client, "holder", nil)
		waitClosed(t, holder.running, "the holder to lead")
		r := startReplica(t, client, "waiter", nil)
		r.cancel()
		if err := waitErr(t, r.err); err != nil {
			t.Errorf("got %v, want nil", err)
		}
		select {
		case <-r.running:
			t.Error("the waiter ran")
		default:
		}
	})
}

// TestEgressControllerRetries makes the API server fail the controller's
// first writes: the work queue retries with back-off until they succeed.
func TestEgressControllerRetries(t *testing.T) {
	var failures atomic.Int64
	failures.Store(3)
	f := startFakeWith(t, prefixes("10.244.0.0/16"), func(client *fake.Clientset) {
		client.PrependReactor("create", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
			if failures.Add(-1) >= 0 {
				return true, nil, apierrors.NewInternalError(errors.New("apiserver restarting"))
			}
			return false, nil, nil
		})
	}, policy("default", "NoSNAT", "10.0.0.0/8"))
	f.waitConfig(t, "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- 10.244.0.0/16\n")
	if failures.Load() >= 0 {
		t.Errorf("the injected failures were not all hit: %d left", failures.Load())
	}
}
