package rules

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Fake is an in-memory model of a node's iptables (both backends, both
// families) and ipsets, reached through the Runner interface, for tests
// that need no root (after knftables' Fake). It enforces what the kernel
// enforces and the plan relies on: a jump needs its chain, -D needs an
// exact match, -X needs an empty, unreferenced chain, a set in use cannot
// be destroyed, and a restore commits per table or not at all. Another
// process's edits are restores run through Run; Dump prints the whole
// node. A Fake is safe for concurrent use.
type Fake struct {
	mu     sync.Mutex
	tables map[string]map[string]*fakeTable // "nft/4" → table name → table
	sets   map[string]*fakeSet
	calls  []string
	fail   func(cmd string) error
}

type fakeTable struct {
	name   string
	chains map[string][]string // chain → specs
	custom []string            // custom chains in creation order
}

type fakeSet struct {
	kind    string // "hash:net family inet"
	entries []string
}

var builtins = map[string][]string{
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}

// NewFake returns a node with no rules and no sets.
func NewFake() *Fake {
	return &Fake{tables: map[string]map[string]*fakeTable{}, sets: map[string]*fakeSet{}}
}

var fakeTool = regexp.MustCompile(`^(ip6?tables)-(nft|legacy)-(save|restore)$`)

// Run implements Runner: it runs one iptables-save/restore (either
// backend, either family) or ipset command against the model.
func (f *Fake) Run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cmd := strings.Join(append([]string{name}, args...), " ")
	f.calls = append(f.calls, cmd)
	fail := func(format string, a ...any) ([]byte, error) {
		return nil, &CommandError{Args: append([]string{name}, args...), Stderr: fmt.Sprintf(format, a...), Err: errors.New("exit status 1")}
	}
	if f.fail != nil {
		if err := f.fail(cmd); err != nil {
			return fail("%v", err)
		}
	}
	if name == "ipset" {
		return f.ipset(stdin, args, fail)
	}
	m := fakeTool.FindStringSubmatch(name)
	if m == nil {
		return nil, &CommandError{Args: []string{name}, Err: exec.ErrNotFound}
	}
	key := m[2] + "/4"
	if m[1] == "ip6tables" {
		key = m[2] + "/6"
	}
	if f.tables[key] == nil {
		f.tables[key] = map[string]*fakeTable{}
	}
	tables := f.tables[key]
	if m[3] == "save" {
		var only string
		if len(args) == 2 && args[0] == "-t" {
			only = args[1]
			if tables[only] == nil {
				tables[only] = newFakeTable(only)
			}
		} else if len(args) != 0 {
			return fail("unexpected save arguments %q", args)
		}
		return []byte(f.save(tables, only)), nil
	}
	if !slices.Equal(args, []string{"-w", "--noflush"}) {
		return fail("restore wants exactly -w --noflush, got %q", args)
	}
	if err := f.restore(tables, string(stdin)); err != nil {
		return fail("%v", err)
	}
	return nil, nil
}

// FailWith makes every later command for which fail returns an error
// fail with it, before it changes anything (nil: no failures). The
// command is the tool and its arguments joined by spaces.
func (f *Fake) FailWith(fail func(cmd string) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = fail
}

// Calls returns the commands run so far, tool and arguments joined by
// spaces.
func (f *Fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// Dump prints every table of every backend and family the node has, in
// iptables-save's format under a "## BACKEND/FAMILY" heading, then every
// ipset as ipset save prints it: a whole node to compare with a golden.
func (f *Fake) Dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for _, key := range slices.Sorted(maps.Keys(f.tables)) {
		fmt.Fprintf(&b, "## %s\n", key)
		b.WriteString(f.save(f.tables[key], ""))
	}
	for _, name := range slices.Sorted(maps.Keys(f.sets)) {
		s := f.sets[name]
		fmt.Fprintf(&b, "create %s %s\n", name, s.kind)
		for _, e := range s.entries {
			fmt.Fprintf(&b, "add %s %s\n", name, e)
		}
	}
	return b.String()
}

func newFakeTable(name string) *fakeTable {
	t := &fakeTable{name: name, chains: map[string][]string{}}
	for _, c := range builtins[name] {
		t.chains[c] = nil
	}
	return t
}

func (t *fakeTable) clone() *fakeTable {
	c := &fakeTable{name: t.name, chains: map[string][]string{}, custom: slices.Clone(t.custom)}
	for k, v := range t.chains {
		c.chains[k] = slices.Clone(v)
	}
	return c
}

// save prints tables the way iptables-save does: built-in chains in
// kernel order, then custom chains sorted, rules grouped the same way.
func (f *Fake) save(tables map[string]*fakeTable, only string) string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(tables)) {
		if only != "" && name != only {
			continue
		}
		t := tables[name]
		order := append(slices.Clone(builtins[name]), slices.Sorted(slices.Values(t.custom))...)
		fmt.Fprintf(&b, "# Generated by fake\n*%s\n", name)
		for _, c := range order {
			if slices.Contains(builtins[name], c) {
				fmt.Fprintf(&b, ":%s ACCEPT [0:0]\n", c)
			} else {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
		}
		for _, c := range order {
			for _, r := range t.chains[c] {
				fmt.Fprintf(&b, "-A %s %s\n", c, r)
			}
		}
		b.WriteString("COMMIT\n# Completed\n")
	}
	return b.String()
}

func (f *Fake) restore(tables map[string]*fakeTable, payload string) error {
	var cur *fakeTable
	for i, line := range strings.Split(payload, "\n") {
		if err := f.restoreLine(tables, &cur, line); err != nil {
			return fmt.Errorf("%v\nError occurred at line: %d", err, i+1)
		}
	}
	if cur != nil {
		return errors.New("no COMMIT")
	}
	return nil
}

func (f *Fake) restoreLine(tables map[string]*fakeTable, cur **fakeTable, line string) error {
	t := *cur
	switch {
	case line == "" || strings.HasPrefix(line, "#"):
		return nil
	case strings.HasPrefix(line, "*"):
		name := line[1:]
		if builtins[name] == nil {
			return fmt.Errorf("unknown table %s", name)
		}
		if tables[name] == nil {
			tables[name] = newFakeTable(name)
		}
		*cur = tables[name].clone()
		return nil
	case t == nil:
		return fmt.Errorf("line outside a table: %q", line)
	case line == "COMMIT":
		tables[t.name] = t
		*cur = nil
		return nil
	case strings.HasPrefix(line, ":"):
		name, _, _ := strings.Cut(line[1:], " ")
		if _, ok := t.chains[name]; !ok {
			t.custom = append(t.custom, name)
		}
		t.chains[name] = nil
		return nil
	}
	words := strings.SplitN(line, " ", 3)
	if len(words) < 2 {
		return fmt.Errorf("bad line %q", line)
	}
	op, name := words[0], words[1]
	rules, ok := t.chains[name]
	if !ok {
		return fmt.Errorf("chain %s does not exist", name)
	}
	spec := ""
	if len(words) == 3 {
		spec = words[2]
	}
	switch op {
	case "-A", "-I":
		pos := 1
		if op == "-I" {
			if n, rest, ok := strings.Cut(spec, " "); ok {
				if p, err := strconv.Atoi(n); err == nil {
					pos, spec = p, rest
				}
			}
		}
		if target := ruleTarget(spec); strings.HasPrefix(target, ChainPrefix) {
			if _, ok := t.chains[target]; !ok {
				return fmt.Errorf("jump to missing chain %s", target)
			}
		}
		for _, set := range matchSets(spec) {
			if f.sets[set] == nil {
				return fmt.Errorf("set %s doesn't exist", set)
			}
		}
		if op == "-A" {
			t.chains[name] = append(rules, spec)
		} else {
			t.chains[name] = slices.Insert(rules, pos-1, spec)
		}
	case "-D":
		i := slices.Index(rules, spec)
		if i < 0 {
			return fmt.Errorf("bad rule (does a matching rule exist in that chain?): %s", spec)
		}
		t.chains[name] = slices.Delete(rules, i, i+1)
	case "-F":
		t.chains[name] = nil
	case "-X":
		if slices.Contains(builtins[t.name], name) || len(rules) > 0 {
			return fmt.Errorf("cannot delete chain %s: built-in or not empty", name)
		}
		for c, rs := range t.chains {
			for _, r := range rs {
				if ruleTarget(r) == name {
					return fmt.Errorf("cannot delete chain %s: referenced from %s", name, c)
				}
			}
		}
		delete(t.chains, name)
		t.custom = slices.DeleteFunc(t.custom, func(c string) bool { return c == name })
	default:
		return fmt.Errorf("unknown command %q", op)
	}
	return nil
}

// matchSets returns the ipsets a rule matches.
func matchSets(spec string) []string {
	var out []string
	w := splitWords(spec)
	for i := range w {
		if w[i] == "--match-set" && i+1 < len(w) {
			out = append(out, w[i+1])
		}
	}
	return out
}

func (f *Fake) setReferenced(name string) bool {
	for _, tables := range f.tables {
		for _, t := range tables {
			for _, rs := range t.chains {
				for _, r := range rs {
					if slices.Contains(matchSets(r), name) {
						return true
					}
				}
			}
		}
	}
	return false
}

func (f *Fake) ipset(stdin []byte, args []string, fail func(string, ...any) ([]byte, error)) ([]byte, error) {
	switch {
	case slices.Equal(args, []string{"list", "-n"}):
		var b strings.Builder
		for _, name := range slices.Sorted(maps.Keys(f.sets)) {
			b.WriteString(name + "\n")
		}
		return []byte(b.String()), nil
	case len(args) == 2 && args[0] == "save":
		s := f.sets[args[1]]
		if s == nil {
			return fail("The set with the given name does not exist")
		}
		var b strings.Builder
		fmt.Fprintf(&b, "create %s %s hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n", args[1], s.kind)
		for _, e := range s.entries {
			// ipset prints host entries without their prefix length.
			f := strings.Fields(e)
			if p, err := netip.ParsePrefix(f[0]); err == nil && p.IsSingleIP() {
				f[0] = p.Addr().String()
			}
			e = strings.Join(f, " ")
			fmt.Fprintf(&b, "add %s %s\n", args[1], e)
		}
		return []byte(b.String()), nil
	case len(args) == 2 && args[0] == "destroy":
		if err := f.ipsetCommand(args); err != nil {
			return fail("%v", err)
		}
		return nil, nil
	case slices.Equal(args, []string{"restore"}):
		// ipset restore stops at the first failing line; earlier lines stay.
		for i, line := range strings.Split(string(stdin), "\n") {
			if line == "" {
				continue
			}
			if err := f.ipsetCommand(strings.Fields(line)); err != nil {
				return fail("Error in line %d: %v", i+1, err)
			}
		}
		return nil, nil
	}
	return fail("unexpected ipset arguments %q", args)
}

func (f *Fake) ipsetCommand(w []string) error {
	need := func(name string) (*fakeSet, error) {
		if s := f.sets[name]; s != nil {
			return s, nil
		}
		return nil, fmt.Errorf("the set %s does not exist", name)
	}
	switch {
	case w[0] == "create" && len(w) >= 5:
		if f.sets[w[1]] != nil {
			return fmt.Errorf("set %s already exists", w[1])
		}
		f.sets[w[1]] = &fakeSet{kind: strings.Join(w[2:5], " ")}
	case w[0] == "add" && (len(w) == 3 || len(w) == 4 && w[3] == "nomatch"):
		s, err := need(w[1])
		if err != nil {
			return err
		}
		if slices.ContainsFunc(s.entries, func(e string) bool { return strings.Fields(e)[0] == w[2] }) {
			return fmt.Errorf("element %s is already added", w[2])
		}
		s.entries = append(s.entries, strings.Join(w[2:], " "))
	case w[0] == "swap" && len(w) == 3:
		a, err := need(w[1])
		if err != nil {
			return err
		}
		b, err := need(w[2])
		if err != nil {
			return err
		}
		if a.kind != b.kind {
			return errors.New("the sets cannot be swapped: their type does not match")
		}
		f.sets[w[1]], f.sets[w[2]] = b, a
	case w[0] == "destroy" && len(w) == 2:
		if _, err := need(w[1]); err != nil {
			return err
		}
		if f.setReferenced(w[1]) {
			return fmt.Errorf("set %s is in use by a kernel component", w[1])
		}
		delete(f.sets, w[1])
	default:
		return fmt.Errorf("unknown ipset command %q", w)
	}
	return nil
}
