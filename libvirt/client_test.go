package libvirt

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// silentServer accepts connections and never answers, like a hung libvirtd.
func silentServer(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmmux-silent")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done; os.RemoveAll(dir) })
	return sock
}

func TestConnectFails(t *testing.T) {
	tests := []struct {
		name, target string
		timeout      time.Duration
		wantErr      string
		wantDeadline bool
	}{
		{name: "neither path nor uri", target: "libvirt-sock", timeout: time.Second, wantErr: "neither a socket path nor a libvirt URI"},
		{name: "no socket", target: "/nonexistent/libvirt-sock", timeout: 5 * time.Second, wantErr: "no such file"},
		{name: "hung libvirtd", target: "SILENT", timeout: 200 * time.Millisecond, wantDeadline: true},
		{name: "expired context", target: "SILENT", timeout: -time.Second, wantDeadline: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := tt.target
			if target == "SILENT" {
				target = silentServer(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), tt.timeout)
			defer cancel()
			start := time.Now()
			c, err := Connect(ctx, target)
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			if tt.wantDeadline && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err %v, want deadline exceeded", err)
			}
			if tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err %v, want %q", err, tt.wantErr)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %v", d)
			}
		})
	}
}

// TestConnectTargets connects to a real libvirtd in every way the target
// can be written.
func TestConnectTargets(t *testing.T) {
	needLibvirtd(t)
	for _, target := range []string{"", DefaultSocket, "qemu:///system", "qemu+unix:///system?socket=" + DefaultSocket} {
		t.Run(target, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := Connect(ctx, target)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.RunningDomains(ctx); err != nil {
				t.Fatal(err)
			}
			select {
			case <-c.Disconnected():
				t.Fatal("disconnected")
			default:
			}
		})
	}
}
