package cli

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// flagDoc is one flag as help and man page show it.
type flagDoc struct {
	name, placeholder, usage, def string
}

// flagDocs lists the command's flags but --version, sorted by name.
func (c *Command) flagDocs() []flagDoc {
	if c.flags == nil {
		return nil
	}
	var out []flagDoc
	c.flags.VisitAll(func(f *flag.Flag) {
		if f.Name == "version" {
			return
		}
		ph, usage := flag.UnquoteUsage(f)
		if isBool(f) {
			ph = ""
		} else {
			ph = placeholder(ph)
		}
		d := flagDoc{name: f.Name, placeholder: ph, usage: usage}
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "0s" && f.DefValue != "[]" {
			d.def = f.DefValue
		}
		out = append(out, d)
	})
	return out
}

func isBool(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// placeholder turns flag.UnquoteUsage's type names into what an operator
// reads: VALUE, N, DURATION.
func placeholder(ph string) string {
	switch ph {
	case "", "value", "string":
		return "VALUE"
	case "int", "uint", "int64", "uint64":
		return "N"
	case "duration":
		return "DURATION"
	case "float":
		return "NUMBER"
	}
	return ph
}

// dash gives a flag name its dashes: --name, -v.
func dash(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// WriteHelp writes the --help text.
func (c *Command) WriteHelp(w io.Writer) {
	for i, s := range c.synopsis() {
		lead := "usage: "
		if i > 0 {
			lead = "       "
		}
		fmt.Fprintf(w, "%s%s\n", lead, s)
	}
	if c.Summary != "" {
		fmt.Fprintf(w, "\n%s\n", c.Summary)
	}
	if c.Description != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimRight(c.Description, "\n"))
	}
	if len(c.Subs) > 0 {
		fmt.Fprintln(w, "\ncommands:")
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, s := range c.Subs {
			fmt.Fprintf(tw, "  %s\t%s\n", s.Name, s.Summary)
		}
		tw.Flush()
		fmt.Fprintf(w, "(%s COMMAND --help for a command's flags)\n", c.Name)
	}
	docs := c.flagDocs()
	fmt.Fprintln(w, "\nflags:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, d := range docs {
		u := d.usage
		if d.def != "" {
			u += " (default " + d.def + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s\n", strings.TrimSpace(dash(d.name)+" "+d.placeholder), u)
	}
	fmt.Fprintf(tw, "  --help\tprint this help and exit\n")
	fmt.Fprintf(tw, "  --version\tprint the version and exit\n")
	tw.Flush()
	for _, s := range c.Sections {
		fmt.Fprintf(w, "\n%s:\n%s\n", strings.ToLower(s.Title), indent(strings.TrimRight(s.Body, "\n")))
	}
}

func indent(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if l != "" {
			lines[i] = "  " + l
		}
	}
	return strings.Join(lines, "\n")
}

// WriteMan writes the man page of the command and its subcommands in roff
// (man(7) macros), for section sec.
func (c *Command) WriteMan(w io.Writer, sec int) {
	title := strings.ToUpper(c.binary())
	fmt.Fprintf(w, ".TH %s %d \"\" \"tpmmux %s\" \"tpmmux\"\n", title, sec, Version)
	fmt.Fprintf(w, ".SH NAME\n%s \\- %s\n", roffText(c.Name), roffText(c.Summary))
	fmt.Fprintln(w, ".SH SYNOPSIS")
	for i, s := range c.manSynopsis() {
		if i > 0 {
			fmt.Fprintln(w, ".br")
		}
		fmt.Fprintln(w, roffLine(s))
	}
	var subs []*Command
	for _, s := range c.Subs {
		if d := describe(s); d != nil {
			subs = append(subs, d)
			for _, l := range d.manSynopsis() {
				fmt.Fprintln(w, ".br")
				fmt.Fprintln(w, roffLine(l))
			}
		}
	}
	if c.Description != "" {
		fmt.Fprintln(w, ".SH DESCRIPTION")
		writeRoffBody(w, c.Description)
	}
	fmt.Fprintln(w, ".SH OPTIONS")
	writeRoffFlags(w, c.flagDocs())
	fmt.Fprintln(w, ".TP\n.B \\-\\-help\nprint the help and exit")
	fmt.Fprintln(w, ".TP\n.B \\-\\-version\nprint the version and exit")
	if len(subs) > 0 {
		fmt.Fprintln(w, ".SH COMMANDS")
		for _, d := range subs {
			fmt.Fprintf(w, ".SS %s\n", roffText(strings.TrimPrefix(d.Name, c.Name+" ")))
			for i, l := range d.manSynopsis() {
				if i > 0 {
					fmt.Fprintln(w, ".br")
				}
				fmt.Fprintln(w, roffLine(l))
			}
			fmt.Fprintln(w, ".PP")
			fmt.Fprintln(w, roffLine(d.Summary))
			if d.Description != "" {
				writeRoffBody(w, d.Description)
			}
			writeRoffFlags(w, d.flagDocs())
			for _, s := range d.Sections {
				fmt.Fprintf(w, ".PP\n.I %s\n", roffText(strings.ToLower(s.Title)))
				writeRoffBody(w, s.Body)
			}
		}
	}
	for _, s := range c.Sections {
		fmt.Fprintf(w, ".SH %s\n", roffText(strings.ToUpper(s.Title)))
		writeRoffBody(w, s.Body)
	}
}

func writeRoffFlags(w io.Writer, docs []flagDoc) {
	for _, d := range docs {
		fmt.Fprintln(w, ".TP")
		if d.placeholder != "" {
			fmt.Fprintf(w, ".BI %s \" \" %s\n", roffText(dash(d.name)), roffText(d.placeholder))
		} else {
			fmt.Fprintf(w, ".B %s\n", roffText(dash(d.name)))
		}
		u := d.usage
		if d.def != "" {
			u += " (default " + d.def + ")"
		}
		fmt.Fprintln(w, roffLine(u))
	}
}

// writeRoffBody writes plain text: blank lines separate paragraphs, lines
// indented by two spaces are kept as a literal block.
func writeRoffBody(w io.Writer, body string) {
	fmt.Fprintln(w, ".PP")
	literal := false
	for _, l := range strings.Split(strings.TrimRight(body, "\n"), "\n") {
		switch {
		case l == "":
			if literal {
				fmt.Fprintln(w, ".fi\n.RE")
				literal = false
			}
			fmt.Fprintln(w, ".PP")
		case strings.HasPrefix(l, "  "):
			if !literal {
				fmt.Fprintln(w, ".RS 4\n.nf")
				literal = true
			}
			fmt.Fprintln(w, roffLine(strings.TrimPrefix(l, "  ")))
		default:
			if literal {
				fmt.Fprintln(w, ".fi\n.RE")
				literal = false
			}
			fmt.Fprintln(w, roffLine(l))
		}
	}
	if literal {
		fmt.Fprintln(w, ".fi\n.RE")
	}
}

// roffText escapes text for roff: backslashes, dashes, and characters
// beyond ASCII (as \[uXXXX]).
func roffText(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\e`)
		case r == '-':
			b.WriteString(`\-`)
		case r > 127:
			fmt.Fprintf(&b, `\[u%04X]`, r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// roffLine escapes a text line, and guards a leading control character.
func roffLine(s string) string {
	s = roffText(s)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// manSynopsis is the synopsis with continuation lines joined: man fills
// and breaks lines itself.
func (c *Command) manSynopsis() []string {
	var out []string
	for _, s := range c.synopsis() {
		if strings.HasPrefix(s, "  ") && len(out) > 0 {
			out[len(out)-1] += " " + strings.TrimSpace(s)
			continue
		}
		out = append(out, s)
	}
	return out
}
