package nat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"sigs.k8s.io/yaml"
)

// DefaultConfigPath is where ip-masq-agent's ConfigMap is mounted, and so
// where nfmasq looks for the config file unless told otherwise.
const DefaultConfigPath = "/etc/config/ip-masq-agent"

// DefaultCIDRLimit is the cidrLimit in force when the file does not set
// one. Upstream's is 64, a guard against pasting a huge list into a chain
// of one iptables rule per CIDR. nfmasq decides with a compiled table, so
// long lists are cheap, and the guard only protects against a runaway
// generator. A file that sets cidrLimit gets exactly upstream's check.
const DefaultCIDRLimit = 200_000

// DefaultResyncInterval is upstream's default resyncInterval.
const DefaultResyncInterval = 60 * time.Second

// Link-local ranges, which are not masqueraded unless the config says so.
var (
	LinkLocalIPv4 = netip.MustParsePrefix("169.254.0.0/16")
	LinkLocalIPv6 = netip.MustParsePrefix("fe80::/10")
)

// rfc1918 is upstream ip-masq-agent's default list.
var rfc1918 = []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}

// reservedRanges completes GKE's default list (ip-masq-agent's
// --nomasq-all-reserved-ranges).
var reservedRanges = []string{
	"100.64.0.0/10",   // RFC 6598, carrier-grade NAT
	"192.0.0.0/24",    // RFC 6890
	"192.0.2.0/24",    // RFC 5737, TEST-NET-1
	"192.88.99.0/24",  // RFC 7526, 6to4 relay
	"198.18.0.0/15",   // RFC 6815, benchmarking
	"198.51.100.0/24", // RFC 5737, TEST-NET-2
	"203.0.113.0/24",  // RFC 5737, TEST-NET-3
	"240.0.0.0/4",     // RFC 5735, former class E
}

// DefaultNonMasqueradeCIDRs returns the destinations that keep the pod
// address when no list is configured: GKE's eleven ranges when
// allReserved is true (nfmasq's default), upstream ip-masq-agent's
// RFC 1918 ranges otherwise. The caller owns the returned slice.
func DefaultNonMasqueradeCIDRs(allReserved bool) []string {
	out := slices.Clone(rfc1918)
	if allReserved {
		out = append(out, reservedRanges...)
	}
	return out
}

// Config is the ip-masq-agent config file. Field names and JSON keys are
// upstream's; a Config is a plain value and the caller owns its slice.
type Config struct {
	// NonMasqueradeCIDRs are the destinations for which the pod address is
	// kept. A list given in the file replaces the defaults.
	NonMasqueradeCIDRs []string
	// MasqLinkLocal masquerades 169.254.0.0/16 too.
	MasqLinkLocal bool
	// MasqLinkLocalIPv6 masquerades fe80::/10 too.
	MasqLinkLocalIPv6 bool
	// ResyncInterval is how often the file is re-read.
	ResyncInterval time.Duration
	// CIDRLimit is the most entries NonMasqueradeCIDRs may hold.
	CIDRLimit int
	// CustomCIDRs is true when NonMasqueradeCIDRs came from the file (the
	// key was present, even with an empty list) rather than the defaults.
	// Decisions report source "config" or "default" from it.
	CustomCIDRs bool
}

// DefaultConfig is the Config in force when there is no file, or the file
// sets nothing. allReserved selects GKE's list (see
// DefaultNonMasqueradeCIDRs).
func DefaultConfig(allReserved bool) Config {
	return Config{
		NonMasqueradeCIDRs: DefaultNonMasqueradeCIDRs(allReserved),
		ResyncInterval:     DefaultResyncInterval,
		CIDRLimit:          DefaultCIDRLimit,
	}
}

// MarshalJSON writes the Config in the file's own format, with
// resyncInterval as a duration string, so the output can be fed back as a
// config file.
func (c Config) MarshalJSON() ([]byte, error) {
	cidrs := c.NonMasqueradeCIDRs
	if cidrs == nil {
		cidrs = []string{}
	}
	return json.Marshal(struct {
		NonMasqueradeCIDRs []string `json:"nonMasqueradeCIDRs"`
		MasqLinkLocal      bool     `json:"masqLinkLocal"`
		MasqLinkLocalIPv6  bool     `json:"masqLinkLocalIPv6"`
		ResyncInterval     string   `json:"resyncInterval"`
		CIDRLimit          int      `json:"cidrLimit"`
	}{cidrs, c.MasqLinkLocal, c.MasqLinkLocalIPv6, c.ResyncInterval.String(), c.CIDRLimit})
}

// ParseOptions are the agent flags that change how a config file is read.
type ParseOptions struct {
	// AllReservedRanges selects GKE's default list
	// (--nomasq-all-reserved-ranges).
	AllReservedRanges bool
	// EnableIPv6 permits IPv6 CIDRs (--enable-ipv6).
	EnableIPv6 bool
}

// WarningKind classifies a Warning.
type WarningKind uint8

// Kinds of Warning.
const (
	// UnknownKey: the file has a key ip-masq-agent does not know; it is
	// ignored, as upstream ignores it.
	UnknownKey WarningKind = iota + 1
	// KeyCase: a key matched a known key only case-insensitively; it is
	// applied, as upstream (encoding/json) applies it.
	KeyCase
	// NoConfigFile: there is no file, so the defaults apply. Not a fault
	// (the ConfigMap is optional) but worth saying.
	NoConfigFile
)

// Warning is something about a config file worth telling the operator
// that does not stop it from being used.
type Warning struct {
	Kind WarningKind
	// Key is the offending key, for UnknownKey and KeyCase.
	Key string
	// Message is the human-readable text.
	Message string
}

// String returns the message.
func (w Warning) String() string { return w.Message }

// configKeys are upstream's keys, spelt as upstream spells them.
var configKeys = []string{"nonMasqueradeCIDRs", "cidrLimit", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval"}

// LoadConfig reads and parses the config file at path. A missing file is not
// an error: it yields the defaults and a NoConfigFile warning. Errors name
// the path and keep ip-masq-agent's texts.
func LoadConfig(path string, opts ParseOptions) (Config, []Warning, error) {
	data, err := os.ReadFile(path)
	return ConfigFile(path, data, err, opts)
}

// ConfigFile is LoadConfig for a file the caller read itself: data and
// err are what os.ReadFile returned for path. The agent reads the file
// first so that it can skip a reload when the bytes did not change.
func ConfigFile(path string, data []byte, err error, opts ParseOptions) (Config, []Warning, error) {
	if errors.Is(err, fs.ErrNotExist) {
		return DefaultConfig(opts.AllReservedRanges), []Warning{{
			Kind:    NoConfigFile,
			Message: fmt.Sprintf("no config file at %q, using defaults", path),
		}}, nil
	}
	if err != nil {
		return Config{}, nil, fmt.Errorf("read config: %w", err)
	}
	c, warnings, err := ParseConfig(data, opts)
	if err != nil {
		return Config{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, warnings, nil
}

// ParseConfig parses an ip-masq-agent config file (YAML or JSON) the way
// ip-masq-agent v2.12 does: keys present override the defaults, an empty
// (or whitespace-, comment-only, or null) file means the defaults,
// `nonMasqueradeCIDRs:` with no value means an empty list, and the result
// is validated with upstream's error texts.
//
// Where nfmasq differs from upstream, on purpose:
//   - cidrLimit defaults to DefaultCIDRLimit, not 64;
//   - a null resyncInterval keeps the default (upstream fails on it);
//   - resyncInterval <= 0 and cidrLimit < 0 are errors (upstream would
//     accept them and then spin, or reject every list);
//   - IPv4-mapped IPv6 CIDRs are errors (upstream accepts them and then
//     fails in iptables-restore);
//   - syntax errors always name a line;
//   - unknown keys and case-insensitive key matches produce warnings.
func ParseConfig(data []byte, opts ParseOptions) (Config, []Warning, error) {
	c := DefaultConfig(opts.AllReservedRanges)
	if len(bytes.TrimSpace(data)) == 0 {
		return c, nil, nil
	}
	// Plain YAML takes the fast path, which hands over the CIDR list
	// as strings; everything else is converted to JSON.
	var (
		js     []byte
		isJSON bool
		fast   fastFile
		isFast bool
		err    error
	)
	if !looksLikeJSON(data) {
		fast, isFast = fastYAML(data)
	}
	switch {
	case isFast:
		js = fast.js
	case looksLikeJSON(data):
		js, isJSON = data, true
	default:
		if js, err = toJSONGeneral(data); err != nil {
			return Config{}, nil, err
		}
	}
	// MasqConfig is upstream's type name, so type errors read the same
	// ("... into Go struct field MasqConfig.cidrLimit of type int").
	type MasqConfig struct {
		NonMasqueradeCIDRs []string `json:"nonMasqueradeCIDRs"`
		CidrLimit          int      `json:"cidrLimit"`
		MasqLinkLocal      bool     `json:"masqLinkLocal"`
		MasqLinkLocalIPv6  bool     `json:"masqLinkLocalIPv6"`
		ResyncInterval     duration `json:"resyncInterval"`
	}
	mc := MasqConfig{
		NonMasqueradeCIDRs: c.NonMasqueradeCIDRs,
		CidrLimit:          c.CIDRLimit,
		ResyncInterval:     duration(c.ResyncInterval),
	}
	if err := json.Unmarshal(js, &mc); err != nil {
		if isJSON {
			err = withJSONPosition(data, err)
		}
		return Config{}, nil, err
	}
	if isFast && fast.present&cidrsKey != 0 {
		mc.NonMasqueradeCIDRs = fast.cidrs
	}
	c = Config{
		NonMasqueradeCIDRs: mc.NonMasqueradeCIDRs,
		MasqLinkLocal:      mc.MasqLinkLocal,
		MasqLinkLocalIPv6:  mc.MasqLinkLocalIPv6,
		ResyncInterval:     time.Duration(mc.ResyncInterval),
		CIDRLimit:          mc.CidrLimit,
	}
	var warnings []Warning
	if isFast {
		// The fast path takes only known keys, spelt exactly: no
		// warnings, and no need to decode the keys a second time.
		c.CustomCIDRs = fast.present&cidrsKey != 0
	} else {
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(js, &keys); err != nil {
			// Unreachable: the same bytes just decoded into a struct, so
			// they hold an object or null.
			return Config{}, nil, fmt.Errorf("config keys: %w", err)
		}
		warnings = keyWarnings(keys)
		for k := range keys {
			// encoding/json matches keys case-insensitively, and a null
			// list decodes to nil: either way the key replaces the
			// defaults.
			if strings.EqualFold(k, "nonMasqueradeCIDRs") {
				c.CustomCIDRs = true
			}
		}
	}
	if err := c.Validate(opts.EnableIPv6); err != nil {
		return Config{}, nil, err
	}
	return c, warnings, nil
}

func keyWarnings(keys map[string]json.RawMessage) []Warning {
	var warnings []Warning
	for k := range keys {
		if slices.Contains(configKeys, k) {
			continue
		}
		i := slices.IndexFunc(configKeys, func(known string) bool { return strings.EqualFold(k, known) })
		if i >= 0 {
			warnings = append(warnings, Warning{
				Kind:    KeyCase,
				Key:     k,
				Message: fmt.Sprintf("key %q applied as %q (keys match case-insensitively, as in ip-masq-agent)", k, configKeys[i]),
			})
			continue
		}
		warnings = append(warnings, Warning{
			Kind:    UnknownKey,
			Key:     k,
			Message: fmt.Sprintf("unknown key %q ignored", k),
		})
	}
	slices.SortFunc(warnings, func(a, b Warning) int { return strings.Compare(a.Key, b.Key) })
	return warnings
}

// Validate checks c as ip-masq-agent does, in upstream's order and with its
// texts, plus nfmasq's bounds on cidrLimit and resyncInterval. enableIPv6
// is the agent's --enable-ipv6.
func (c Config) Validate(enableIPv6 bool) error {
	_, err := c.prefixes(enableIPv6)
	return err
}

// prefixes validates c and returns NonMasqueradeCIDRs parsed, in order.
func (c Config) prefixes(enableIPv6 bool) ([]netip.Prefix, error) {
	if c.CIDRLimit < 0 {
		return nil, fmt.Errorf("cidrLimit must not be negative, got %d", c.CIDRLimit)
	}
	// Upstream accepts 0s and then re-reads the file in a busy loop.
	if c.ResyncInterval <= 0 {
		return nil, fmt.Errorf("resyncInterval must be positive, got %s", c.ResyncInterval)
	}
	n, l := len(c.NonMasqueradeCIDRs), c.CIDRLimit
	if n > l {
		return nil, fmt.Errorf("the daemon can only accept up to %d CIDRs (excluding link-local), but got %d CIDRs (excluding link local)", l, n)
	}
	out := make([]netip.Prefix, 0, n)
	for _, s := range c.NonMasqueradeCIDRs {
		p, err := parseCIDR(s)
		if err != nil {
			return nil, err
		}
		if !enableIPv6 && p.Addr().Is6() {
			return nil, fmt.Errorf("ipv6 is not enabled, but ipv6 cidr %s provided. Enable ipv6 using --enable-ipv6 agent flag", s)
		}
		out = append(out, p)
	}
	return out, nil
}

// duration decodes a JSON string with time.ParseDuration, like upstream's
// Duration type; a bare number ("resyncInterval: 60") is an error there and
// here.
type duration time.Duration

func (d *duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	if len(b) == 0 || b[0] != '"' {
		return fmt.Errorf("expected string value for unmarshal to field of type Duration, got %q", b)
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	t, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = duration(t)
	return nil
}

// toJSON converts one YAML document to JSON, like apimachinery's
// yaml.ToJSON (which upstream uses): input that looks like a JSON object is
// passed through untouched, so its syntax errors are JSON's. (Config files
// try the fast path first, in ParseConfig; egress policies have keys it
// does not know.)
func toJSON(data []byte) (js []byte, isJSON bool, err error) {
	if looksLikeJSON(data) {
		return data, true, nil
	}
	js, err = toJSONGeneral(data)
	return js, false, err
}

func looksLikeJSON(data []byte) bool {
	return bytes.HasPrefix(bytes.TrimLeftFunc(data, unicode.IsSpace), []byte("{"))
}

// toJSONGeneral converts YAML with the general parser.
func toJSONGeneral(data []byte) ([]byte, error) {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, withYAMLLine(err)
	}
	return js, nil
}

// yamlParserProblems are the YAML library's parser (as opposed to
// scanner) problems. For these it prints the zero-based line of the fault,
// one less than the line an editor shows; scanner problems get it right.
var yamlParserProblems = []string{
	"did not find expected ',' or ']'",
	"did not find expected ',' or '}'",
	"did not find expected '-' indicator",
	"did not find expected <document start>",
	"did not find expected <stream-start>",
	"did not find expected key",
	"did not find expected node content",
	"found duplicate %TAG directive",
	"found duplicate %YAML directive",
	"found incompatible YAML document",
	"found undefined tag handle",
}

// withYAMLLine makes every YAML syntax error name the line an editor
// shows. The library leaves the line out when the fault is on the first
// one (it prints none for zero) and counts parser faults from zero.
func withYAMLLine(err error) error {
	rest, ok := strings.CutPrefix(err.Error(), "yaml: ")
	if !ok || strings.Contains(rest, "\n") {
		return err // not a syntax error (for example "unmarshal errors")
	}
	line := 1
	if l, problem, ok := strings.Cut(rest, ": "); ok && strings.HasPrefix(l, "line ") {
		n, convErr := strconv.Atoi(strings.TrimPrefix(l, "line "))
		if convErr != nil {
			return err
		}
		line, rest = n, problem
		if slices.Contains(yamlParserProblems, problem) {
			line++
		}
	}
	return fmt.Errorf("yaml: line %d: %s", line, rest)
}

// withJSONPosition appends the line and column to JSON errors that carry
// an offset, keeping encoding/json's text (which is what upstream prints)
// first.
func withJSONPosition(data []byte, err error) error {
	var offset int64
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		offset = syn.Offset
	case errors.As(err, &typ):
		offset = typ.Offset
	default:
		return err
	}
	line, col := position(data, offset)
	return fmt.Errorf("%w at line %d, column %d", err, line, col)
}

// position returns the 1-based line and column of data[offset-1], the
// byte encoding/json stopped at (its offsets count the bytes read,
// including the offending one).
func position(data []byte, offset int64) (line, col int) {
	i := int(min(max(offset-1, 0), int64(len(data))))
	before := data[:i]
	line = bytes.Count(before, []byte("\n")) + 1
	col = i - bytes.LastIndexByte(before, '\n')
	return line, col
}
