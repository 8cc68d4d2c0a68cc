package kube

import (
	"errors"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestNodePodCIDRs(t *testing.T) {
	node := func(name, single string, multi ...string) *corev1.Node {
		return &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{PodCIDR: single, PodCIDRs: multi},
		}
	}
	tests := []struct {
		name    string
		node    *corev1.Node
		lookup  string
		want    []string
		wantIs  error
		wantMsg string
		notFnd  bool
	}{
		{name: "dual stack", node: node("n1", "10.244.1.0/24", "10.244.1.0/24", "fd00:10:244:1::/64"), lookup: "n1",
			want: []string{"10.244.1.0/24", "fd00:10:244:1::/64"}},
		{name: "only the old field", node: node("n1", "10.244.2.0/24"), lookup: "n1", want: []string{"10.244.2.0/24"}},
		{name: "host bits are masked", node: node("n1", "", "10.244.3.7/24"), lookup: "n1", want: []string{"10.244.3.0/24"}},
		{name: "no pod cidrs", node: node("n1", ""), lookup: "n1", wantIs: ErrNoPodCIDRs,
			wantMsg: "no --pod-cidr given and node n1 has no spec.podCIDRs"},
		{name: "node name unset", node: node("n1", "10.0.0.0/24"), lookup: "", wantIs: ErrNodeNameUnset},
		{name: "node missing", node: node("n1", "10.0.0.0/24"), lookup: "n2", notFnd: true},
		{name: "garbage cidr", node: node("n1", "", "10.0.0.0/99"), lookup: "n1", wantMsg: `node n1: spec.podCIDRs[0]: netip.ParsePrefix("10.0.0.0/99"): prefix length out of range`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset(tt.node)
			got, err := NodePodCIDRs(t.Context(), client, tt.lookup)
			switch {
			case tt.wantIs != nil || tt.wantMsg != "" || tt.notFnd:
				if err == nil {
					t.Fatalf("got %v, want an error", got)
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Errorf("error %q is not %q", err, tt.wantIs)
				}
				if tt.wantMsg != "" && err.Error() != tt.wantMsg {
					t.Errorf("error %q, want %q", err, tt.wantMsg)
				}
				if tt.notFnd && !apierrors.IsNotFound(err) {
					t.Errorf("error %q is not NotFound", err)
				}
			case err != nil:
				t.Fatal(err)
			default:
				var texts []string
				for _, p := range got {
					texts = append(texts, p.String())
				}
				if !slices.Equal(texts, tt.want) {
					t.Errorf("got %v, want %v", texts, tt.want)
				}
			}
		})
	}
}
