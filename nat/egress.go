package nat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
)

// EgressNATPolicy's API group/version and kind, as GKE defines them.
const (
	EgressPolicyAPIVersion = "networking.gke.io/v1"
	EgressPolicyKind       = "EgressNATPolicy"
	// EgressPolicyNoSNAT is the only action GKE defines: keep the pod
	// address for the policy's destinations.
	EgressPolicyNoSNAT = "NoSNAT"
)

// EgressPolicy is a validated EgressNATPolicy: the destinations for which
// the pod address is kept.
type EgressPolicy struct {
	// Name is metadata.name; decisions report it as their Origin.
	Name string
	// Destinations are spec.destinations[].cidr, canonical, in order.
	Destinations []netip.Prefix
}

// NewEgressPolicy validates the fields of an EgressNATPolicy object that
// nfmasq uses. The error names the policy and the offending field, and
// keeps ip-masq-agent's CIDR texts. Both address families are accepted;
// whether IPv6 is in use is the policy's concern (see Input.EnableIPv6).
func NewEgressPolicy(name, action string, cidrs []string) (EgressPolicy, error) {
	if name == "" {
		return EgressPolicy{}, fmt.Errorf("%s: metadata.name is empty", EgressPolicyKind)
	}
	if action != EgressPolicyNoSNAT {
		return EgressPolicy{}, fmt.Errorf("%s %q: spec.action %q is not supported, want %q", EgressPolicyKind, name, action, EgressPolicyNoSNAT)
	}
	p := EgressPolicy{Name: name, Destinations: make([]netip.Prefix, 0, len(cidrs))}
	for i, s := range cidrs {
		prefix, err := parseCIDR(s)
		if err != nil {
			return EgressPolicy{}, fmt.Errorf("%s %q: spec.destinations[%d].cidr: %w", EgressPolicyKind, name, i, err)
		}
		p.Destinations = append(p.Destinations, prefix)
	}
	return p, nil
}

// egressObject is the part of an EgressNATPolicy (or of a List of them)
// that nfmasq reads; every other field is ignored, as a client reading
// objects from an API server must.
type egressObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec  json.RawMessage   `json:"spec"`
	Items []json.RawMessage `json:"items"`
}

type egressSpec struct {
	Action       string `json:"action"`
	Destinations []struct {
		CIDR string `json:"cidr"`
	} `json:"destinations"`
}

// fieldTypeError rewrites encoding/json's type errors, which name Go types,
// in the object's own terms ("spec.destinations: got string, want list").
func fieldTypeError(prefix string, err error) error {
	var typ *json.UnmarshalTypeError
	if !errors.As(err, &typ) {
		return err
	}
	want := "a " + typ.Type.Kind().String()
	switch typ.Type.Kind() {
	case reflect.Slice, reflect.Array:
		want = "a list"
	case reflect.Struct, reflect.Map:
		want = "an object"
	case reflect.Int, reflect.Int64, reflect.Uint8, reflect.Float64:
		want = "a number"
	}
	field := strings.TrimPrefix(prefix+"."+typ.Field, ".")
	if typ.Field == "" {
		field = strings.TrimPrefix(prefix, ".")
	}
	if field == "" {
		return fmt.Errorf("got %s, want %s", typ.Value, want)
	}
	return fmt.Errorf("%s: got %s, want %s", field, typ.Value, want)
}

// ParseEgressPolicies reads EgressNATPolicy objects from one file: YAML or
// JSON, several documents separated by "---", or a List (kind "List" or
// any kind ending in "List", with items), as `kubectl get -o yaml` writes.
// Each invalid object or document is reported as an error naming the line
// where its document starts and what is wrong, and is skipped; the valid
// ones are returned in file order. Empty documents are ignored.
func ParseEgressPolicies(data []byte) ([]EgressPolicy, []error) {
	var policies []EgressPolicy
	var errs []error
	for _, doc := range splitDocuments(data) {
		if len(bytes.TrimSpace(doc.data)) == 0 {
			continue
		}
		js, _, err := toJSON(doc.data)
		if err != nil {
			errs = append(errs, fmt.Errorf("document at line %d: %w", doc.line, err))
			continue
		}
		if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
			continue // a comment-only document
		}
		var obj egressObject
		if err := json.Unmarshal(js, &obj); err != nil {
			errs = append(errs, fmt.Errorf("document at line %d: %w", doc.line, fieldTypeError("", err)))
			continue
		}
		if strings.HasSuffix(obj.Kind, "List") {
			for i, item := range obj.Items {
				p, err := egressPolicyFromJSON(item)
				if err != nil {
					errs = append(errs, fmt.Errorf("document at line %d: items[%d]: %w", doc.line, i, err))
					continue
				}
				policies = append(policies, p)
			}
			continue
		}
		p, err := egressPolicyFromObject(obj)
		if err != nil {
			errs = append(errs, fmt.Errorf("document at line %d: %w", doc.line, err))
			continue
		}
		policies = append(policies, p)
	}
	return policies, errs
}

func egressPolicyFromJSON(js json.RawMessage) (EgressPolicy, error) {
	var obj egressObject
	if err := json.Unmarshal(js, &obj); err != nil {
		return EgressPolicy{}, fieldTypeError("", err)
	}
	return egressPolicyFromObject(obj)
}

func egressPolicyFromObject(obj egressObject) (EgressPolicy, error) {
	name := obj.Metadata.Name
	if obj.Kind != EgressPolicyKind {
		return EgressPolicy{}, fmt.Errorf("object %q: kind %q is not %s", name, obj.Kind, EgressPolicyKind)
	}
	if obj.APIVersion != EgressPolicyAPIVersion {
		return EgressPolicy{}, fmt.Errorf("%s %q: apiVersion %q is not %s", EgressPolicyKind, name, obj.APIVersion, EgressPolicyAPIVersion)
	}
	var spec egressSpec
	if len(obj.Spec) > 0 {
		if err := json.Unmarshal(obj.Spec, &spec); err != nil {
			return EgressPolicy{}, fmt.Errorf("%s %q: %w", EgressPolicyKind, name, fieldTypeError("spec", err))
		}
	}
	cidrs := make([]string, len(spec.Destinations))
	for i, d := range spec.Destinations {
		cidrs[i] = d.CIDR
	}
	return NewEgressPolicy(name, spec.Action, cidrs)
}

// document is one YAML document of a stream and the 1-based line where
// it starts.
type document struct {
	data []byte
	line int
}

// splitDocuments splits a YAML stream at "---" lines, as Kubernetes' YAML
// reader does: a separator line is "---" followed by nothing but spaces or
// a comment. Anything else (for example "--- !tag") stays in the document
// and is the YAML parser's to judge.
func splitDocuments(data []byte) []document {
	var docs []document
	start, startLine, line := 0, 1, 1
	for off := 0; off < len(data); line++ {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
			next = off + end + 1
		}
		if rest, ok := bytes.CutPrefix(data[off:next], []byte("---")); ok {
			rest = bytes.TrimSpace(rest)
			if len(rest) == 0 || rest[0] == '#' {
				docs = append(docs, document{data: data[start:off], line: startLine})
				start, startLine = next, line+1
			}
		}
		off = next
	}
	return append(docs, document{data: data[start:], line: startLine})
}
