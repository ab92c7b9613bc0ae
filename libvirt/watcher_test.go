package libvirt

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// levelCounter counts log records by level and message.
type levelCounter struct {
	mu   sync.Mutex
	warn []string
	dbg  int
}

func (c *levelCounter) Enabled(context.Context, slog.Level) bool { return true }
func (c *levelCounter) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch r.Level {
	case slog.LevelWarn:
		var err string
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "err" {
				err = a.Value.String()
			}
			return true
		})
		c.warn = append(c.warn, err)
	case slog.LevelDebug:
		c.dbg++
	}
	return nil
}
func (c *levelCounter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *levelCounter) WithGroup(string) slog.Handler      { return c }

// A libvirtd that is not there is one warning, then quiet retries, whatever
// the reasons of the retries' failures (here first a missing socket, then a
// peer that hangs up, whose errors vary from try to try).
func TestWatcherWarnsOnChangesOnly(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "libvirt-sock")
	lc := &levelCounter{}
	w := &Watcher{Target: sock, Log: slog.New(lc), MinBackoff: 5 * time.Millisecond, MaxBackoff: 5 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	wait := func(what string, ok func() bool) {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	count := func() (int, int) { lc.mu.Lock(); defer lc.mu.Unlock(); return len(lc.warn), lc.dbg }
	wait("20 retries", func() bool { _, d := count(); return d >= 20 })
	if n, _ := count(); n != 1 {
		t.Fatalf("%d warnings for one unreachable libvirtd, want 1: %v", n, lc.warn)
	}
	// Now something listens but is not libvirtd: it accepts and hangs up,
	// another failure than "no such file".
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, d0 := count()
	wait("more retries", func() bool { _, d := count(); return d >= d0+20 })
	cancel()
	<-done
	if n, _ := count(); n != 1 {
		t.Fatalf("%d warnings while libvirtd never answered, want 1: %v", n, lc.warn)
	}
}
