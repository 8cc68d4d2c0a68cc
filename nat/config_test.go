package nat

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// upstreamDefaults is ip-masq-agent's default config as nfmasq reads it
// with --nomasq-all-reserved-ranges=false: upstream's list and interval,
// nfmasq's cidrLimit.
func upstreamDefaults() Config {
	return Config{
		NonMasqueradeCIDRs: []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"},
		ResyncInterval:     60 * time.Second,
		CIDRLimit:          DefaultCIDRLimit,
	}
}

func equalConfig(a, b Config) bool {
	return slices.Equal(a.NonMasqueradeCIDRs, b.NonMasqueradeCIDRs) &&
		a.MasqLinkLocal == b.MasqLinkLocal &&
		a.MasqLinkLocalIPv6 == b.MasqLinkLocalIPv6 &&
		a.ResyncInterval == b.ResyncInterval &&
		a.CIDRLimit == b.CIDRLimit &&
		a.CustomCIDRs == b.CustomCIDRs
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// TestValidateUpstreamVectors runs ip-masq-agent's TestConfigValidate
// vectors.
func TestValidateUpstreamVectors(t *testing.T) {
	cfg := func(cidrs ...string) Config {
		return Config{CIDRLimit: 64, ResyncInterval: time.Minute, NonMasqueradeCIDRs: cidrs}
	}
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"empty list", cfg(), ""},
		{"default config", upstreamDefaults(), ""},
		{"not a CIDR", cfg("abcdefg"), `CIDR "abcdefg" could not be parsed, invalid CIDR address: abcdefg`},
		{"one of several not a CIDR", cfg("10.0.0.0/8", "abcdefg"), `CIDR "abcdefg" could not be parsed, invalid CIDR address: abcdefg`},
		{"octet out of range", cfg("10.256.0.0/16"), `CIDR "10.256.0.0/16" could not be parsed, invalid CIDR address: 10.256.0.0/16`},
		{"misaligned", cfg("10.0.0.1/8"), `CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := errString(tt.cfg.Validate(true)); got != tt.want {
				t.Errorf("Validate() = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestParseConfigUpstreamVectors runs ip-masq-agent's TestSyncConfig
// vectors (upstream runs them with --enable-ipv6). The expectations differ
// from upstream's only where nfmasq documents a difference: cidrLimit
// defaults to DefaultCIDRLimit, and syntax errors name their line.
func TestParseConfigUpstreamVectors(t *testing.T) {
	with := func(f func(*Config)) Config {
		c := upstreamDefaults()
		f(&c)
		return c
	}
	tests := []struct {
		name    string
		file    string
		wantErr string
		want    Config
	}{
		{
			name: "valid yaml file, all keys",
			file: "\nnonMasqueradeCIDRs:\n  - 172.16.0.0/12\n  - 10.0.0.0/8\ncidrLimit: 64\nmasqLinkLocal: true\nresyncInterval: 5s\n",
			want: Config{NonMasqueradeCIDRs: []string{"172.16.0.0/12", "10.0.0.0/8"}, MasqLinkLocal: true, CIDRLimit: 64, ResyncInterval: 5 * time.Second, CustomCIDRs: true},
		},
		{
			name: "valid yaml file, just nonMasqueradeCIDRs",
			file: "\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n",
			want: with(func(c *Config) { c.NonMasqueradeCIDRs, c.CustomCIDRs = []string{"192.168.0.0/16"}, true }),
		},
		{
			name: "valid yaml file, just masqLinkLocal",
			file: "\nmasqLinkLocal: true\n",
			want: with(func(c *Config) { c.MasqLinkLocal = true }),
		},
		{
			name: "valid yaml file, just resyncInterval",
			file: "\nresyncInterval: 5m\n",
			want: with(func(c *Config) { c.ResyncInterval = 5 * time.Minute }),
		},
		{
			name:    "invalid yaml file",
			file:    `*`,
			wantErr: "yaml: line 1: did not find expected alphabetic or numeric character",
		},
		{
			name: "valid json file, all keys",
			file: "\n{\n  \"nonMasqueradeCIDRs\": [\"172.16.0.0/12\", \"10.0.0.0/8\"],\n  \"masqLinkLocal\": true,\n  \"resyncInterval\": \"5s\"\n}\n",
			want: Config{NonMasqueradeCIDRs: []string{"172.16.0.0/12", "10.0.0.0/8"}, MasqLinkLocal: true, CIDRLimit: DefaultCIDRLimit, ResyncInterval: 5 * time.Second, CustomCIDRs: true},
		},
		{
			name: "valid json file, just nonMasqueradeCIDRs",
			file: "\n{\n\t\"nonMasqueradeCIDRs\": [\"192.168.0.0/16\"]\n}\n",
			want: with(func(c *Config) { c.NonMasqueradeCIDRs, c.CustomCIDRs = []string{"192.168.0.0/16"}, true }),
		},
		{
			name: "valid json file, just masqLinkLocal",
			file: "\n{\n\t\"masqLinkLocal\": true\n}\n",
			want: with(func(c *Config) { c.MasqLinkLocal = true }),
		},
		{
			name: "valid json file, just resyncInterval",
			file: "\n{\n\t\"resyncInterval\": \"5m\"\n}\n",
			want: with(func(c *Config) { c.ResyncInterval = 5 * time.Minute }),
		},
		{
			name:    "invalid json file",
			file:    `{*`,
			wantErr: "invalid character '*' looking for beginning of object key string at line 1, column 2",
		},
		{
			name: "valid json file, all keys with ipv6 cidr",
			file: "\n\t\t{\n\t\t  \"nonMasqueradeCIDRs\": [\"172.16.0.0/12\", \"10.0.0.0/8\", \"fc00::/7\"],\n\t\t  \"masqLinkLocal\": true,\n\t\t  \"resyncInterval\": \"5s\"\n\t\t}\n\t\t",
			want: Config{NonMasqueradeCIDRs: []string{"172.16.0.0/12", "10.0.0.0/8", "fc00::/7"}, MasqLinkLocal: true, CIDRLimit: DefaultCIDRLimit, ResyncInterval: 5 * time.Second, CustomCIDRs: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, warnings, err := ParseConfig([]byte(tt.file), ParseOptions{EnableIPv6: true})
			if errString(err) != tt.wantErr {
				t.Fatalf("ParseConfig() error = %q, want %q", errString(err), tt.wantErr)
			}
			if len(warnings) != 0 {
				t.Errorf("warnings = %v, want none", warnings)
			}
			if err == nil && !equalConfig(got, tt.want) {
				t.Errorf("ParseConfig() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestParseConfigRules covers issue 2 §2 bullet by bullet.
func TestParseConfigRules(t *testing.T) {
	gke := DefaultConfig(true)
	tests := []struct {
		name     string
		file     string
		opts     ParseOptions
		want     Config // checked when wantErr is empty
		wantErr  string
		warnings []string
	}{
		// Only keys present override; no content means defaults.
		{name: "empty file", file: "", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "whitespace only", file: " \n\t\n  \r\n", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "comments only", file: "# ip-masq-agent config\n   # nothing set\n", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "yaml null", file: "null\n", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "yaml tilde", file: "~", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "empty json object", file: "{}", opts: ParseOptions{AllReservedRanges: true}, want: gke},
		{name: "upstream defaults without reserved ranges", file: "", want: upstreamDefaults()},
		{
			name: "empty nonMasqueradeCIDRs value means an empty list",
			file: "nonMasqueradeCIDRs:\nmasqLinkLocal: true\n",
			opts: ParseOptions{AllReservedRanges: true},
			want: Config{NonMasqueradeCIDRs: nil, MasqLinkLocal: true, ResyncInterval: time.Minute, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true},
		},
		{
			name: "explicit empty list",
			file: `{"nonMasqueradeCIDRs": []}`,
			opts: ParseOptions{AllReservedRanges: true},
			want: Config{NonMasqueradeCIDRs: []string{}, ResyncInterval: time.Minute, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true},
		},
		{
			name: "null scalars keep their defaults",
			file: "cidrLimit:\nmasqLinkLocal:\nresyncInterval:\n",
			opts: ParseOptions{AllReservedRanges: true},
			want: gke,
		},
		{
			name: "masqLinkLocalIPv6",
			file: "masqLinkLocalIPv6: true\n",
			want: func() Config { c := upstreamDefaults(); c.MasqLinkLocalIPv6 = true; return c }(),
		},
		// Upstream's error texts.
		{name: "unparsable CIDR", file: "nonMasqueradeCIDRs: [abcdefg]", wantErr: `CIDR "abcdefg" could not be parsed, invalid CIDR address: abcdefg`},
		{name: "misaligned CIDR", file: "nonMasqueradeCIDRs: [10.0.0.1/8]", wantErr: `CIDR "10.0.0.1/8" is not aligned to a CIDR block, ip: "10.0.0.1" network: "10.0.0.0/8"`},
		{
			name:    "cidrLimit exceeded",
			file:    "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\n",
			wantErr: "the daemon can only accept up to 2 CIDRs (excluding link-local), but got 3 CIDRs (excluding link local)",
		},
		{
			name:    "cidrLimit counts the defaults when no list is given, as upstream",
			file:    "cidrLimit: 2\n",
			opts:    ParseOptions{AllReservedRanges: true},
			wantErr: "the daemon can only accept up to 2 CIDRs (excluding link-local), but got 11 CIDRs (excluding link local)",
		},
		{
			name: "cidrLimit exactly reached",
			file: "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\n",
			want: Config{NonMasqueradeCIDRs: []string{"10.0.0.0/8", "172.16.0.0/12"}, ResyncInterval: time.Minute, CIDRLimit: 2, CustomCIDRs: true},
		},
		{
			name: "cidrLimit zero with an empty list",
			file: "cidrLimit: 0\nnonMasqueradeCIDRs: []\n",
			want: Config{NonMasqueradeCIDRs: []string{}, ResyncInterval: time.Minute, CIDRLimit: 0, CustomCIDRs: true},
		},
		{name: "ipv6 without --enable-ipv6", file: "nonMasqueradeCIDRs: [10.0.0.0/8, fc00::/7]", wantErr: "ipv6 is not enabled, but ipv6 cidr fc00::/7 provided. Enable ipv6 using --enable-ipv6 agent flag"},
		{
			name: "ipv6 with --enable-ipv6",
			file: "nonMasqueradeCIDRs: [10.0.0.0/8, fc00::/7]\nmasqLinkLocalIPv6: true\n",
			opts: ParseOptions{EnableIPv6: true},
			want: Config{NonMasqueradeCIDRs: []string{"10.0.0.0/8", "fc00::/7"}, MasqLinkLocalIPv6: true, ResyncInterval: time.Minute, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true},
		},
		{name: "misaligned ipv6", file: "nonMasqueradeCIDRs: [\"fc00::1/7\"]", opts: ParseOptions{EnableIPv6: true}, wantErr: `CIDR "fc00::1/7" is not aligned to a CIDR block, ip: "fc00::1" network: "fc00::/7"`},
		{name: "ipv4-mapped ipv6", file: `nonMasqueradeCIDRs: ["::ffff:10.0.0.0/104"]`, opts: ParseOptions{EnableIPv6: true}, wantErr: `CIDR "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR`},
		// resyncInterval is a duration string.
		{name: "resyncInterval without unit", file: "resyncInterval: 60\n", wantErr: `expected string value for unmarshal to field of type Duration, got "60"`},
		{name: "resyncInterval not a duration", file: "resyncInterval: soon\n", wantErr: `time: invalid duration "soon"`},
		{name: "resyncInterval zero", file: "resyncInterval: 0s\n", wantErr: "resyncInterval must be positive, got 0s"},
		{name: "resyncInterval negative", file: `{"resyncInterval": "-5s"}`, wantErr: "resyncInterval must be positive, got -5s"},
		{name: "cidrLimit negative", file: "cidrLimit: -1\n", wantErr: "cidrLimit must not be negative, got -1"},
		{name: "cidrLimit not a number", file: "cidrLimit: many\n", wantErr: "json: cannot unmarshal string into Go struct field MasqConfig.cidrLimit of type int"},
		{name: "not an object", file: "- 10.0.0.0/8\n", wantErr: "json: cannot unmarshal array into Go value of type nat.MasqConfig"},
		// Syntax errors name their line.
		{name: "yaml error on a later line", file: "masqLinkLocal: true\nnonMasqueradeCIDRs:\n  - 10.0.0.0/8\n bad: [\n", wantErr: "yaml: line 4: did not find expected key"},
		{name: "yaml tab", file: "masqLinkLocal: true\n\tcidrLimit: 3\n", wantErr: "yaml: line 2: found a tab character that violates indentation"},
		{name: "yaml error on the first line", file: "key: value: x\n", wantErr: "yaml: line 1: mapping values are not allowed in this context"},
		{name: "yaml parser error on the first line", file: "[a, b\n", wantErr: "yaml: line 2: did not find expected ',' or ']'"},
		{name: "yaml parser error in a flow mapping", file: "masqLinkLocal: true\nx: {a: b\n", wantErr: "yaml: line 3: did not find expected ',' or '}'"},
		{name: "yaml scanner error later", file: "masqLinkLocal: true\nx: 'open\n", wantErr: "yaml: line 3: found unexpected end of stream"},
		{name: "json error on a later line", file: "{\n  \"masqLinkLocal\": true,\n  \"cidrLimit\": 3,,\n}\n", wantErr: "invalid character ',' looking for beginning of object key string at line 3, column 18"},
		{name: "json type error has its line", file: "{\n  \"cidrLimit\": \"3\"\n}", wantErr: "json: cannot unmarshal string into Go struct field MasqConfig.cidrLimit of type int at line 2, column 18"},
		// Unknown keys are accepted, with a warning.
		{
			name:     "unknown key",
			file:     "nonMasqueradeCidr:\n  - 10.0.0.0/8\nmasqLinkLocal: true\n",
			want:     func() Config { c := upstreamDefaults(); c.MasqLinkLocal = true; return c }(),
			warnings: []string{`unknown key "nonMasqueradeCidr" ignored`},
		},
		{
			name:     "keys match case-insensitively, as upstream",
			file:     `{"nonmasqueradecidrs": ["10.0.0.0/8"], "MASQLINKLOCAL": true, "typo": 1}`,
			want:     Config{NonMasqueradeCIDRs: []string{"10.0.0.0/8"}, MasqLinkLocal: true, ResyncInterval: time.Minute, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true},
			warnings: []string{`key "MASQLINKLOCAL" applied as "masqLinkLocal" (keys match case-insensitively, as in ip-masq-agent)`, `key "nonmasqueradecidrs" applied as "nonMasqueradeCIDRs" (keys match case-insensitively, as in ip-masq-agent)`, `unknown key "typo" ignored`},
		},
		{
			name: "nfmasq accepts CIDRs net.ParseCIDR accepts",
			file: "nonMasqueradeCIDRs: [10.0.0.0/08]\n",
			want: Config{NonMasqueradeCIDRs: []string{"10.0.0.0/08"}, ResyncInterval: time.Minute, CIDRLimit: DefaultCIDRLimit, CustomCIDRs: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, warnings, err := ParseConfig([]byte(tt.file), tt.opts)
			if errString(err) != tt.wantErr {
				t.Fatalf("ParseConfig() error = %q, want %q", errString(err), tt.wantErr)
			}
			if err != nil {
				return
			}
			if !equalConfig(got, tt.want) {
				t.Errorf("ParseConfig() = %+v, want %+v", got, tt.want)
			}
			var msgs []string
			for _, w := range warnings {
				msgs = append(msgs, w.String())
			}
			if !slices.Equal(msgs, tt.warnings) {
				t.Errorf("warnings = %q, want %q", msgs, tt.warnings)
			}
		})
	}
}

func TestParseConfigWarningKinds(t *testing.T) {
	_, warnings, err := ParseConfig([]byte("nonMasqueradeCidr: []\nresyncinterval: 5s\n"), ParseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Warning{
		{Kind: UnknownKey, Key: "nonMasqueradeCidr", Message: `unknown key "nonMasqueradeCidr" ignored`},
		{Kind: KeyCase, Key: "resyncinterval", Message: `key "resyncinterval" applied as "resyncInterval" (keys match case-insensitively, as in ip-masq-agent)`},
	}
	if !slices.Equal(warnings, want) {
		t.Errorf("warnings = %+v, want %+v", warnings, want)
	}
}

// TestCIDRLimitDefault: without a cidrLimit key the limit is
// DefaultCIDRLimit, which takes a list upstream's 64 would refuse.
func TestCIDRLimitDefault(t *testing.T) {
	list := func(n int) []byte {
		var b strings.Builder
		b.WriteString(`{"nonMasqueradeCIDRs":[`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"10.%d.%d.%d/32"`, i>>16&0xff, i>>8&0xff, i&0xff)
		}
		b.WriteString(`]}`)
		return []byte(b.String())
	}
	if DefaultCIDRLimit < 100_000 {
		t.Fatalf("DefaultCIDRLimit = %d, the issue asks for at least 100,000", DefaultCIDRLimit)
	}
	c, _, err := ParseConfig(list(DefaultCIDRLimit), ParseOptions{})
	if err != nil {
		t.Fatalf("%d CIDRs: %v", DefaultCIDRLimit, err)
	}
	if len(c.NonMasqueradeCIDRs) != DefaultCIDRLimit {
		t.Fatalf("got %d CIDRs", len(c.NonMasqueradeCIDRs))
	}
	_, _, err = ParseConfig(list(DefaultCIDRLimit+1), ParseOptions{})
	want := fmt.Sprintf("the daemon can only accept up to %d CIDRs (excluding link-local), but got %d CIDRs (excluding link local)", DefaultCIDRLimit, DefaultCIDRLimit+1)
	if errString(err) != want {
		t.Fatalf("error = %q, want %q", errString(err), want)
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("missing file means defaults, reported", func(t *testing.T) {
		path := filepath.Join(dir, "absent")
		c, warnings, err := LoadConfig(path, ParseOptions{AllReservedRanges: true})
		if err != nil {
			t.Fatal(err)
		}
		if !equalConfig(c, DefaultConfig(true)) {
			t.Errorf("config = %+v, want defaults", c)
		}
		want := []Warning{{Kind: NoConfigFile, Message: fmt.Sprintf("no config file at %q, using defaults", path)}}
		if !slices.Equal(warnings, want) {
			t.Errorf("warnings = %+v, want %+v", warnings, want)
		}
	})

	t.Run("errors name the file", func(t *testing.T) {
		path := write("bad", "nonMasqueradeCIDRs: [abcdefg]\n")
		_, _, err := LoadConfig(path, ParseOptions{})
		want := path + `: CIDR "abcdefg" could not be parsed, invalid CIDR address: abcdefg`
		if errString(err) != want {
			t.Errorf("error = %q, want %q", errString(err), want)
		}
	})

	t.Run("a directory is a read error", func(t *testing.T) {
		if _, _, err := LoadConfig(dir, ParseOptions{}); err == nil {
			t.Error("LoadConfig(directory) succeeded")
		}
	})

	t.Run("ConfigMap mount with symlinks", func(t *testing.T) {
		// A mounted ConfigMap is ip-masq-agent -> ..data/ip-masq-agent,
		// ..data -> ..timestamp.
		mount := filepath.Join(dir, "mount")
		ts := filepath.Join(mount, "..2024_01_01")
		if err := os.MkdirAll(ts, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ts, "ip-masq-agent"), []byte("masqLinkLocal: true\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("..2024_01_01", filepath.Join(mount, "..data")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("..data/ip-masq-agent", filepath.Join(mount, "ip-masq-agent")); err != nil {
			t.Fatal(err)
		}
		c, warnings, err := LoadConfig(filepath.Join(mount, "ip-masq-agent"), ParseOptions{})
		if err != nil || len(warnings) != 0 || !c.MasqLinkLocal {
			t.Errorf("LoadConfig() = %+v, %v, %v", c, warnings, err)
		}
	})
}

func TestConfigMarshalJSON(t *testing.T) {
	got, err := DefaultConfig(false).MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"nonMasqueradeCIDRs":["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16"],"masqLinkLocal":false,"masqLinkLocalIPv6":false,"resyncInterval":"1m0s","cidrLimit":200000}`
	if string(got) != want {
		t.Errorf("MarshalJSON() = %s, want %s", got, want)
	}
	got, _ = Config{ResyncInterval: time.Second}.MarshalJSON()
	if !strings.Contains(string(got), `"nonMasqueradeCIDRs":[]`) {
		t.Errorf("nil list marshals as %s, want []", got)
	}
}

func TestDefaultNonMasqueradeCIDRs(t *testing.T) {
	gke := []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "192.0.0.0/24",
		"192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4"}
	if got := DefaultNonMasqueradeCIDRs(true); !slices.Equal(got, gke) {
		t.Errorf("GKE defaults = %v, want %v", got, gke)
	}
	if got := DefaultNonMasqueradeCIDRs(false); !slices.Equal(got, gke[:3]) {
		t.Errorf("RFC 1918 defaults = %v, want %v", got, gke[:3])
	}
	a := DefaultNonMasqueradeCIDRs(true)
	a[0] = "changed"
	if DefaultNonMasqueradeCIDRs(true)[0] != "10.0.0.0/8" {
		t.Error("DefaultNonMasqueradeCIDRs shares its slice")
	}
}
