// Command e2etool is the host side of scripts/e2e/boot-test.sh. It is a test
// helper, not part of tpmmux.
//
//	e2etool listen -socket PATH -out FILE [-ack]
//	    Listens on the unix socket PATH (QEMU's virtio-serial chardev connects
//	    to it in client mode), accepts connections one after another (QEMU
//	    reconnects), and appends every byte received to FILE. With -ack, after
//	    each read that leaves the stream at an IMA entry boundary it writes
//	    "ACK <entries> <bytes>\n" back, so the guest's stand-in can see that
//	    the host got its whole list (the host→guest direction of the port).
//	    Runs until killed.
//
//	e2etool dump FILE
//	    Parses FILE as a binary IMA measurement list with internal/ima and
//	    prints "entries N", then one line per entry:
//	    "<index> <pcr> <template> <alg>:<digest hex> <path>".
//	    Exits 1 when FILE is empty or does not parse completely.
//
//	e2etool manufacture -state DIR -ca DIR -bundle FILE
//	    Provisions the swtpm state DIR with EK certificates from the local
//	    CA in DIR (swtpmproc.Manufacture) and writes the CA bundle to FILE
//	    (scripts/e2e-migrate.sh: hosts that can be enrolled).
package main

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/tpmmux/tpmmux/internal/ima"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "listen":
		err = listen(os.Args[2:])
	case "dump":
		err = dump(os.Args[2:])
	case "paths":
		err = paths(os.Args[2:])
	case "extradata":
		err = extradata(os.Args[2:])
	case "manufacture":
		err = manufacture(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2etool:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: e2etool listen -socket PATH -out FILE | dump FILE | paths EVIDENCE | extradata -nonce HEX -identity FILE | manufacture -state DIR -ca DIR -bundle FILE")
	os.Exit(2)
}

func listen(args []string) error {
	fs := flag.NewFlagSet("listen", flag.ExitOnError)
	sock := fs.String("socket", "", "unix socket path to listen on")
	out := fs.String("out", "", "file that receives the bytes")
	ack := fs.Bool("ack", false, "parse the stream as an IMA list and acknowledge complete entries")
	_ = fs.Parse(args)
	if *sock == "" || *out == "" {
		usage()
	}
	f, err := os.OpenFile(*out, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_ = os.Remove(*sock)
	l, err := net.Listen("unix", *sock)
	if err != nil {
		return err
	}
	defer l.Close()
	a := &acker{}
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "e2etool: connection accepted")
		buf := make([]byte, 64<<10)
		for {
			n, rerr := c.Read(buf)
			if n > 0 {
				if _, err := f.Write(buf[:n]); err != nil {
					return err
				}
				if *ack {
					if line := a.add(buf[:n]); line != "" {
						if _, err := io.WriteString(c, line); err != nil {
							fmt.Fprintln(os.Stderr, "e2etool: ack:", err)
						}
					}
				}
			}
			if rerr != nil {
				if !errors.Is(rerr, io.EOF) {
					fmt.Fprintln(os.Stderr, "e2etool: read:", rerr)
				}
				c.Close()
				break
			}
		}
	}
}

// acker follows a byte stream that should be a binary IMA list.
type acker struct {
	pending []byte // bytes of an incomplete entry, carried across reads
	entries int
	total   int64
	broken  bool
}

// add consumes b and returns "ACK <entries> <bytes>\n" when the stream now
// ends on an entry boundary, else "".
func (a *acker) add(b []byte) string {
	a.total += int64(len(b))
	if a.broken {
		return ""
	}
	a.pending = append(a.pending, b...)
	for len(a.pending) > 0 {
		_, m, err := ima.ParseEntry(a.pending)
		if err != nil {
			if !errors.Is(err, ima.ErrTruncated) {
				fmt.Fprintf(os.Stderr, "e2etool: stream does not parse at entry %d: %v\n", a.entries, err)
				a.broken, a.pending = true, nil
			}
			return ""
		}
		a.pending = a.pending[m:]
		a.entries++
	}
	return fmt.Sprintf("ACK %d %d\n", a.entries, a.total)
}

func dump(args []string) error {
	if len(args) != 1 {
		usage()
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	if len(b) == 0 {
		return fmt.Errorf("%s is empty", args[0])
	}
	list, perr := ima.ParseList(b)
	fmt.Printf("entries %d\n", len(list))
	for i, e := range list {
		fmt.Printf("%d %d %s %s:%s %s\n", i, e.PCR, e.TemplateName, e.Fields.DigestAlg, hex.EncodeToString(e.Fields.Digest), e.Fields.Path)
	}
	if perr != nil {
		return fmt.Errorf("%s: %w", args[0], perr)
	}
	return nil
}
