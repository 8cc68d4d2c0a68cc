// Command nfmasq is a Kubernetes node agent that replaces ip-masq-agent:
// it decides, per pod flow, whether the pod address is kept or masqueraded,
// with ip-masq-agent's config file and GKE's semantics.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// newRootCmd builds the nfmasq command tree afresh, so that each run
// parses its flags into new variables, as a new process would.
func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "nfmasq",
		Short: "Per-flow IP masquerade for Kubernetes pods, compatible with ip-masq-agent",
		Long: `nfmasq replaces ip-masq-agent: the first packet of each pod flow is decided
in user space (masquerade or keep the pod address), with ip-masq-agent's
config file and GKE's semantics, and the kernel applies the decision.`,
		SilenceErrors:     true,
		SilenceUsage:      true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		// A Run of its own makes an unknown subcommand a usage error here
		// rather than inside cobra's command lookup, where it is a plain error.
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return &usageError{fmt.Errorf("unknown command %q", args[0])}
			}
			return cmd.Help()
		},
	}
	root.AddCommand(
		newAgentCmd(),
		newConfigCmd(),
		newDemoCmd(),
		newEgressControllerCmd(),
		newExplainCmd(),
		newNodePrepCmd(),
		newPcapgenCmd(),
		newReplayCmd(),
		newRulesCmd(),
		newUninstallCmd(),
		newVersionCmd(),
		newWhoCmd(),
	)
	usageErrors(root)
	return root
}

// usageError is a mistake in how nfmasq was invoked: an unknown command or
// flag, a wrong number of arguments.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

// usageErrors makes cobra's flag and argument-count errors usageErrors, for
// every command, whoever wrote it.
func usageErrors(cmd *cobra.Command) {
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })
	if validate := cmd.Args; validate != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := validate(c, args); err != nil {
				return &usageError{err}
			}
			return nil
		}
	}
	for _, c := range cmd.Commands() {
		usageErrors(c)
	}
}

// exitError carries a command's exit status to run. err, when not nil, is
// printed on stderr; a nil err means the command already said what went
// wrong.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// Exit statuses shared by the subcommands.
const (
	exitOK = 0
	// exitFailure: the command failed, or some of its arguments were bad
	// and the others were handled.
	exitFailure = 1
	// exitConfig: usage, flag or configuration error; nothing was done.
	exitConfig = 2
)

// run executes nfmasq with args and returns the exit status. Tests call it
// in-process; only main calls os.Exit.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(context.Background())
	if err == nil {
		return exitOK
	}
	var ee *exitError
	var ue *usageError
	switch {
	case errors.As(err, &ee):
		if ee.err != nil {
			fmt.Fprintf(stderr, "nfmasq: %v\n", ee.err)
		}
		return ee.code
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "nfmasq: %v\nRun 'nfmasq --help' for usage.\n", err)
		return exitConfig
	default:
		fmt.Fprintf(stderr, "nfmasq: %v\n", err)
		return exitFailure
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
