package kube

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// testPod is a pod on node with the given addresses.
func testPod(ns, name, node string, hostNetwork bool, ips ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.Now()},
		Spec:       corev1.PodSpec{NodeName: node, HostNetwork: hostNetwork},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

// TestPodIndexEvents feeds the index's handlers directly, so each case
// states exactly which events arrived and in which order.
func TestPodIndexEvents(t *testing.T) {
	older := metav1.NewTime(time.Unix(1000, 0))
	newer := metav1.NewTime(time.Unix(2000, 0))
	withTime := func(p *corev1.Pod, ts metav1.Time) *corev1.Pod { p.CreationTimestamp = ts; return p }
	withPhase := func(p *corev1.Pod, ph corev1.PodPhase) *corev1.Pod { p.Status.Phase = ph; return p }

	type event struct {
		del bool
		pod *corev1.Pod
	}
	tests := []struct {
		name   string
		events []event
		want   map[string]string // address -> pod; every other address must miss
	}{
		{
			name:   "dual stack pod",
			events: []event{{pod: testPod("ns", "a", "n1", false, "10.244.0.5", "fd00::5")}},
			want:   map[string]string{"10.244.0.5": "ns/a", "fd00::5": "ns/a", "::ffff:10.244.0.5": "ns/a"},
		},
		{
			name:   "host network pods are left out",
			events: []event{{pod: testPod("kube-system", "proxy", "n1", true, "192.168.0.10")}},
			want:   map[string]string{"192.168.0.10": ""},
		},
		{
			name: "pending pod gets its address later",
			events: []event{
				{pod: testPod("ns", "a", "n1", false)},
				{pod: testPod("ns", "a", "n1", false, "10.244.0.6")},
			},
			want: map[string]string{"10.244.0.6": "ns/a"},
		},
		{
			name: "deleted pod is forgotten",
			events: []event{
				{pod: testPod("ns", "a", "n1", false, "10.244.0.7")},
				{del: true, pod: testPod("ns", "a", "n1", false, "10.244.0.7")},
			},
			want: map[string]string{"10.244.0.7": ""},
		},
		{
			name: "finished pod keeps its address until deleted, for its end records",
			events: []event{
				{pod: testPod("ns", "job", "n1", false, "10.244.0.8")},
				{pod: withPhase(testPod("ns", "job", "n1", false, "10.244.0.8"), corev1.PodSucceeded)},
			},
			want: map[string]string{"10.244.0.8": "ns/job"},
		},
		{
			name: "finished pod whose status dropped its addresses keeps the ones it had",
			events: []event{
				{pod: testPod("ns", "job", "n1", false, "10.244.0.8")},
				{pod: withPhase(testPod("ns", "job", "n1", false), corev1.PodFailed)},
			},
			want: map[string]string{"10.244.0.8": "ns/job"},
		},
		{
			name: "finished pod's deletion forgets it",
			events: []event{
				{pod: withPhase(testPod("ns", "job", "n1", false, "10.244.0.8"), corev1.PodSucceeded)},
				{del: true, pod: withPhase(testPod("ns", "job", "n1", false, "10.244.0.8"), corev1.PodSucceeded)},
			},
			want: map[string]string{"10.244.0.8": ""},
		},
		{
			name: "a running pod wins a finished pod's address, even an older one and in either order",
			events: []event{
				{pod: withTime(withPhase(testPod("ns", "job", "n1", false, "10.244.0.8"), corev1.PodSucceeded), newer)},
				{pod: withTime(testPod("ns", "web", "n1", false, "10.244.0.8"), older)},
				{pod: withTime(withPhase(testPod("ns", "job2", "n1", false, "10.244.0.8"), corev1.PodFailed), newer)},
			},
			want: map[string]string{"10.244.0.8": "ns/web"},
		},
		{
			name: "reused address belongs to the newer pod, in either order",
			events: []event{
				{pod: withTime(testPod("ns", "new", "n1", false, "10.244.0.9"), newer)},
				{pod: withTime(testPod("ns", "old", "n1", false, "10.244.0.9"), older)},
			},
			want: map[string]string{"10.244.0.9": "ns/new"},
		},
		{
			name: "old pod's deletion leaves the new owner",
			events: []event{
				{pod: withTime(testPod("ns", "old", "n1", false, "10.244.0.9"), older)},
				{pod: withTime(testPod("ns", "new", "n1", false, "10.244.0.9"), newer)},
				{del: true, pod: withTime(testPod("ns", "old", "n1", false, "10.244.0.9"), older)},
			},
			want: map[string]string{"10.244.0.9": "ns/new"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			x, err := NewPodIndex(fake.NewClientset(), "n1", 0)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range tt.events {
				if e.del {
					x.delete(e.pod)
				} else {
					x.update(e.pod)
				}
			}
			for addr, want := range tt.want {
				if got := x.Lookup(netip.MustParseAddr(addr)); got != want {
					t.Errorf("Lookup(%s) = %q, want %q", addr, got, want)
				}
			}
		})
	}
}

// TestPodIndexInformer runs the real informer against the fake clientset:
// only pods of the index's node are listed, and changes arrive by watch.
func TestPodIndexInformer(t *testing.T) {
	client := fake.NewClientset(
		testPod("default", "web", "n1", false, "10.244.1.2"),
		testPod("default", "elsewhere", "n2", false, "10.244.2.2"),
	)
	x, err := NewPodIndex(client, "n1", 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer x.Shutdown()
	defer cancel()
	if err := x.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if got := x.Lookup(netip.MustParseAddr("10.244.1.2")); got != "default/web" {
		t.Errorf("after sync: Lookup = %q, want default/web", got)
	}
	if got := x.Lookup(netip.MustParseAddr("10.244.2.2")); got != "" {
		t.Errorf("pod of another node: Lookup = %q, want nothing", got)
	}

	if _, err := client.CoreV1().Pods("apps").Create(ctx, testPod("apps", "db", "n1", false, "10.244.1.3"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the new pod in the index", func(context.Context) (bool, error) {
		return x.Lookup(netip.MustParseAddr("10.244.1.3")) == "apps/db", nil
	})
	if err := client.CoreV1().Pods("default").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the deleted pod gone", func(context.Context) (bool, error) {
		return x.Lookup(netip.MustParseAddr("10.244.1.2")) == "", nil
	})
}

func TestPodIndexLookupDoesNotAllocate(t *testing.T) {
	x, err := NewPodIndex(fake.NewClientset(), "n1", 0)
	if err != nil {
		t.Fatal(err)
	}
	x.update(testPod("ns", "a", "n1", false, "10.244.0.5"))
	addr := netip.MustParseAddr("10.244.0.5")
	if n := testing.AllocsPerRun(1000, func() { _ = x.Lookup(addr) }); n != 0 {
		t.Errorf("Lookup allocates %v times per call", n)
	}
}

func TestNewPodIndexNeedsNode(t *testing.T) {
	if _, err := NewPodIndex(fake.NewClientset(), "", 0); err == nil {
		t.Error("NewPodIndex with no node name succeeded")
	}
}

func BenchmarkPodIndexLookup(b *testing.B) {
	x, err := NewPodIndex(fake.NewClientset(), "n1", 0)
	if err != nil {
		b.Fatal(err)
	}
	for i := range 110 { // a node's default pod limit
		x.update(testPod("ns", "p"+string(rune('a'+i%26))+string(rune('a'+i/26)), "n1", false,
			netip.AddrFrom4([4]byte{10, 244, 0, byte(i + 1)}).String()))
	}
	addr := netip.MustParseAddr("10.244.0.50")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_ = x.Lookup(addr)
		}
	})
}
