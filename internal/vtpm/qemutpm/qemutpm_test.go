package qemutpm_test

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/qemutpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// pcrRead10 is TPM2_PCR_Read of PCR 10 in the sha256 bank.
var pcrRead10 = []byte{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0x04, 0}

// TestDialExtendRead drives each vTPM as QEMU does (control handshake,
// Startup, IMA's two-bank extends) and checks that PCR 10 then reads as
// the replay of the extends: on the bridge's vTPM and on swtpm as a
// per-VM vTPM, which must agree.
func TestDialExtendRead(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var want [32]byte
	var cmds [][]byte
	for i := range 5 {
		d := sha256.Sum256([]byte{byte(i)})
		cmds = append(cmds, qemutpm.ExtendIMA(d))
		want = sha256.Sum256(append(want[:], d[:]...))
	}
	targets := []struct {
		name  string
		start func(t *testing.T) string
	}{
		{"bridge vtpm", func(t *testing.T) string {
			v, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, nil)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "vtpm.sock")
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go v.ServeListener(ctx, l)
			return path
		}},
		{"swtpm", func(t *testing.T) string {
			swtpmproc.Need(t)
			p, err := swtpmproc.StartVTPM(ctx, t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Stop() })
			return p.CtrlPath()
		}},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			c, err := qemutpm.Dial(ctx, tg.start(t))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Run(ctx, cmds[0]); err == nil {
				t.Error("an extend before TPM2_Startup succeeded")
			}
			if err := c.Startup(ctx); err != nil {
				t.Fatal(err)
			}
			for _, cmd := range cmds {
				if err := c.Run(ctx, cmd); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := c.Command(ctx, pcrRead10)
			if err != nil {
				t.Fatal(err)
			}
			if rc := qemutpm.RC(resp); rc != 0 || len(resp) != 62 || binary.BigEndian.Uint16(resp[28:30]) != 32 {
				t.Fatalf("PCR_Read: rc %#x, %d bytes: %x", rc, len(resp), resp)
			}
			if got := resp[30:62]; string(got) != string(want[:]) {
				t.Errorf("PCR 10 = %x, want the replay %x", got, want)
			}
		})
	}
}

// TestDialRefused: a path nobody serves fails once the context ends,
// naming the path.
func TestDialRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	path := filepath.Join(t.TempDir(), "none.sock")
	if _, err := qemutpm.Dial(ctx, path); err == nil {
		t.Fatal("dial of a missing socket succeeded")
	} else if !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name %s", err, path)
	}
}
