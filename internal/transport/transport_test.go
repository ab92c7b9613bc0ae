package transport

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestPeerCIDCheck drives the vsock peer check over unix sockets (AF_VSOCK
// has no host transport on these machines): a connection whose peer CID is
// not the VM's is refused and counted, the VM's own is accepted.
func TestPeerCIDCheck(t *testing.T) {
	dir := t.TempDir()
	inner, err := net.Listen("unix", filepath.Join(dir, "v.sock"))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	cids := []uint32{7, 99, 42} // what the "kernel" reports for each connection, in order
	cidOf := func(net.Conn) (uint32, error) {
		mu.Lock()
		defer mu.Unlock()
		c := cids[0]
		cids = cids[1:]
		return c, nil
	}
	l := CheckCID(inner, 42, cidOf, nil)
	defer l.Close()
	for i := 0; i < 3; i++ {
		c, err := net.Dial("unix", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	got, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	got.Close()
	if l.Refused() != 2 {
		t.Fatalf("refused %d, want 2", l.Refused())
	}
	if l.Kind() != KindVsock || l.Resync() {
		t.Fatal("vsock listener kind")
	}
}

func TestVsockPort(t *testing.T) {
	for _, tt := range []struct {
		cid  uint32
		ok   bool
		port uint32
	}{{3, true, VsockPortBase + 3}, {2, false, 0}, {0, false, 0}, {MaxVsockCID, true, 1<<32 - 2}, {MaxVsockCID + 1, false, 0}} {
		p, err := VsockPort(tt.cid)
		if (err == nil) != tt.ok || p != tt.port {
			t.Errorf("VsockPort(%d) = %d, %v", tt.cid, p, err)
		}
	}
}

func TestSerialAndUnixListeners(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "serial", "vm-a.sock")
	// A stale socket from an earlier bridge is replaced; a regular file is not.
	os.MkdirAll(filepath.Dir(p), 0o755)
	stale, _ := net.Listen("unix", p)
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err := ListenSerial(p, 0o660, -1)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("serial socket mode %v %v", fi.Mode(), err)
	}
	if !l.Resync() || l.Kind() != KindSerial {
		t.Fatal("serial listener must resync")
	}
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	c, err := net.DialTimeout("unix", p, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("socket file left after Close")
	}
	f := filepath.Join(dir, "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := ListenUnix(f); err == nil {
		t.Fatal("replaced a regular file with a socket")
	}
	u, err := ListenUnix(filepath.Join(dir, "u.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if fi, _ := os.Stat(filepath.Join(dir, "u.sock")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("unix socket mode %v", fi.Mode())
	}
}
