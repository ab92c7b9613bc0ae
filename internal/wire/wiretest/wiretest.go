// Package wiretest holds a minimal guest that speaks the wire protocol, for
// tests of the bridge, the daemon and the commands: it says hello, streams
// entries and waits for their acknowledgements, failing the test on any
// error. It also loads the real IMA list the tests stream.
package wiretest

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// Guest is one test guest connection.
type Guest struct {
	T    testing.TB
	Conn net.Conn
	C    *wire.Conn
	Seq  uint64
}

// New wraps an established connection.
func New(t testing.TB, conn net.Conn, resync bool) *Guest {
	return &Guest{T: t, Conn: conn, C: wire.NewConn(conn, resync)}
}

// DialUnix connects to a unix socket, retrying for a few seconds while the
// listener comes up, with a 30 s deadline on the connection.
func DialUnix(t testing.TB, path string, resync bool) *Guest {
	t.Helper()
	var conn net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if conn, err = net.Dial("unix", path); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { conn.Close() })
	return New(t, conn, resync)
}

// Recv reads the next frame into m; a bridge error fails the test.
func (g *Guest) Recv(m any) {
	g.T.Helper()
	f, err := g.C.Recv()
	if err != nil {
		g.T.Fatal(err)
	}
	if f.Type == wire.TypeError {
		var e wire.Error
		wire.Decode(f, &e)
		g.T.Fatalf("bridge error: %v", &e)
	}
	if err := wire.Decode(f, m); err != nil {
		g.T.Fatal(err)
	}
}

// Hello opens a session for boot and returns the bridge's Welcome.
func (g *Guest) Hello(boot string) wire.Welcome {
	g.T.Helper()
	if err := g.C.Send(wire.TypeHello, &wire.Hello{Proto: wire.Version, BootID: boot}); err != nil {
		g.T.Fatal(err)
	}
	var w wire.Welcome
	g.Recv(&w)
	return w
}

// Send sends entries es starting at log index first as frame seq.
func (g *Guest) Send(first, seq uint64, es []wire.Entry) {
	g.T.Helper()
	if err := g.C.Send(wire.TypeMeasurements, &wire.Measurements{Seq: seq, First: first, Entries: es}); err != nil {
		g.T.Fatal(err)
	}
}

// Stream sends es[from:to] in frames of up to 128 entries, waiting for
// each acknowledgement and checking it.
func (g *Guest) Stream(es []wire.Entry, from, to int) {
	g.T.Helper()
	for i := from; i < to; i += 128 {
		j := min(i+128, to)
		g.Seq++
		g.Send(uint64(i), g.Seq, es[i:j])
		var ack wire.Ack
		g.Recv(&ack)
		if ack.Seq != g.Seq || ack.Next != uint64(j) {
			g.T.Fatalf("ack %+v, want seq %d next %d", ack, g.Seq, j)
		}
	}
}

// Entries loads an IMA binary list (e.g. internal/ima/testdata's real
// guest list) as wire entries with SHA-1 template hashes.
func Entries(t testing.TB, path string) []wire.Entry {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	es, err := ima.ParseList(b)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]wire.Entry, len(es))
	for i, e := range es {
		out[i] = wire.Entry{PCR: e.PCR, HashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, Data: e.TemplateData}
	}
	return out
}
