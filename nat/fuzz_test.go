package nat

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// configSeeds are the parser's test vectors, so the fuzzer starts from
// every shape the tests know.
var configSeeds = []string{
	"",
	"null",
	"# comment only\n",
	"nonMasqueradeCIDRs:\n  - 172.16.0.0/12\n  - 10.0.0.0/8\ncidrLimit: 64\nmasqLinkLocal: true\nresyncInterval: 5s\n",
	"nonMasqueradeCIDRs:\n",
	"nonMasqueradeCIDRs: [0.0.0.0/0, \"::/0\"]\nmasqLinkLocalIPv6: true\n",
	`{"nonMasqueradeCIDRs": ["172.16.0.0/12", "10.0.0.0/8", "fc00::/7"], "masqLinkLocal": true, "resyncInterval": "5s"}`,
	`{"resyncInterval": "5m", "cidrLimit": 2}`,
	"*",
	"{*",
	"resyncInterval: 60\n",
	"nonMasqueradeCIDRs: [abcdefg, 10.0.0.1/8, \"::ffff:10.0.0.0/104\"]\n",
	"nonMasqueradeCidr: []\nMASQLINKLOCAL: true\n",
	"masqLinkLocal: true\n\tcidrLimit: 3\n",
	"cidrLimit: -1\n",
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range configSeeds {
		f.Add([]byte(s), true, true)
		f.Add([]byte(s), false, false)
	}
	f.Fuzz(func(t *testing.T, data []byte, enableIPv6, allReserved bool) {
		opts := ParseOptions{EnableIPv6: enableIPv6, AllReservedRanges: allReserved}
		c, _, err := ParseConfig(data, opts)
		if err != nil {
			return
		}
		// A config that parses compiles, and decides without panicking.
		p, err := Compile(Input{Config: c, EnableIPv6: enableIPv6, AllReservedRanges: allReserved})
		if err != nil {
			t.Fatalf("parsed config does not compile: %v\nconfig: %+v", err, c)
		}
		for _, a := range []string{"10.1.2.3", "8.8.8.8", "169.254.0.1", "fe80::1", "2001:db8::1"} {
			p.Decide(netip.MustParseAddr(a))
		}
		// It round-trips through its own JSON form.
		js, err := json.Marshal(c)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		back, warnings, err := ParseConfig(js, opts)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", js, err)
		}
		if len(warnings) != 0 {
			t.Errorf("re-parse of %s warns: %v", js, warnings)
		}
		c.CustomCIDRs = true // the marshalled form always lists the CIDRs
		if !equalConfig(back, c) {
			t.Errorf("round trip:\n got %+v\nwant %+v", back, c)
		}
	})
}

// fuzzInput builds an Input from fuzz bytes. Each 6-byte chunk of
// prefixData is one prefix: a control byte (bit 0: IPv6; bits 1-2: config,
// cluster or one of four egress policies; bits 3-4: the policy), a length
// and four address bytes (the top of an IPv6 address). mode selects the
// flags.
func fuzzInput(prefixData []byte, mode uint8) Input {
	in := Input{
		EnableIPv6:         mode&1 != 0,
		NoAgent:            mode&2 != 0,
		DisableDefaultSNAT: mode&4 != 0,
		UseEgressPolicies:  mode&8 != 0,
		AllReservedRanges:  mode&64 != 0,
		Config: Config{
			MasqLinkLocal:     mode&16 != 0,
			MasqLinkLocalIPv6: mode&32 != 0,
			CustomCIDRs:       mode&128 != 0,
			ResyncInterval:    time.Minute,
			CIDRLimit:         DefaultCIDRLimit,
		},
	}
	policies := map[string]*EgressPolicy{}
	for chunk := range slices.Chunk(prefixData, 6) {
		if len(chunk) < 6 {
			break
		}
		ctrl, bits := chunk[0], int(chunk[1])
		var p netip.Prefix
		if ctrl&1 == 0 {
			p = netip.PrefixFrom(netip.AddrFrom4([4]byte(chunk[2:6])), bits%33).Masked()
		} else {
			var a [16]byte
			copy(a[:], chunk[2:6])
			p = netip.PrefixFrom(netip.AddrFrom16(a), bits%129).Masked()
			if p.Addr().Is4In6() {
				continue // rejected by design; TestCompileErrors covers it
			}
		}
		switch ctrl >> 1 & 3 {
		case 0:
			if p.Addr().Is6() && !in.EnableIPv6 {
				continue // a config error, not a decision to check
			}
			in.Config.NonMasqueradeCIDRs = append(in.Config.NonMasqueradeCIDRs, p.String())
		case 1:
			in.ClusterCIDRs = append(in.ClusterCIDRs, p)
		default:
			name := fmt.Sprintf("policy-%d", ctrl>>3&3)
			if policies[name] == nil {
				policies[name] = &EgressPolicy{Name: name}
			}
			policies[name].Destinations = append(policies[name].Destinations, p)
		}
	}
	for _, p := range policies {
		in.EgressPolicies = append(in.EgressPolicies, *p)
	}
	return in
}

// FuzzDecide holds the compiled Policy to naiveDecide over random prefix
// sets, flags and addresses: at every prefix's first and last address, and
// at the addresses in addrData (5-byte chunks: a family byte, four address
// bytes).
func FuzzDecide(f *testing.F) {
	f.Add([]byte{0, 8, 10, 0, 0, 0, 0, 16, 10, 1, 0, 0, 2, 14, 10, 244, 0, 0}, []byte{0, 10, 1, 2, 3, 0, 8, 8, 8, 8}, uint8(0))
	f.Add([]byte{1, 8, 0xfd, 0, 0, 0, 8, 32, 0x20, 1, 0xd, 0xb8, 0x18, 0, 0, 0, 0, 0}, []byte{1, 0xfe, 0x80, 0, 1, 1, 0x20, 1, 0xd, 0xb8}, uint8(1|8))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0}, []byte{0, 169, 254, 1, 1}, uint8(1|16|128))
	f.Add([]byte{2, 20, 34, 118, 224, 0}, []byte{0, 1, 1, 1, 1, 1, 0xfe, 0x80, 0, 0}, uint8(1|2|4))
	f.Add([]byte{2, 20, 34, 118, 224, 0}, []byte{0, 100, 64, 0, 1}, uint8(2|64))
	f.Fuzz(func(t *testing.T, prefixData, addrData []byte, mode uint8) {
		in := fuzzInput(prefixData, mode)
		p, err := Compile(in)
		if err != nil {
			t.Fatalf("Compile: %v", err)
		}
		var addrs []netip.Addr
		for chunk := range slices.Chunk(addrData, 5) {
			if len(chunk) < 5 {
				break
			}
			if chunk[0]&1 == 0 {
				addrs = append(addrs, netip.AddrFrom4([4]byte(chunk[1:5])))
			} else {
				var a [16]byte
				copy(a[:], chunk[1:5])
				a[15] = chunk[0]
				addrs = append(addrs, netip.AddrFrom16(a))
			}
		}
		for _, d := range p.decisions {
			addrs = append(addrs, d.Prefix.Addr(), lastAddr(d.Prefix))
		}
		for _, a := range addrs {
			if got, want := p.Decide(a), naiveDecide(in, a); got != want {
				t.Fatalf("Decide(%s) = %+v, want %+v\ninput: %+v", a, got, want, in)
			}
		}
		// The kernel fallback set says the same as Decide at its edges.
		for _, v6 := range []bool{false, true} {
			for _, pr := range p.NonMasquerade(v6) {
				for _, a := range []netip.Addr{pr.Addr(), lastAddr(pr)} {
					if d := p.Decide(a); d.Action != Passthrough {
						t.Fatalf("%s in NonMasquerade(%t) but Decide(%s) = %+v", pr, v6, a, d)
					}
				}
			}
		}
	})
}

// FuzzParseEgressPolicies: any file parses without panicking, and what it
// yields is valid input for Compile.
func FuzzParseEgressPolicies(f *testing.F) {
	f.Add([]byte("apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: default}\nspec:\n  action: NoSNAT\n  destinations: [{cidr: 10.0.0.0/8}]\n"))
	f.Add([]byte("apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.gke.io/v1\n  kind: EgressNATPolicy\n  metadata: {name: a}\n  spec: {action: NoSNAT, destinations: [{cidr: \"fd00::/8\"}]}\n---\nkey: [\n"))
	f.Add([]byte(`{"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": "j"}, "spec": {"action": "NoSNAT", "destinations": [{"cidr": "10.0.0.1/8"}]}}`))
	f.Add([]byte("---\n---\n# c\n--- x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		policies, _ := ParseEgressPolicies(data)
		for _, p := range policies {
			if p.Name == "" {
				t.Fatalf("policy without a name: %+v", p)
			}
		}
		in := Input{Config: DefaultConfig(true), EnableIPv6: true, UseEgressPolicies: true, EgressPolicies: policies}
		p, err := Compile(in)
		if err != nil {
			t.Fatalf("Compile of parsed policies: %v", err)
		}
		for _, ep := range policies {
			for _, d := range ep.Destinations {
				if got, want := p.Decide(d.Addr()), naiveDecide(in, d.Addr()); got != want {
					t.Fatalf("Decide(%s) = %+v, want %+v", d.Addr(), got, want)
				}
			}
		}
	})
}
