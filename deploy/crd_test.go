package deploy

import (
	"context"
	"regexp"
	"slices"
	"strings"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	crdvalidation "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/validation"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	apiservervalidation "k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"k8s.io/apiextensions-apiserver/pkg/registry/customresource"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"

	"github.com/nfmasq/nfmasq/nat"
)

const crdName = "egressnatpolicies.networking.gke.io"

// loadCRD returns the CRD as written and in the API server's internal form.
func loadCRD(t *testing.T) (*apiextensionsv1.CustomResourceDefinition, *apiextensions.CustomResourceDefinition) {
	t.Helper()
	crd := get[*apiextensionsv1.CustomResourceDefinition](t, objects(t), "CustomResourceDefinition", "", crdName)
	// What the API server does on create: defaults, then the storage
	// version recorded in status (customresourcedefinition's
	// PrepareForCreate).
	apiextensionsv1.SetObjectDefaults_CustomResourceDefinition(crd)
	var internal apiextensions.CustomResourceDefinition
	if err := apiextensionsv1.Convert_v1_CustomResourceDefinition_To_apiextensions_CustomResourceDefinition(crd, &internal, nil); err != nil {
		t.Fatal(err)
	}
	for _, v := range internal.Spec.Versions {
		if v.Storage {
			internal.Status.StoredVersions = append(internal.Status.StoredVersions, v.Name)
		}
	}
	return crd, &internal
}

func TestCRDShape(t *testing.T) {
	crd, _ := loadCRD(t)
	if crd.Spec.Group != "networking.gke.io" || crd.Spec.Scope != apiextensionsv1.ClusterScoped ||
		crd.Spec.Names.Kind != "EgressNATPolicy" || crd.Spec.Names.Plural != "egressnatpolicies" {
		t.Errorf("group %q scope %q names %+v", crd.Spec.Group, crd.Spec.Scope, crd.Spec.Names)
	}
	if len(crd.Spec.Versions) != 1 {
		t.Fatalf("%d versions, want only v1", len(crd.Spec.Versions))
	}
	v := crd.Spec.Versions[0]
	if v.Name != "v1" || !v.Served || !v.Storage {
		t.Errorf("version %q served=%v storage=%v", v.Name, v.Served, v.Storage)
	}
	if v.Subresources == nil || v.Subresources.Status == nil {
		t.Error("no status subresource: the controller's conditions would be writable by every policy editor")
	}
	root := v.Schema.OpenAPIV3Schema
	spec := root.Properties["spec"]
	if !slices.Equal(spec.Required, []string{"action", "destinations"}) {
		t.Errorf("spec.required %v", spec.Required)
	}
	var enum []string
	for _, e := range spec.Properties["action"].Enum {
		enum = append(enum, string(e.Raw))
	}
	if !slices.Equal(enum, []string{`"NoSNAT"`}) {
		t.Errorf("spec.action enum %v, want [NoSNAT]", enum)
	}
	cidr := spec.Properties["destinations"].Items.Schema.Properties["cidr"]
	if cidr.Pattern == "" {
		t.Error("spec.destinations[].cidr has no pattern")
	}
	var rules []string
	for _, r := range cidr.XValidations {
		rules = append(rules, r.Rule)
	}
	if !slices.Equal(rules, []string{"isCIDR(self)"}) {
		t.Errorf("cidr rules %v, want [isCIDR(self)]", rules)
	}
}

// TestCRDPassesAPIServerValidation runs the checks that kube-apiserver runs
// when the CRD is created: structural schema, CEL compilation and estimated
// cost (an unbounded list would exceed it), names, versions.
func TestCRDPassesAPIServerValidation(t *testing.T) {
	_, internal := loadCRD(t)
	if errs := crdvalidation.ValidateCustomResourceDefinition(context.Background(), internal); len(errs) > 0 {
		t.Fatalf("the API server would reject the CRD:\n%s", errs.ToAggregate())
	}
}

// policyValidator validates EgressNATPolicy objects the way kube-apiserver
// does on create: prune unknown fields, then the CR strategy's Validate
// (type and object meta, OpenAPI schema, list types, CEL rules).
type policyValidator struct {
	structural *structuralschema.Structural
	create     func(*unstructured.Unstructured) field.ErrorList
	// pattern and celOnly check the cidr field with one layer each.
	pattern *regexp.Regexp
	celOnly *cel.Validator
	cidrSch *structuralschema.Structural
}

func newPolicyValidator(t *testing.T) *policyValidator {
	t.Helper()
	_, crd := loadCRD(t)
	// The internal form hoists a schema shared by all versions to the
	// top level; these helpers find it wherever it is.
	version := crd.Spec.Versions[0].Name
	validation, err := apiextensions.GetSchemaForVersion(crd, version)
	if err != nil {
		t.Fatal(err)
	}
	subresources, err := apiextensions.GetSubresourcesForVersion(crd, version)
	if err != nil {
		t.Fatal(err)
	}
	schemaProps := validation.OpenAPIV3Schema
	structural, err := structuralschema.NewStructural(schemaProps)
	if err != nil {
		t.Fatal(err)
	}
	validator, _, err := apiservervalidation.NewSchemaValidator(schemaProps)
	if err != nil {
		t.Fatal(err)
	}
	status := schemaProps.Properties["status"]
	statusValidator, _, err := apiservervalidation.NewSchemaValidator(&status)
	if err != nil {
		t.Fatal(err)
	}
	gvk := schema.GroupVersionKind{Group: crd.Spec.Group, Version: version, Kind: crd.Spec.Names.Kind}
	strategy := customresource.NewStrategy(newScheme(t), false, gvk, validator, statusValidator,
		structural, subresources.Status, nil, nil)

	cidrProps := schemaProps.Properties["spec"].Properties["destinations"].Items.Schema.Properties["cidr"]
	cidrStructural := structural.Properties["spec"].Properties["destinations"].Items.Properties["cidr"]
	return &policyValidator{
		structural: structural,
		create: func(u *unstructured.Unstructured) field.ErrorList {
			return strategy.Validate(context.Background(), u)
		},
		pattern: regexp.MustCompile(cidrProps.Pattern),
		celOnly: cel.NewValidator(&cidrStructural, false, celconfig.PerCallLimit),
		cidrSch: &cidrStructural,
	}
}

// validate returns the pruned field paths and the validation errors for a
// policy written as YAML.
func (pv *policyValidator) validate(t *testing.T, y string) (pruned []string, errs field.ErrorList) {
	t.Helper()
	var obj map[string]any
	if err := yaml.Unmarshal([]byte(y), &obj); err != nil {
		t.Fatal(err)
	}
	pruned = pruning.PruneWithOptions(obj, pv.structural, true, structuralschema.UnknownFieldPathOptions{TrackUnknownFieldPaths: true})
	return pruned, pv.create(&unstructured.Unstructured{Object: obj})
}

func (pv *policyValidator) celAccepts(t *testing.T, cidr string) bool {
	t.Helper()
	errs, _ := pv.celOnly.Validate(context.Background(), field.NewPath("cidr"), pv.cidrSch, cidr, nil, celconfig.RuntimeCELCostBudget)
	return len(errs) == 0
}

// TestDefaultPolicyPassesTheSchema: the policy the controller generates
// (examples/default-policy.yaml) is one the API server accepts as is.
func TestDefaultPolicyPassesTheSchema(t *testing.T) {
	pv := newPolicyValidator(t)
	ms, err := Examples()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	for _, m := range ms {
		if m.Kind != "EgressNATPolicy" {
			continue
		}
		n++
		pruned, errs := pv.validate(t, string(m.YAML))
		if len(pruned) > 0 {
			t.Errorf("%s: the API server would drop unknown fields %v", m.Name, pruned)
		}
		if len(errs) > 0 {
			t.Errorf("%s: rejected:\n%s", m.Name, errs.ToAggregate())
		}
	}
	if n == 0 {
		t.Fatal("no EgressNATPolicy among the examples")
	}
}

func TestPolicySchemaRejectsInvalidPolicies(t *testing.T) {
	pv := newPolicyValidator(t)
	const head = "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata:\n  name: p\n"
	tests := []struct {
		name string
		body string
		// want lists substrings of the expected errors; none means valid.
		want       []string
		wantPruned []string
	}{
		{name: "minimal", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 192.0.2.0/24\n"},
		{name: "empty destinations", body: "spec:\n  action: NoSNAT\n  destinations: []\n"},
		{name: "IPv6 and everything", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 0.0.0.0/0\n  - cidr: ::/0\n  - cidr: 2001:db8::/32\n"},
		{
			name: "status with a condition",
			body: "spec:\n  action: NoSNAT\n  destinations: []\nstatus:\n  observedGeneration: 2\n  conditions:\n  - type: Valid\n    status: \"False\"\n    reason: InvalidDestination\n    message: 'CIDR \"10.0.0.1/8\" is not aligned to a CIDR block'\n    lastTransitionTime: \"2026-01-02T03:04:05Z\"\n",
		},
		{name: "action SNAT", body: "spec:\n  action: SNAT\n  destinations:\n  - cidr: 10.0.0.0/8\n", want: []string{`spec.action: Unsupported value: "SNAT"`}},
		{name: "action lower case", body: "spec:\n  action: nosnat\n  destinations: []\n", want: []string{"spec.action: Unsupported value"}},
		{name: "no action", body: "spec:\n  destinations: []\n", want: []string{"spec.action: Required value"}},
		{name: "no spec", body: "", want: []string{"spec: Required value"}},
		{name: "no prefix length", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 10.0.0.0\n", want: []string{"spec.destinations[0].cidr", "should match"}},
		{name: "host name", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: example.com/8\n", want: []string{"spec.destinations[0].cidr"}},
		{name: "octet over 255", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 10.0.0.0/8\n  - cidr: 10.256.0.0/16\n", want: []string{"spec.destinations[1].cidr"}},
		{name: "IPv4 /33", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 10.0.0.0/33\n", want: []string{"spec.destinations[0].cidr"}},
		{name: "IPv6 /129", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: fd00::/129\n", want: []string{"spec.destinations[0].cidr"}},
		{name: "IPv6 only CEL catches", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 1:2:3/64\n", want: []string{"spec.destinations[0].cidr", "must be an IPv4 or IPv6 CIDR"}},
		{name: "missing cidr", body: "spec:\n  action: NoSNAT\n  destinations:\n  - {}\n", want: []string{"spec.destinations[0].cidr: Required value"}},
		{name: "cidr not a string", body: "spec:\n  action: NoSNAT\n  destinations:\n  - cidr: 10\n", want: []string{"spec.destinations[0].cidr: Invalid value"}},
		{
			name:       "unknown field is pruned",
			body:       "spec:\n  action: NoSNAT\n  destinations: []\n  nonMasqueradeCIDRs: [10.0.0.0/8]\n",
			wantPruned: []string{"spec.nonMasqueradeCIDRs"},
		},
		{name: "bad condition status", body: "spec:\n  action: NoSNAT\n  destinations: []\nstatus:\n  conditions:\n  - type: Valid\n    status: maybe\n    reason: X\n    message: \"\"\n    lastTransitionTime: \"2026-01-02T03:04:05Z\"\n", want: []string{"status.conditions[0].status: Unsupported value"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pruned, errs := pv.validate(t, head+tt.body)
			if !slices.Equal(pruned, tt.wantPruned) {
				t.Errorf("pruned %v, want %v", pruned, tt.wantPruned)
			}
			got := errs.ToAggregate()
			if len(tt.want) == 0 {
				if got != nil {
					t.Errorf("rejected: %v", got)
				}
				return
			}
			if got == nil {
				t.Fatalf("accepted, want an error containing %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(got.Error(), w) {
					t.Errorf("error %q does not contain %q", got, w)
				}
			}
		})
	}
}

// TestCIDRChecksAgree shows what each layer of the cidr validation does on
// its own: the pattern is exact for IPv4 and a shape check for IPv6; CEL's
// isCIDR is exact for both. Neither checks host bits (the controller does).
func TestCIDRChecksAgree(t *testing.T) {
	pv := newPolicyValidator(t)
	tests := []struct {
		cidr            string
		pattern, isCIDR bool
	}{
		{"10.0.0.0/8", true, true},
		{"0.0.0.0/0", true, true},
		{"255.255.255.255/32", true, true},
		{"10.0.0.1/8", true, true},
		{"192.168.001.0/24", false, false},
		{"10.0.0.0", false, false},
		{"10.0.0.0/33", false, false},
		{"256.0.0.0/8", false, false},
		{"10.0.0/8", false, false},
		{" 10.0.0.0/8", false, false},
		{"2001:db8::/32", true, true},
		{"::/0", true, true},
		{"fe80::/10", true, true},
		{"FD00::/8", true, true},
		{"2001:db8::/129", false, false},
		{"fe80::1%eth0/64", false, false},
		{"1:2:3/64", true, false},
		{":::/64", true, false},
		{"::ffff:10.0.0.0/104", true, false},
		{"2001:db8::g/32", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.cidr, func(t *testing.T) {
			if got := pv.pattern.MatchString(tt.cidr); got != tt.pattern {
				t.Errorf("pattern accepts: %v, want %v", got, tt.pattern)
			}
			if got := pv.celAccepts(t, tt.cidr); got != tt.isCIDR {
				t.Errorf("isCIDR: %v, want %v", got, tt.isCIDR)
			}
		})
	}
}

// TestMisalignedCIDRIsTheControllersJob backs the CRD's description: the
// API server stores a range with host bits set, and the controller's parser
// (ip-masq-agent's rules) rejects it, so the policy gets Valid=False.
func TestMisalignedCIDRIsTheControllersJob(t *testing.T) {
	pv := newPolicyValidator(t)
	const cidr = "10.0.0.1/8"
	_, errs := pv.validate(t, "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata:\n  name: p\nspec:\n  action: NoSNAT\n  destinations:\n  - cidr: "+cidr+"\n")
	if len(errs) > 0 {
		t.Fatalf("the schema rejects %s: %v", cidr, errs.ToAggregate())
	}
	if _, err := nat.NewEgressPolicy("p", "NoSNAT", []string{cidr}); err == nil || !strings.Contains(err.Error(), "not aligned") {
		t.Errorf("nat.NewEgressPolicy(%s): %v, want a \"not aligned\" error", cidr, err)
	}
}
