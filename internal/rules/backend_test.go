package rules

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// cannedRunner answers each command line with fixed output; anything else
// fails as a missing tool would.
type cannedRunner map[string]string

func (c cannedRunner) Run(_ context.Context, _ []byte, name string, args ...string) ([]byte, error) {
	if out, ok := c[strings.Join(append([]string{name}, args...), " ")]; ok {
		return []byte(out), nil
	}
	return nil, errors.New("not found")
}

func TestDetectBackend(t *testing.T) {
	const hint = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
	rules := func(n int) string { return "*filter\n" + strings.Repeat("-A INPUT -j ACCEPT\n", n) + "COMMIT\n" }
	tests := []struct {
		name       string
		outputs    cannedRunner
		want       Backend
		wantReason string
	}{
		{"bare node", cannedRunner{}, BackendNFT, "nft has as many rules or more (0) than legacy (0)"},
		{"kubelet on nft", cannedRunner{"iptables-nft-save -t mangle": hint, "iptables-legacy-save": rules(100)}, BackendNFT, "IPv4 nft mangle"},
		{"kubelet on nft, IPv6 only", cannedRunner{"ip6tables-nft-save -t mangle": hint}, BackendNFT, "IPv6 nft mangle"},
		{"kubelet on legacy", cannedRunner{"iptables-legacy-save": hint, "iptables-nft-save": rules(100)}, BackendLegacy, "IPv4 legacy mangle"},
		{"hint needs a chain line", cannedRunner{"iptables-nft-save -t mangle": "-A X -m comment --comment KUBE-IPTABLES-HINT\n"}, BackendNFT, "no kubelet chains"},
		{"legacy has more rules", cannedRunner{"iptables-legacy-save": rules(3), "ip6tables-legacy-save": rules(2), "iptables-nft-save": rules(4)}, BackendLegacy, "legacy has more rules (5) than nft (4)"},
		{"tie prefers nft", cannedRunner{"iptables-legacy-save": rules(3), "iptables-nft-save": rules(3)}, BackendNFT, "(3) than legacy (3)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DetectBackend(context.Background(), tt.outputs)
			if got.Backend != tt.want || !strings.Contains(got.Reason, tt.wantReason) {
				t.Errorf("DetectBackend = %+v, want %s because of %q", got, tt.want, tt.wantReason)
			}
		})
	}
}

func TestResolveBackend(t *testing.T) {
	tests := []struct {
		choice  string
		want    Backend
		wantErr bool
	}{
		{"auto", BackendNFT, false},
		{"", BackendNFT, false},
		{"nft", BackendNFT, false},
		{"legacy", BackendLegacy, false},
		{"iptables", "", true},
	}
	for _, tt := range tests {
		got, err := ResolveBackend(context.Background(), cannedRunner{}, tt.choice)
		if (err != nil) != tt.wantErr || got.Backend != tt.want {
			t.Errorf("ResolveBackend(%q) = %+v, %v; want %q (error %v)", tt.choice, got, err, tt.want, tt.wantErr)
		}
	}
}
