package rules

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// Runner runs one command without a shell and returns its standard
// output. stdin may be nil. The Installer goes through a Runner so that
// tests can substitute a fake or a network namespace.
type Runner interface {
	Run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error)
}

// ExecRunner runs commands with os/exec. It is safe for concurrent use.
type ExecRunner struct{}

// Run implements Runner. A failure is a *CommandError carrying the
// command's standard error; a missing binary wraps exec.ErrNotFound.
func (ExecRunner) Run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &CommandError{Args: append([]string{name}, args...), Stderr: strings.TrimSpace(stderr.String()), Err: err}
	}
	return stdout.Bytes(), nil
}

// NetNSRunner runs every command inside a named network namespace through
// `ip netns exec`. Tests use it so that nothing touches the host's rules.
type NetNSRunner struct {
	// Name is the namespace, as `ip netns list` shows it.
	Name string
	// Runner runs the `ip` command; nil means ExecRunner.
	Runner Runner
}

// Run implements Runner.
func (r NetNSRunner) Run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	inner := r.Runner
	if inner == nil {
		inner = ExecRunner{}
	}
	return inner.Run(ctx, stdin, "ip", append([]string{"netns", "exec", r.Name, name}, args...)...)
}

// CommandError is a command that failed.
type CommandError struct {
	Args   []string // the command and its arguments
	Stderr string   // what it printed on standard error, trimmed
	Err    error    // usually an *exec.ExitError
}

// Error names the command, how it failed and what it said.
func (e *CommandError) Error() string {
	msg := fmt.Sprintf("%s: %v", strings.Join(e.Args, " "), e.Err)
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg
}

// Unwrap returns the exec error, so errors.Is(err, exec.ErrNotFound) works.
func (e *CommandError) Unwrap() error { return e.Err }
