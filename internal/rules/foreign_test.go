package rules

import (
	"context"
	"slices"
	"testing"
)

// IPMasqAgentPayload is ip-masq-agent's nat layout as it installs it: its
// chain, one RETURN per non-masquerade CIDR, MASQUERADE, the POSTROUTING
// jump.
const ipMasqAgentPayload = `*nat
:IP-MASQ-AGENT - [0:0]
-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT
-A IP-MASQ-AGENT -d 10.0.0.0/8 -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
COMMIT
`

func TestForeignMasquerade(t *testing.T) {
	ctx := context.Background()
	f := NewFake()
	if got := ForeignMasquerade(ctx, f, DefaultIPMasqAgentChain); len(got) != 0 {
		t.Fatalf("found %v on a bare node", got)
	}
	if _, err := f.Run(ctx, []byte(ipMasqAgentPayload), "iptables-legacy-restore", "-w", "--noflush"); err != nil {
		t.Fatal(err)
	}
	if got := ForeignMasquerade(ctx, f, DefaultIPMasqAgentChain); !slices.Equal(got, []string{"legacy/IPv4"}) {
		t.Errorf("found %v, want [legacy/IPv4]", got)
	}
	if got := ForeignMasquerade(ctx, f, "OTHER-CHAIN"); len(got) != 0 {
		t.Errorf("found %v under another chain name", got)
	}
	// The chain without the jump masquerades nothing.
	if _, err := f.Run(ctx, []byte("*nat\n-D POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT\nCOMMIT\n"), "iptables-legacy-restore", "-w", "--noflush"); err != nil {
		t.Fatal(err)
	}
	if got := ForeignMasquerade(ctx, f, DefaultIPMasqAgentChain); len(got) != 0 {
		t.Errorf("found %v with the jump removed", got)
	}
}
