package nat

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// fastYAMLSeeds are files the fast path should take, and near misses it
// must leave to the general parser.
var fastYAMLSeeds = []string{
	"nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 172.16.0.0/12\nmasqLinkLocal: true\nresyncInterval: 60s\ncidrLimit: 64\n",
	"# comment\nnonMasqueradeCIDRs:\n- 10.0.0.0/8 # office\n- fd00::/8\nmasqLinkLocalIPv6: false\n",
	"nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n",
	"nonMasqueradeCIDRs: []\nresyncInterval: 1m30s\n",
	"nonMasqueradeCIDRs:\nmasqLinkLocal: true\n",
	"resyncInterval: 500ms\n",
	"nonMasqueradeCIDRs:\n  - ::/0\n  - 0.0.0.0/0\n",
	// Near misses: the general parser decides these.
	"nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n - 11.0.0.0/8\n",
	"nonMasqueradeCIDRs:\n  - \"10.0.0.0/8\"\n",
	"nonMasqueradeCIDRs: 10.0.0.0/8\n",
	"cidrLimit: 010\n",
	"cidrLimit: 1e3\n",
	"masqLinkLocal: yes\n",
	"resyncInterval: 60\n",
	"---\nmasqLinkLocal: true\n",
	"nonMasqueradeCidr:\n  - 10.0.0.0/8\n",
	"masqLinkLocal: true\nmasqLinkLocal: false\n",
	"nonMasqueradeCIDRs:\n\t- 10.0.0.0/8\n",
	"nonMasqueradeCIDRs: &a [10.0.0.0/8]\n",
	"nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n    - 11.0.0.0/8\n",
	"masqLinkLocal:true\n",
	"# only a comment\n",
	"nonMasqueradeCIDRs:\r\n  - 10.0.0.0/8\r\n",
}

// When the fast path answers, it answers as the general YAML parser does.
func checkFastYAML(t *testing.T, data []byte) bool {
	fast, present, ok := fastYAMLToJSON(data)
	if !ok {
		return false
	}
	slow, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatalf("fast path accepted %q, the YAML parser rejects it: %v", data, err)
	}
	var a, b any
	if err := json.Unmarshal(fast, &a); err != nil {
		t.Fatalf("fast path wrote invalid JSON %s for %q: %v", fast, data, err)
	}
	if err := json.Unmarshal(slow, &b); err != nil {
		t.Fatalf("YAML parser wrote invalid JSON %s: %v", slow, err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("for %q the fast path says %s, the YAML parser %s", data, fast, slow)
	}
	for i, k := range configKeys {
		_, has := a.(map[string]any)[k]
		if has != (present&(1<<i) != 0) {
			t.Fatalf("for %q the fast path reports key %s present=%v", data, k, !has)
		}
	}
	// ParseConfig takes the list from the fast path directly, not from
	// its JSON: the Config (nil or empty list included) and the error must
	// be those of the general parser's JSON.
	for _, opts := range []ParseOptions{{}, {EnableIPv6: true}} {
		got, _, gotErr := ParseConfig(data, opts)
		want, _, wantErr := ParseConfig(slow, opts)
		if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) || !reflect.DeepEqual(got, want) {
			t.Fatalf("for %q ParseConfig gives %+v, %v; through the YAML parser %+v, %v", data, got, gotErr, want, wantErr)
		}
	}
	return true
}

func TestFastYAMLAgrees(t *testing.T) {
	taken := 0
	for _, s := range fastYAMLSeeds {
		if checkFastYAML(t, []byte(s)) {
			taken++
		}
	}
	if taken != 7 {
		t.Errorf("fast path took %d of the seeds, want the first 7", taken)
	}
}

// A large generated list, the case the fast path exists for, takes it and
// parses to the same config.
func TestFastYAMLLargeList(t *testing.T) {
	var b strings.Builder
	b.WriteString("# generated\nresyncInterval: 60s\nnonMasqueradeCIDRs:\n")
	for i := range 20000 {
		fmt.Fprintf(&b, "  - %d.%d.%d.0/24\n", 20+i%70, (i/70)%256, i%256)
	}
	if !checkFastYAML(t, []byte(b.String())) {
		t.Fatal("fast path refused a plain generated list")
	}
}

func FuzzFastYAML(f *testing.F) {
	for _, s := range fastYAMLSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) { checkFastYAML(t, data) })
}

func BenchmarkParseConfigYAML100k(b *testing.B) {
	var s strings.Builder
	s.WriteString("nonMasqueradeCIDRs:\n")
	for i := range 100000 {
		fmt.Fprintf(&s, "  - %d.%d.%d.0/24\n", 20+i%70, (i/70)%256, i%256)
	}
	data := []byte(s.String())
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := ParseConfig(data, ParseOptions{AllReservedRanges: true}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("general-yaml", func(b *testing.B) {
		for b.Loop() {
			if _, err := yaml.YAMLToJSON(data); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// fastYAMLToJSON renders fastYAML's answer as one JSON object, the form
// the general parser gives, for checkFastYAML to compare.
func fastYAMLToJSON(data []byte) (js []byte, present int, ok bool) {
	f, ok := fastYAML(data)
	if !ok {
		return nil, 0, false
	}
	if f.present&cidrsKey == 0 {
		return f.js, f.present, true
	}
	js = f.js[:len(f.js)-1] // reopen the object
	if len(js) > 1 {
		js = append(js, ',')
	}
	js = append(js, `"nonMasqueradeCIDRs":`...)
	if f.cidrs == nil {
		js = append(js, "null"...)
	} else {
		js = append(js, '[')
		for i, c := range f.cidrs {
			if i > 0 {
				js = append(js, ',')
			}
			js = appendQuoted(js, []byte(c))
		}
		js = append(js, ']')
	}
	return append(js, '}'), f.present, true
}
