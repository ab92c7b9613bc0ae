package bridge

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
	"github.com/tpmmux/tpmmux/internal/wire/wiretest"
)

func newBridge(t *testing.T) *Bridge {
	t.Helper()
	return &Bridge{Mux: muxtest.Open(t, mux.Config{})}
}

// realList is the real guest IMA list as wire entries.
func realList(t *testing.T) []wire.Entry {
	return wiretest.Entries(t, "../ima/testdata/guest-imasig-sha256.bin")
}

func dial(t *testing.T, b *Bridge, id conceal.Digest) (*wiretest.Guest, chan error) {
	t.Helper()
	a, g := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), id, g, false) }()
	return wiretest.New(t, a, false), done
}

func TestSessionStreamResumeAttest(t *testing.T) {
	b := newBridge(t)
	ctx := context.Background()
	ident, err := b.Mux.NewVM(ctx, mux.Launch{UUID: [16]byte{1}, Name: "vm-a"})
	if err != nil {
		t.Fatal(err)
	}
	id := ident.ID()
	es := realList(t)

	a, done := dial(t, b, id)
	if w := a.Hello("boot-1"); w.Resume != 0 || w.VM != "vm-a" {
		t.Fatalf("welcome %+v", w)
	}
	// Window-many frames in flight, then their acks in order.
	for i := 0; i < 4; i++ {
		a.Send(uint64(i*50), uint64(i), es[i*50:(i+1)*50])
	}
	for i := 0; i < 4; i++ {
		var ack wire.Ack
		a.Recv(&ack)
		if ack.Seq != uint64(i) || ack.Next != uint64((i+1)*50) {
			t.Fatalf("ack %+v", ack)
		}
	}
	a.Conn.Close()
	<-done

	// Reconnect with the same boot: resume at 200; resend an overlap.
	a, done = dial(t, b, id)
	if w := a.Hello("boot-1"); w.Resume != 200 {
		t.Fatalf("resume %d, want 200", w.Resume)
	}
	a.Send(150, 10, es[150:len(es)])
	var ack wire.Ack
	a.Recv(&ack)
	if ack.Next != uint64(len(es)) {
		t.Fatalf("ack next %d, want %d", ack.Next, len(es))
	}
	// Evidence from inside the guest, verified with what came with it.
	if err := a.C.Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: 7, Nonce: []byte("guest-nonce of the verifier")}); err != nil {
		t.Fatal(err)
	}
	var resp wire.EvidenceResponse
	a.Recv(&resp)
	ev, err := evidence.Decode(resp.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(resp.AKPEM)
	akAny, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	got := &conceal.Identity{UUID: resp.UUID, Instance: resp.Instance, Key: resp.Key}
	if *got != *ident {
		t.Fatal("the guest was handed another identity")
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: []byte("guest-nonce of the verifier"), Identity: ident, AK: b.Mux.AK(), PCR: 13})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Counts.Measurements != len(es) {
		t.Fatalf("%d measurements verified, want %d (none lost or doubled)", rep.Counts.Measurements, len(es))
	}
	_ = akAny
	a.Conn.Close()
	<-done

	// A new boot id: a reboot record and a restart at 0.
	a, done = dial(t, b, id)
	if w := a.Hello("boot-2"); w.Resume != 0 {
		t.Fatalf("new boot resume %d", w.Resume)
	}
	a.Conn.Close()
	<-done
	gs, _ := b.Mux.Guest(id)
	if gs.BootID != "boot-2" || gs.Next != 0 {
		t.Fatalf("guest state %+v", gs)
	}
}

func TestSessionRefusesBadGuests(t *testing.T) {
	b := newBridge(t)
	ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{2}, Name: "vm-b"})
	if err != nil {
		t.Fatal(err)
	}
	es := realList(t)[:5]
	bad := append([]wire.Entry(nil), es...)
	bad[2].Data = append([]byte(nil), bad[2].Data...)
	bad[2].Data[0] ^= 1
	tests := []struct {
		name string
		act  func(a *wiretest.Guest)
		code string
	}{
		{"gap", func(a *wiretest.Guest) { a.Send(3, 1, es) }, wire.CodeGap},
		{"template hash mismatch", func(a *wiretest.Guest) { a.Send(0, 1, bad) }, wire.CodeBadEntry},
		{"unexpected frame", func(a *wiretest.Guest) { a.C.Send(wire.TypeWelcome, &wire.Welcome{}) }, wire.CodeProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, done := dial(t, b, ident.ID())
			a.Hello("boot")
			tt.act(a)
			f, err := a.C.Recv()
			if err != nil {
				t.Fatal(err)
			}
			var e wire.Error
			if f.Type != wire.TypeError || wire.Decode(f, &e) != nil || e.Code != tt.code || !e.Fatal {
				t.Fatalf("got %s %+v, want fatal %s", f.Type, e, tt.code)
			}
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("session ended without error")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("session not closed")
			}
			a.Conn.Close()
		})
	}
	// Garbage instead of a hello on a reliable stream: dropped.
	a, done := dial(t, b, ident.ID())
	go a.Conn.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	select {
	case err := <-done:
		if !errors.Is(err, wire.ErrBadMagic) {
			t.Fatalf("err = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("garbage not refused")
	}
}

// TestSerialRestartOnSameStream: on virtio-serial the host connection
// outlives the guest agent, so a restarted agent's torn last frame and new
// hello arrive on the same stream; the bridge resynchronizes, settles the
// old session and resumes from what is durable.
func TestSerialRestartOnSameStream(t *testing.T) {
	b := newBridge(t)
	ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{3}, Name: "vm-s"})
	if err != nil {
		t.Fatal(err)
	}
	es := realList(t)
	ag, host := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), ident.ID(), host, true) }()
	a := wiretest.New(t, ag, true)
	// Stale bytes of an earlier agent before the first hello.
	go ag.Write([]byte("stale \x00\x01 bytes"))
	a.Hello("boot-1")
	a.Send(0, 1, es[:100])
	var ack wire.Ack
	a.Recv(&ack)
	// The agent dies mid-frame: half a frame, then the new agent's hello.
	frame, _ := wire.Encode(wire.TypeMeasurements, &wire.Measurements{Seq: 2, First: 100, Entries: es[100:150]})
	if _, err := ag.Write(frame[:len(frame)/2]); err != nil {
		t.Fatal(err)
	}
	w := a.Hello("boot-1")
	if w.Resume != 100 {
		t.Fatalf("resume %d after restart, want 100", w.Resume)
	}
	a.Send(100, 1, es[100:])
	a.Recv(&ack)
	if ack.Next != uint64(len(es)) {
		t.Fatalf("next %d", ack.Next)
	}
	// A separate attest-only connection does not disturb the session.
	c, h2 := net.Pipe()
	go b.Serve(context.Background(), ident.ID(), h2, false)
	wc := wire.NewConn(c, false)
	if err := wc.Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: 1, Nonce: []byte("n of the verifier, 16+")}); err != nil {
		t.Fatal(err)
	}
	f, err := wc.Recv()
	if err != nil || f.Type != wire.TypeEvidenceResponse {
		t.Fatalf("attest-only: %v %v", f.Type, err)
	}
	c.Close()
	var resp wire.EvidenceResponse
	wire.Decode(f, &resp)
	ev, _ := evidence.Decode(resp.Evidence)
	rep, err := verify.Verify(ev, verify.Options{Nonce: []byte("n of the verifier, 16+"), Identity: ident, AK: b.Mux.AK(), PCR: 13})
	if err != nil || rep.Counts.Measurements != len(es) {
		t.Fatalf("verify: %v, %d measurements, want %d", err, rep.Counts.Measurements, len(es))
	}
	// The stream session is still alive.
	a.C.Send(wire.TypePing, &wire.Ping{Seq: 9})
	var pong wire.Pong
	a.Recv(&pong)
	if pong.Seq != 9 {
		t.Fatal("session did not survive the attest connection")
	}
	ag.Close()
	<-done
}

// TestSerialStreamSurvivesProtocolError: on virtio-serial the stream is the
// VM's only channel, so a guest that breaks the protocol is told why and the
// next hello on the same stream gets a fresh session.
func TestSerialStreamSurvivesProtocolError(t *testing.T) {
	b := newBridge(t)
	ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{4}, Name: "vm-p"})
	if err != nil {
		t.Fatal(err)
	}
	es := realList(t)[:10]
	ag, host := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), ident.ID(), host, true) }()
	a := wiretest.New(t, ag, true)
	a.Hello("boot")
	a.Send(5, 1, es) // a gap
	f, err := a.C.Recv()
	if err != nil || f.Type != wire.TypeError {
		t.Fatalf("got %v %v, want an error frame", f.Type, err)
	}
	if w := a.Hello("boot"); w.Resume != 0 {
		t.Fatalf("resume %d", w.Resume)
	}
	a.Send(0, 2, es)
	var ack wire.Ack
	a.Recv(&ack)
	if ack.Next != 10 {
		t.Fatalf("ack next %d", ack.Next)
	}
	select {
	case err := <-done:
		t.Fatalf("the serial stream was closed: %v", err)
	default:
	}
	ag.Close()
	<-done
}

// TestAckNotHeldForBbolt: a guest's frame is acknowledged once its
// records are durable and extended, without waiting for (or forcing) the
// bbolt transaction behind them: with the applier's interval an hour, the
// ack comes and the batch is still not applied. The records are not lost
// meanwhile: the session's resume point and the VM's evidence count them.
func TestAckNotHeldForBbolt(t *testing.T) {
	b := &Bridge{Mux: muxtest.Open(t, mux.Config{ApplyEvery: time.Hour})}
	ctx := context.Background()
	ident, err := b.Mux.NewVM(ctx, mux.Launch{UUID: [16]byte{2}, Name: "vm-b"})
	if err != nil {
		t.Fatal(err)
	}
	es := realList(t)
	applied := b.Mux.Status().Stats.Applied
	a, done := dial(t, b, ident.ID())
	a.Hello("boot-1")
	a.Send(0, 0, es[:50])
	var ack wire.Ack
	a.Recv(&ack)
	if ack.Next != 50 {
		t.Fatalf("ack %+v", ack)
	}
	if got := b.Mux.Status().Stats.Applied; got != applied {
		t.Fatalf("%d batches applied to bbolt before the ack came back (was %d): the ack waited for the applier", got, applied)
	}
	a.Conn.Close()
	<-done
	a, done = dial(t, b, ident.ID())
	if w := a.Hello("boot-1"); w.Resume != 50 {
		t.Fatalf("resume %d after an acknowledged frame of 50, want 50", w.Resume)
	}
	a.Conn.Close()
	<-done
}
