// Package cli is what tpmmux's four binaries share on their command line:
// flag parsing with --help (exit 0, on stdout) and --version, usage errors
// (exit 2, one line on stderr), and one description per command (Command)
// from which both the --help text and the man page are rendered, so the two
// cannot drift apart.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Version is tpmmux's release version: every binary's --version, the
// bridge's epoch records and the Debian package's version.
const Version = "0.1.0"

// ExitUsage is the exit code of a command line mistake, in every binary.
const ExitUsage = 2

// Section is an extra titled part of a command's help and man page, e.g.
// "EXIT STATUS" or "FILES". Body is plain text; paragraphs are separated by
// blank lines, and lines starting with two spaces are kept as they are.
type Section struct {
	Title string
	Body  string
}

// Command describes one command: a binary or one of its subcommands.
type Command struct {
	// Name is the full name as typed, e.g. "tpmmux-bridge vms".
	Name string
	// Synopsis holds the usage lines, each without Name, e.g.
	// "[--all] [--json]"; a line starting with two spaces continues the
	// one before. Empty: Name alone.
	Synopsis []string
	// Summary is one line: what the command does.
	Summary string
	// Description is plain text (see Section.Body).
	Description string
	// Sections follow the flags in --help and the man page.
	Sections []Section
	// Subs are the subcommands, for a command that dispatches.
	Subs []Sub
	// ManSection is the man page's section: 1 (user commands) or 8
	// (system administration).
	ManSection int

	flags *flag.FlagSet
}

// Sub is a subcommand: its name, one line about it, and its entry point.
type Sub struct {
	Name    string
	Summary string
	// Main runs the subcommand with the arguments after its name and
	// returns the exit code.
	Main func(args []string, stdout, stderr io.Writer) int
}

// FlagSet returns the command's flag set, made on first use. Flags whose
// usage text has a `BACKQUOTED` word show it as their value placeholder
// (flag.UnquoteUsage); keep backquotes for that only.
func (c *Command) FlagSet() *flag.FlagSet {
	if c.flags == nil {
		c.flags = flag.NewFlagSet(c.Name, flag.ContinueOnError)
		c.flags.SetOutput(io.Discard)
		c.flags.Usage = func() {}
		c.flags.Bool("version", false, "print the version and exit")
	}
	return c.flags
}

// Parse parses args into the command's flags. done reports that the caller
// must return code at once: --help printed the help on stdout (0),
// --version printed the version (0), or a flag was wrong (2, with the error
// and a pointer to --help on stderr).
func (c *Command) Parse(args []string, stdout, stderr io.Writer) (code int, done bool) {
	fs := c.FlagSet()
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		if col, ok := stdout.(*collector); ok {
			col.cmd = c
			return 0, true
		}
		c.WriteHelp(stdout)
		return 0, true
	case err != nil:
		c.UsageError(stderr, "%v", err)
		return ExitUsage, true
	}
	if f := fs.Lookup("version"); f != nil && f.Value.String() == "true" {
		fmt.Fprintf(stdout, "%s %s\n", c.binary(), Version)
		return 0, true
	}
	return 0, false
}

// UsageError prints a command line mistake and where to read more on w;
// the caller exits ExitUsage.
func (c *Command) UsageError(w io.Writer, format string, a ...any) {
	fmt.Fprintf(w, "%s: usage error: %s\n", c.Name, fmt.Sprintf(format, a...))
	for i, s := range c.synopsis() {
		lead := "usage: "
		if i > 0 {
			lead = "       "
		}
		fmt.Fprintf(w, "%s%s\n", lead, s)
	}
	fmt.Fprintf(w, "(%s --help for more)\n", c.Name)
}

// binary is the program name, the first word of Name.
func (c *Command) binary() string {
	b, _, _ := strings.Cut(c.Name, " ")
	return b
}

func (c *Command) synopsis() []string {
	if len(c.Synopsis) == 0 {
		return []string{c.Name}
	}
	out := make([]string, len(c.Synopsis))
	for i, s := range c.Synopsis {
		if strings.HasPrefix(s, "  ") {
			// A continuation of the line before, under its arguments.
			out[i] = strings.Repeat(" ", len(c.Name)-1) + s
			continue
		}
		out[i] = c.Name + " " + s
	}
	return out
}

// Dispatch runs the subcommand named by args[0], and handles the command's
// own --help, --version, help and version. def is the subcommand to run
// when args is empty or starts with a flag other than those ("" for none:
// then a usage error). handled is false only when args[0] names no
// subcommand and def is "": the caller decides.
func (c *Command) Dispatch(args []string, def string, stdout, stderr io.Writer) (code int, handled bool) {
	if len(args) > 0 {
		switch args[0] {
		case "-h", "-help", "--help", "help":
			if len(args) > 1 && args[0] == "help" {
				if s := c.sub(args[1]); s != nil {
					return s.Main([]string{"--help"}, stdout, stderr), true
				}
			}
			c.WriteHelp(stdout)
			return 0, true
		case "-version", "--version", "version":
			fmt.Fprintf(stdout, "%s %s\n", c.binary(), Version)
			return 0, true
		case "--man":
			sec := c.ManSection
			if sec == 0 {
				sec = 1
			}
			c.WriteMan(stdout, sec)
			return 0, true
		}
		if s := c.sub(args[0]); s != nil {
			return s.Main(args[1:], stdout, stderr), true
		}
	}
	if def != "" && (len(args) == 0 || strings.HasPrefix(args[0], "-")) {
		return c.sub(def).Main(args, stdout, stderr), true
	}
	if len(args) == 0 {
		c.UsageError(stderr, "a command is required")
		return ExitUsage, true
	}
	return 0, false
}

// UnknownSub reports an unknown subcommand name (exit ExitUsage).
func (c *Command) UnknownSub(stderr io.Writer, name string) int {
	var names []string
	for _, s := range c.Subs {
		names = append(names, s.Name)
	}
	c.UsageError(stderr, "unknown command %q (commands: %s)", name, strings.Join(names, ", "))
	return ExitUsage
}

func (c *Command) sub(name string) *Sub {
	for i := range c.Subs {
		if c.Subs[i].Name == name {
			return &c.Subs[i]
		}
	}
	return nil
}

// collector is a stdout that a subcommand's Parse recognizes on --help: it
// hands over the subcommand's description instead of printing it, so a man
// page can hold every subcommand's flags.
type collector struct {
	io.Writer
	cmd *Command
}

// describe returns the description of the subcommand s.
func describe(s Sub) *Command {
	col := &collector{Writer: io.Discard}
	s.Main([]string{"--help"}, col, io.Discard)
	return col.cmd
}
