package deploy

import (
	"bufio"
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

//go:embed *.yaml examples/*.yaml
var files embed.FS

// KustomizationFile is the file that `kubectl apply -k` reads.
const KustomizationFile = "kustomization.yaml"

// Manifest is one YAML document of a manifest file.
type Manifest struct {
	// File is the document's file, relative to deploy/.
	File string
	// APIVersion, Kind, Name and Namespace identify the object.
	// Namespace is empty for cluster-scoped objects.
	APIVersion, Kind, Name, Namespace string
	// YAML is the document as written; JSON is the same object converted
	// to JSON, ready for a server-side apply.
	YAML, JSON []byte
}

// kustomization is the part of kustomization.yaml that this package uses.
type kustomization struct {
	Resources []string `json:"resources"`
}

// Manifests returns the objects of every file listed under resources in
// kustomization.yaml, in the order listed and, within a file, the order of
// its documents. kubectl sorts them itself when applying (CRDs and RBAC
// first); a client applying them one by one must wait for the CRD to be
// established before the EgressNATPolicy.
func Manifests() ([]Manifest, error) {
	names, err := Resources()
	if err != nil {
		return nil, err
	}
	var out []Manifest
	for _, name := range names {
		docs, err := readFile(name)
		if err != nil {
			return nil, err
		}
		out = append(out, docs...)
	}
	return out, nil
}

// Resources returns the file names listed under resources in
// kustomization.yaml, in order.
func Resources() ([]string, error) {
	data, err := files.ReadFile(KustomizationFile)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", KustomizationFile, err)
	}
	var k kustomization
	if err := yaml.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("parse %s: %w", KustomizationFile, err)
	}
	return k.Resources, nil
}

// Examples returns the objects in deploy/examples, which are documentation
// and not part of the kustomization, sorted by file name.
func Examples() ([]Manifest, error) {
	names, err := fs.Glob(files, "examples/*.yaml")
	if err != nil {
		return nil, fmt.Errorf("list examples: %w", err)
	}
	sort.Strings(names)
	var out []Manifest
	for _, name := range names {
		docs, err := readFile(name)
		if err != nil {
			return nil, err
		}
		out = append(out, docs...)
	}
	return out, nil
}

// readFile splits a file into its documents, skipping empty ones (a
// leading "---" or a comment-only document).
func readFile(name string) ([]Manifest, error) {
	if path.IsAbs(name) || strings.Contains(name, "..") {
		return nil, fmt.Errorf("resource %q: only files inside deploy/ are supported", name)
	}
	data, err := files.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	var out []Manifest
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		m, err := parseDocument(name, doc)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, i, err)
		}
		if m.Kind != "" || m.APIVersion != "" {
			out = append(out, m)
		}
	}
}

func parseDocument(file string, doc []byte) (Manifest, error) {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return Manifest{}, err
	}
	if bytes.Equal(bytes.TrimSpace(j), []byte("null")) {
		return Manifest{}, nil
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(j, &head); err != nil {
		return Manifest{}, err
	}
	if head.APIVersion == "" || head.Kind == "" || head.Metadata.Name == "" {
		return Manifest{}, fmt.Errorf("apiVersion, kind and metadata.name are required, got %q %q %q",
			head.APIVersion, head.Kind, head.Metadata.Name)
	}
	return Manifest{
		File:       file,
		APIVersion: head.APIVersion,
		Kind:       head.Kind,
		Name:       head.Metadata.Name,
		Namespace:  head.Metadata.Namespace,
		YAML:       doc,
		JSON:       j,
	}, nil
}

// Find returns the object of kind and name among Manifests.
func Find(kind, name string) (Manifest, error) {
	ms, err := Manifests()
	if err != nil {
		return Manifest{}, err
	}
	for _, m := range ms {
		if m.Kind == kind && m.Name == name {
			return m, nil
		}
	}
	return Manifest{}, fmt.Errorf("deploy/: no %s %q", kind, name)
}
