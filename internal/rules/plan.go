package rules

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ErrRulesChanged is wrapped by Verify and VerifySet when the live rule set
// no longer matches the Config: another process (or a person) changed or
// removed our rules. Installing again restores them.
var ErrRulesChanged = errors.New("rules changed by another process")

// Plan returns the iptables-restore payload (for `iptables-restore
// --noflush -w`, or ip6tables-restore for IPv6) that turns the family's
// live rule set, given as the text of iptables-save for at least the
// mangle and nat tables, into the one cfg asks for.
//
// Our chains are declared, and therefore flushed and refilled, inside the
// payload. Jumps into them are added only when missing; duplicates and
// jumps that differ from the current layout are deleted and written once.
// Chains of ours the layout no longer has are removed. Applying Plan's
// payload and planning again yields a payload that rewrites our chains
// with the same rules and touches nothing else.
func Plan(cfg Config, fam Family, currentSave string) ([]byte, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return plan(layout(&cfg, fam), parseSave(currentSave)), nil
}

// PlanUninstall returns the payload that removes every jump into our
// chains (every copy) and then our chains, in whatever tables the save
// shows them. It returns nil when there is nothing of ours, so partial
// state (a chain without its jump, a jump left by someone's restore) is
// fine.
func PlanUninstall(currentSave string) []byte {
	return plan(nil, parseSave(currentSave))
}

// Verify reports, wrapping ErrRulesChanged, every way the live rule set in
// currentSave differs from what cfg asks for in the family: a chain of
// ours missing or with other rules, a jump missing or duplicated. Chains
// left over from an older layout are not an error (Install removes them).
func Verify(cfg Config, fam Family, currentSave string) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cur := parseSave(currentSave)
	var diffs []string
	for _, t := range layout(&cfg, fam) {
		ct := cur[t.name]
		for _, c := range t.chains {
			got, ok := ct.chain(c.name)
			switch {
			case !ok:
				diffs = append(diffs, fmt.Sprintf("%s %s is missing", t.name, c.name))
			case len(got) != len(c.rules):
				diffs = append(diffs, fmt.Sprintf("%s %s has %d rules, want %d", t.name, c.name, len(got), len(c.rules)))
			default:
				for i := range got {
					if got[i] != c.rules[i] {
						diffs = append(diffs, fmt.Sprintf("%s %s rule %d is %q, want %q", t.name, c.name, i+1, got[i], c.rules[i]))
						break
					}
				}
			}
		}
		refs := ct.references()
		for _, j := range t.jumps {
			var n int
			exact := false
			for _, r := range refs {
				if r.from == j.from && r.to == j.to {
					n++
					exact = exact || r.spec == j.spec
				}
			}
			switch {
			case n == 0:
				diffs = append(diffs, fmt.Sprintf("%s %s has no jump to %s", t.name, j.from, j.to))
			case n > 1:
				diffs = append(diffs, fmt.Sprintf("%s %s has %d jumps to %s", t.name, j.from, n, j.to))
			case !exact:
				diffs = append(diffs, fmt.Sprintf("%s %s jumps to %s with other matches than %q", t.name, j.from, j.to, j.spec))
			}
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("%w: %s", ErrRulesChanged, strings.Join(diffs, "; "))
	}
	return nil
}

// builtinChains are the chains a jump into ours may start from.
var builtinChains = []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

// plan writes the payload turning cur into want. With want nil it removes
// everything of ours.
func plan(want []table, cur saved) []byte {
	names := make([]string, 0, len(want)+len(cur))
	for _, t := range want {
		names = append(names, t.name)
	}
	for _, name := range cur.tableNames() {
		if !slices.Contains(names, name) && cur[name].ours() {
			names = append(names, name)
		}
	}

	var b strings.Builder
	for _, name := range names {
		var t table
		for _, w := range want {
			if w.name == name {
				t = w
			}
		}
		lines := planTable(t, cur[name])
		if len(lines) == 0 {
			continue
		}
		b.WriteString("*" + name + "\n")
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	if b.Len() == 0 {
		return nil
	}
	return []byte(b.String())
}

func planTable(t table, ct *savedTable) []string {
	var decl, fill, del, flush, drop, add []string
	wanted := map[string]bool{}
	for _, c := range t.chains {
		wanted[c.name] = true
		decl = append(decl, ":"+c.name+" - [0:0]")
		for _, r := range c.rules {
			fill = append(fill, "-A "+c.name+" "+r)
		}
	}

	refs := ct.references()
	handled := make([]bool, len(refs))
	for _, j := range t.jumps {
		var idx []int
		for i, r := range refs {
			if r.from == j.from && r.to == j.to {
				idx = append(idx, i)
			}
		}
		for _, i := range idx {
			handled[i] = true
		}
		if len(idx) == 1 && refs[idx[0]].spec == j.spec {
			continue
		}
		for _, i := range idx {
			del = append(del, "-D "+refs[i].from+" "+refs[i].spec)
		}
		if j.insert {
			add = append(add, "-I "+j.from+" 1 "+j.spec)
		} else {
			add = append(add, "-A "+j.from+" "+j.spec)
		}
	}
	for i, r := range refs {
		// A jump into a chain that is going away must go first, or -X
		// fails; a stray jump from a built-in chain is an older layout's.
		// A foreign chain jumping into one of our live chains is left
		// alone: it is someone's deliberate choice.
		if !handled[i] && (!wanted[r.to] || slices.Contains(builtinChains, r.from)) {
			del = append(del, "-D "+r.from+" "+r.spec)
		}
	}
	for _, c := range ct.ourChains() {
		if !wanted[c] {
			flush = append(flush, "-F "+c)
			drop = append(drop, "-X "+c)
		}
	}
	// Declarations first (they flush our chains, which drops their
	// references to chains being removed), deletions of stale jumps
	// before the chains they point to, new jumps last so they never
	// enter a half-written chain (the whole table commits at once, but
	// the order keeps every line valid where it stands).
	return slices.Concat(decl, fill, del, flush, drop, add)
}

// saved is the part of an iptables-save dump that planning reads: for each
// table, its chains and their rules.
type saved map[string]*savedTable

type savedTable struct {
	order []string            // chains in the order declared
	rules map[string][]string // per chain, the text after "-A <chain> "
}

// reference is a rule in a chain not ours whose target is one of ours.
type reference struct {
	from, to, spec string
}

func parseSave(text string) saved {
	s := saved{}
	var cur *savedTable
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, "*"):
			name := strings.TrimSpace(line[1:])
			cur = s[name]
			if cur == nil {
				cur = &savedTable{rules: map[string][]string{}}
				s[name] = cur
			}
		case cur == nil:
			// Comments and anything outside a table.
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if _, ok := cur.rules[name]; !ok {
				cur.order = append(cur.order, name)
				cur.rules[name] = nil
			}
		case strings.HasPrefix(line, "-A "):
			name, spec, _ := strings.Cut(line[3:], " ")
			if _, ok := cur.rules[name]; !ok {
				cur.order = append(cur.order, name)
			}
			cur.rules[name] = append(cur.rules[name], spec)
		}
	}
	return s
}

func (s saved) tableNames() []string {
	names := make([]string, 0, len(s))
	for name := range s {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// chain returns the rules of a chain and whether it exists. A nil table
// has no chains.
func (t *savedTable) chain(name string) ([]string, bool) {
	if t == nil {
		return nil, false
	}
	r, ok := t.rules[name]
	return r, ok
}

func (t *savedTable) ourChains() []string {
	if t == nil {
		return nil
	}
	var out []string
	for _, c := range t.order {
		if strings.HasPrefix(c, ChainPrefix) {
			out = append(out, c)
		}
	}
	return out
}

func (t *savedTable) ours() bool {
	return len(t.ourChains()) > 0 || len(t.references()) > 0
}

func (t *savedTable) references() []reference {
	if t == nil {
		return nil
	}
	var out []reference
	for _, c := range t.order {
		if strings.HasPrefix(c, ChainPrefix) {
			continue
		}
		for _, spec := range t.rules[c] {
			if to := ruleTarget(spec); strings.HasPrefix(to, ChainPrefix) {
				out = append(out, reference{from: c, to: to, spec: spec})
			}
		}
	}
	return out
}

// ruleTarget returns the chain or target after -j or -g, reading the spec
// the way iptables quotes it so that a comment mentioning "-j X" is not
// taken for a target.
func ruleTarget(spec string) string {
	words := splitWords(spec)
	for i := 0; i+1 < len(words); i++ {
		if words[i] == "-j" || words[i] == "-g" || words[i] == "--jump" || words[i] == "--goto" {
			return words[i+1]
		}
	}
	return ""
}

// splitWords splits an iptables-save rule into words: blanks separate,
// double quotes group, a backslash escapes the next character.
func splitWords(s string) []string {
	var words []string
	var w strings.Builder
	inWord, quoted, escaped := false, false, false
	for _, r := range s {
		switch {
		case escaped:
			w.WriteRune(r)
			escaped = false
		case r == '\\':
			escaped, inWord = true, true
		case r == '"':
			quoted, inWord = !quoted, true
		case (r == ' ' || r == '\t') && !quoted:
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}
