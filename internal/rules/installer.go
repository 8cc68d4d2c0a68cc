package rules

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Installer applies the rule set to a node through a Runner. It keeps no
// state between calls: every call reads the live rules first.
type Installer struct {
	Runner  Runner
	Backend Backend
}

// Install makes the node's rules match cfg, for IPv4 and, when enabled,
// IPv6 (when disabled, IPv6 rules of an earlier run are removed). Per
// family, the ipset is refilled before the payload that references it, the
// payload is applied with one `iptables-restore --noflush -w`, and a set
// the layout no longer uses is destroyed afterwards.
func (in *Installer) Install(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	needSets := cfg.usesSet(IPv4) || (cfg.EnableIPv6 && cfg.usesSet(IPv6))
	sets, err := in.listSets(ctx)
	if err != nil && (needSets || !errors.Is(err, exec.ErrNotFound)) {
		return err
	}
	for _, fam := range []Family{IPv4, IPv6} {
		if fam == IPv6 && !cfg.EnableIPv6 {
			if err := in.uninstallFamily(ctx, fam); err != nil && !errors.Is(err, exec.ErrNotFound) {
				return fmt.Errorf("remove IPv6 rules (IPv6 is disabled): %w", err)
			}
			if err := in.destroySets(ctx, sets, SetName(fam), tmpSetName(fam)); err != nil {
				return err
			}
			continue
		}
		setInput, err := PlanSet(cfg, fam, sets)
		if err != nil {
			return err
		}
		if setInput != nil {
			if _, err := in.Runner.Run(ctx, setInput, "ipset", "restore"); err != nil {
				return fmt.Errorf("fill ipset %s: %w", SetName(fam), err)
			}
		}
		if policyInput := PlanPolicySets(cfg, fam, sets); policyInput != nil {
			if _, err := in.Runner.Run(ctx, policyInput, "ipset", "restore"); err != nil {
				return fmt.Errorf("fill the MasqueradePolicy ipsets: %w", err)
			}
		}
		save, err := in.save(ctx, fam, "mangle", "nat")
		if err != nil {
			return err
		}
		payload, err := Plan(cfg, fam, save)
		if err != nil {
			return err
		}
		if err := in.restore(ctx, fam, payload); err != nil {
			return err
		}
		if setInput == nil {
			if err := in.destroySets(ctx, sets, SetName(fam), tmpSetName(fam)); err != nil {
				return err
			}
		}
	}
	// Policy sets no rule references any more (both families' rules are
	// in place now).
	return in.destroySets(ctx, sets, staleSets(cfg, sets)...)
}

// Check compares the live rules (and ipsets) with cfg. It returns an error
// wrapping ErrRulesChanged when they differ, another error when they
// could not be read.
func (in *Installer) Check(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	for _, fam := range cfg.families() {
		save, err := in.save(ctx, fam, "mangle", "nat")
		if err != nil {
			return err
		}
		if err := Verify(cfg, fam, save); err != nil {
			return err
		}
		if err := VerifyPolicySets(cfg, fam, func(name string) (string, error) {
			out, err := in.Runner.Run(ctx, nil, "ipset", "save", name)
			return string(out), err
		}); err != nil {
			return err
		}
		if !cfg.usesSet(fam) {
			continue
		}
		sets, err := in.listSets(ctx)
		if err != nil {
			return err
		}
		if !slices.Contains(sets, SetName(fam)) {
			return fmt.Errorf("%w: ipset %s is missing", ErrRulesChanged, SetName(fam))
		}
		out, err := in.Runner.Run(ctx, nil, "ipset", "save", SetName(fam))
		if err != nil {
			return fmt.Errorf("read ipset %s: %w", SetName(fam), err)
		}
		if err := VerifySet(cfg, fam, string(out)); err != nil {
			return err
		}
	}
	return nil
}

// Uninstall removes every jump, chain and ipset nfmasq created, in both
// families, whatever part of them exists. It carries on past a failure
// and returns all of them; a family whose tools are missing has nothing to
// remove.
func (in *Installer) Uninstall(ctx context.Context) error {
	var errs []error
	for _, fam := range []Family{IPv4, IPv6} {
		if err := in.uninstallFamily(ctx, fam); err != nil && !errors.Is(err, exec.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	sets, err := in.listSets(ctx)
	switch {
	case errors.Is(err, exec.ErrNotFound):
	case err != nil:
		errs = append(errs, err)
	default:
		ours := ourSets()
		for _, name := range sets {
			if strings.HasPrefix(name, PolicySetPrefix) {
				ours = append(ours, name)
			}
		}
		errs = append(errs, in.destroySets(ctx, sets, ours...))
	}
	return errors.Join(errs...)
}

// UninstallBackends runs Uninstall for each backend. It makes two passes
// when the first fails: an ipset still referenced by another backend's
// rules can only be destroyed once those are gone.
func UninstallBackends(ctx context.Context, r Runner, backends []Backend) error {
	var errs []error
	for pass := 0; pass < 2; pass++ {
		errs = errs[:0]
		for _, b := range backends {
			in := &Installer{Runner: r, Backend: b}
			if err := in.Uninstall(ctx); err != nil {
				errs = append(errs, fmt.Errorf("%s backend: %w", b, err))
			}
		}
		if len(errs) == 0 {
			return nil
		}
	}
	return errors.Join(errs...)
}

func (in *Installer) uninstallFamily(ctx context.Context, fam Family) error {
	// A full save, not -t: with legacy, naming a table creates it.
	save, err := in.save(ctx, fam)
	if err != nil {
		return err
	}
	return in.restore(ctx, fam, PlanUninstall(save))
}

// save returns iptables-save output for the named tables (all with none).
func (in *Installer) save(ctx context.Context, fam Family, tables ...string) (string, error) {
	tool := in.Backend.tool(fam, "save")
	if len(tables) == 0 {
		out, err := in.Runner.Run(ctx, nil, tool)
		if err != nil {
			return "", fmt.Errorf("read %s rules: %w", fam, err)
		}
		return string(out), nil
	}
	var b strings.Builder
	for _, t := range tables {
		out, err := in.Runner.Run(ctx, nil, tool, "-t", t)
		if err != nil {
			return "", fmt.Errorf("read %s %s rules: %w", fam, t, err)
		}
		b.Write(out)
	}
	return b.String(), nil
}

var restoreErrorLine = regexp.MustCompile(`line:? (\d+)`)

func (in *Installer) restore(ctx context.Context, fam Family, payload []byte) error {
	if len(payload) == 0 {
		return nil
	}
	_, err := in.Runner.Run(ctx, payload, in.Backend.tool(fam, "restore"), "-w", "--noflush")
	if err == nil {
		return nil
	}
	// iptables-restore names only a line number; quote the line.
	var ce *CommandError
	if errors.As(err, &ce) {
		if m := restoreErrorLine.FindStringSubmatch(ce.Stderr); m != nil {
			n, _ := strconv.Atoi(m[1])
			lines := strings.Split(string(payload), "\n")
			if n >= 1 && n <= len(lines) {
				return fmt.Errorf("apply %s rules: %w (line %d: %s)", fam, err, n, lines[n-1])
			}
		}
	}
	return fmt.Errorf("apply %s rules: %w", fam, err)
}

// listSets returns the names of the node's ipsets.
func (in *Installer) listSets(ctx context.Context) ([]string, error) {
	out, err := in.Runner.Run(ctx, nil, "ipset", "list", "-n")
	if err != nil {
		return nil, fmt.Errorf("list ipsets: %w", err)
	}
	return strings.Fields(string(out)), nil
}

// destroySets destroys those of names that exist. Only call it once no
// rule references them.
func (in *Installer) destroySets(ctx context.Context, existing []string, names ...string) error {
	for _, name := range names {
		if !slices.Contains(existing, name) {
			continue
		}
		if _, err := in.Runner.Run(ctx, nil, "ipset", "destroy", name); err != nil {
			return fmt.Errorf("destroy ipset %s: %w", name, err)
		}
	}
	return nil
}
