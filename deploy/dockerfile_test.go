package deploy

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

// No container engine runs where the tests run, so these tests read the
// Dockerfile as BuildKit would (instructions, line continuations, ARG
// substitution in FROM) and check what it promises: pinned bases, a static
// trimmed build with the version stamped in, exactly iptables and ipset in
// the final image, OCI labels, the entrypoint the manifests rely on, and a
// .dockerignore that keeps every file the build reads.

// instruction is one Dockerfile instruction with its continuation lines
// joined.
type instruction struct {
	line int
	cmd  string // upper case: FROM, RUN, ...
	args string
}

// stage is the instructions from one FROM to the next.
type stage struct {
	image, name string
	body        []instruction
}

func parseDockerfile(t *testing.T, text string) (globalArgs map[string]string, stages []stage) {
	t.Helper()
	globalArgs = map[string]string{}
	var ins []instruction
	var cur strings.Builder
	start := 0
	for i, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if cur.Len() > 0 && strings.HasPrefix(trimmed, "#") {
			continue // a comment inside a continued instruction
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		ins = append(ins, instruction{line: start, cmd: strings.ToUpper(cmd), args: strings.Join(strings.Fields(args), " ")})
		cur.Reset()
	}
	if cur.Len() > 0 {
		t.Fatalf("Dockerfile ends inside a continued instruction: %q", cur.String())
	}
	for _, in := range ins {
		switch {
		case in.cmd == "FROM":
			fields := strings.Fields(in.args)
			fields = slices.DeleteFunc(fields, func(f string) bool { return strings.HasPrefix(f, "--platform=") })
			s := stage{image: expandArgs(fields[0], globalArgs)}
			if len(fields) == 3 && strings.EqualFold(fields[1], "AS") {
				s.name = fields[2]
			}
			stages = append(stages, s)
		case len(stages) == 0:
			if in.cmd != "ARG" {
				t.Fatalf("line %d: only ARG may come before the first FROM, got %s", in.line, in.cmd)
			}
			name, value, _ := strings.Cut(in.args, "=")
			globalArgs[name] = value
		default:
			stages[len(stages)-1].body = append(stages[len(stages)-1].body, in)
		}
	}
	return globalArgs, stages
}

var argRef = regexp.MustCompile(`\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?`)

func expandArgs(s string, args map[string]string) string {
	return argRef.ReplaceAllStringFunc(s, func(ref string) string {
		return args[argRef.FindStringSubmatch(ref)[1]]
	})
}

func (s stage) all(cmd string) []instruction {
	var out []instruction
	for _, in := range s.body {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// argDefaults returns the stage's ARG defaults.
func (s stage) argDefaults() map[string]string {
	out := map[string]string{}
	for _, in := range s.all("ARG") {
		name, value, _ := strings.Cut(in.args, "=")
		out[name] = value
	}
	return out
}

var pinnedImage = regexp.MustCompile(`^[a-z0-9./-]+:([A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}$`)

func TestDockerfile(t *testing.T) {
	_, stages := parseDockerfile(t, readRepoFile(t, "Dockerfile"))
	if len(stages) != 2 {
		t.Fatalf("%d stages, want a build stage and a final stage", len(stages))
	}
	build, final := stages[0], stages[1]

	t.Run("bases pinned by tag and digest", func(t *testing.T) {
		for _, s := range stages {
			if !pinnedImage.MatchString(s.image) {
				t.Errorf("FROM %s: want name:tag@sha256:digest", s.image)
			}
		}
		if !strings.HasPrefix(final.image, "debian:") || !strings.Contains(final.image, "-slim@") {
			t.Errorf("final base %s, want Debian slim", final.image)
		}
	})

	t.Run("builder Go is at least go.mod's", func(t *testing.T) {
		m := regexp.MustCompile(`^golang:(\d+\.\d+(?:\.\d+)?)-`).FindStringSubmatch(build.image)
		if m == nil {
			t.Fatalf("build stage %s is not golang:VERSION-...", build.image)
		}
		want := regexp.MustCompile(`(?m)^go (\S+)$`).FindStringSubmatch(readRepoFile(t, "go.mod"))
		if want == nil {
			t.Fatal("go.mod has no go line")
		}
		if compareVersions(m[1], want[1]) < 0 {
			t.Errorf("builder Go %s is older than go.mod's go %s (GOTOOLCHAIN=local would refuse)", m[1], want[1])
		}
	})

	t.Run("static trimmed build with version", func(t *testing.T) {
		var env, cmd string
		for _, in := range build.all("ENV") {
			env += " " + in.args
		}
		for _, in := range build.all("RUN") {
			if strings.Contains(in.args, "go build") {
				cmd = in.args
			}
		}
		if !strings.Contains(env+" "+cmd, "CGO_ENABLED=0") {
			t.Error("CGO_ENABLED=0 not set: the binary would link libc dynamically")
		}
		for _, want := range []string{"-trimpath", "-X main.version=${VERSION}", "-o /out/nfmasq", "./cmd/nfmasq", "GOARCH=$TARGETARCH"} {
			if !strings.Contains(cmd, want) {
				t.Errorf("go build %q lacks %q", cmd, want)
			}
		}
		if _, ok := build.argDefaults()["VERSION"]; !ok {
			t.Error("build stage has no ARG VERSION")
		}
	})

	t.Run("final image holds exactly iptables and ipset", func(t *testing.T) {
		runs := final.all("RUN")
		if len(runs) != 1 {
			t.Fatalf("%d RUN instructions in the final stage, want one (one layer, lists removed in it)", len(runs))
		}
		run := runs[0].args
		for _, want := range []string{"apt-get update", "--no-install-recommends", "rm -rf /var/lib/apt/lists/*"} {
			if !strings.Contains(run, want) {
				t.Errorf("RUN %q lacks %q", run, want)
			}
		}
		_, after, ok := strings.Cut(run, "apt-get install")
		if !ok {
			t.Fatalf("RUN %q installs nothing", run)
		}
		after, _, _ = strings.Cut(after, "&&")
		args := final.argDefaults()
		var pkgs []string
		for _, f := range strings.Fields(after) {
			if strings.HasPrefix(f, "-") {
				continue
			}
			name, version, pinned := strings.Cut(expandArgs(f, args), "=")
			if !pinned || version == "" {
				t.Errorf("package %s not pinned to a version", f)
			}
			pkgs = append(pkgs, name)
		}
		slices.Sort(pkgs)
		if !slices.Equal(pkgs, []string{"ipset", "iptables"}) {
			t.Errorf("packages %v, want exactly [ipset iptables]", pkgs)
		}
	})

	t.Run("binary, entrypoint, labels", func(t *testing.T) {
		copies := final.all("COPY")
		if len(copies) != 1 || copies[0].args != "--from="+build.name+" /out/nfmasq /usr/local/bin/nfmasq" {
			t.Errorf("COPY %+v, want only the binary from the %s stage", copies, build.name)
		}
		eps := final.all("ENTRYPOINT")
		if len(eps) != 1 {
			t.Fatalf("%d ENTRYPOINTs", len(eps))
		}
		var ep []string
		if err := json.Unmarshal([]byte(eps[0].args), &ep); err != nil || !slices.Equal(ep, []string{"/usr/local/bin/nfmasq"}) {
			t.Errorf("ENTRYPOINT %s, want exec form [\"/usr/local/bin/nfmasq\"] (the manifests pass only args)", eps[0].args)
		}
		if len(final.all("CMD")) != 0 || len(final.all("USER")) != 0 {
			t.Error("no CMD (the manifests give the subcommand) and no USER (the agent is uid 0, the controller sets its own)")
		}
		var labels string
		for _, in := range final.all("LABEL") {
			labels += " " + in.args
		}
		for _, key := range []string{"title", "description", "version", "revision", "source"} {
			if !strings.Contains(labels, "org.opencontainers.image."+key+"=") {
				t.Errorf("no org.opencontainers.image.%s label", key)
			}
		}
	})
}

// compareVersions compares dotted decimal versions ("1.26" < "1.26.8").
func compareVersions(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < max(len(as), len(bs)); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			return x - y
		}
	}
	return 0
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int // sign
	}{
		{"1.26.8", "1.26.8", 0},
		{"1.26", "1.26.8", -1},
		{"1.27.0", "1.26.8", 1},
		{"1.26.10", "1.26.8", 1},
	}
	for _, tt := range tests {
		got := compareVersions(tt.a, tt.b)
		if (got > 0) != (tt.want > 0) || (got < 0) != (tt.want < 0) {
			t.Errorf("compareVersions(%s, %s) = %d, want sign %d", tt.a, tt.b, got, tt.want)
		}
	}
}

// TestDockerignoreKeepsBuildInputs lists, with the go command, every file
// that `go build ./cmd/nfmasq` reads for linux and checks it against
// .dockerignore with the matcher docker and BuildKit use.
func TestDockerignoreKeepsBuildInputs(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	f, err := os.Open(filepath.Join("..", ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	patterns, err := ignorefile.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		t.Fatal(err)
	}

	for _, arch := range []string{"amd64", "arm64"} {
		cmd := exec.Command("go", "list", "-e", "-deps", "-f",
			`{{if .Module}}{{if .Module.Main}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}
{{end}}{{range .SFiles}}{{$d}}/{{.}}
{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}
{{end}}{{end}}{{end}}`, "./cmd/nfmasq")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH="+arch, "CGO_ENABLED=0")
		out, err := cmd.Output()
		if err != nil {
			var stderr []byte
			if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
				stderr = ee.Stderr
			}
			t.Fatalf("go list: %v\n%s", err, stderr)
		}
		root, err := filepath.Abs("..")
		if err != nil {
			t.Fatal(err)
		}
		inputs := []string{"go.mod", "go.sum"}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			rel, err := filepath.Rel(root, line)
			if err != nil {
				t.Fatal(err)
			}
			inputs = append(inputs, filepath.ToSlash(rel))
		}
		if len(inputs) < 10 {
			t.Fatalf("go list found only %v: is ./cmd/nfmasq there?", inputs)
		}
		for _, in := range inputs {
			excluded, err := pm.MatchesOrParentMatches(in)
			if err != nil {
				t.Fatal(err)
			}
			if excluded {
				t.Errorf("GOARCH=%s: %s is a build input but .dockerignore excludes it", arch, in)
			}
		}
	}
	// And the exclusions do their job.
	for _, p := range []string{".git/config", "deploy/crd.yaml", "nat/testdata/x", "nat/config_test.go"} {
		if ok, _ := pm.MatchesOrParentMatches(p); !ok {
			t.Errorf("%s reaches the build context", p)
		}
	}
}
