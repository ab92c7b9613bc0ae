package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// fakePort is one port of a fake /sys/class/virtio-ports tree.
type fakePort struct {
	port, name, dev string
	noName          bool
}

// fakeSysfs builds SysRoot/class/virtio-ports/<port>/{name,dev} the way the
// virtio_console driver lays it out, and returns the root.
func fakeSysfs(t *testing.T, ports []fakePort) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "class", "virtio-ports")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range ports {
		// In a real sysfs the class entry is a symlink into devices/.
		real := filepath.Join(root, "devices", "virtio3", "virtio-ports", p.port)
		if err := os.MkdirAll(real, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(real, filepath.Join(dir, p.port)); err != nil {
			t.Fatal(err)
		}
		if !p.noName {
			if err := os.WriteFile(filepath.Join(real, "name"), []byte(p.name+"\n"), 0o444); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(real, "dev"), []byte(p.dev+"\n"), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestSerialFind(t *testing.T) {
	tests := []struct {
		name      string
		ports     []fakePort
		noClass   bool
		want      SerialPort
		wantErr   error
		errSubstr string
	}{
		{
			name: "among others",
			ports: []fakePort{
				{port: "vport0p0", noName: true, dev: "245:0"},
				{port: "vport0p1", name: "org.qemu.guest_agent.0", dev: "245:1"},
				{port: "vport0p2", name: SerialPortName, dev: "245:2"},
			},
			want: SerialPort{Name: SerialPortName, Port: "vport0p2", Major: 245, Minor: 2},
		},
		{
			name:  "large numbers",
			ports: []fakePort{{port: "vport7p31", name: SerialPortName, dev: "4095:1048575"}},
			want:  SerialPort{Name: SerialPortName, Port: "vport7p31", Major: 4095, Minor: 1048575},
		},
		{
			name:      "absent",
			ports:     []fakePort{{port: "vport0p1", name: "org.qemu.guest_agent.0", dev: "245:1"}},
			wantErr:   ErrNoSerialPort,
			errSubstr: "org.qemu.guest_agent.0",
		},
		{
			name:      "no virtio-serial device",
			noClass:   true,
			wantErr:   ErrNoSerialPort,
			errSubstr: "--transport vsock",
		},
		{
			name:      "bad dev file",
			ports:     []fakePort{{port: "vport0p1", name: SerialPortName, dev: "245"}},
			errSubstr: "not major:minor",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if !tt.noClass {
				root = fakeSysfs(t, tt.ports)
			}
			s := Serial{SysRoot: root, DevRoot: "/devroot"}
			got, err := s.Find(SerialPortName)
			if tt.wantErr != nil || tt.errSubstr != "" {
				if err == nil {
					t.Fatalf("found %+v, want an error", got)
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errSubstr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.errSubstr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.want.Dev = filepath.Join("/devroot", tt.want.Port)
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

// fakeInfo is an os.FileInfo with a chosen mode and rdev.
type fakeInfo struct {
	mode fs.FileMode
	rdev uint64
}

func (f fakeInfo) Name() string       { return "vport0p1" }
func (f fakeInfo) Size() int64        { return 0 }
func (f fakeInfo) Mode() fs.FileMode  { return f.mode }
func (f fakeInfo) ModTime() time.Time { return time.Time{} }
func (f fakeInfo) IsDir() bool        { return false }
func (f fakeInfo) Sys() any           { return &syscall.Stat_t{Rdev: f.rdev} }

// TestCheckNode covers the node decision where mknod itself cannot run.
func TestCheckNode(t *testing.T) {
	p := SerialPort{Port: "vport0p1", Dev: "/dev/vport0p1", Major: 245, Minor: 1}
	chr := fs.ModeDevice | fs.ModeCharDevice | 0o600
	tests := []struct {
		name    string
		fi      os.FileInfo
		statErr error
		want    nodeAction
		errSub  string
	}{
		{"missing", nil, fs.ErrNotExist, nodeCreate, ""},
		{"right device", fakeInfo{chr, unix.Mkdev(245, 1)}, nil, nodeOK, ""},
		{"other device", fakeInfo{chr, unix.Mkdev(245, 2)}, nil, 0, "is device 245:2"},
		{"regular file", fakeInfo{0o644, 0}, nil, 0, "not a character device"},
		{"block device", fakeInfo{fs.ModeDevice | 0o600, unix.Mkdev(245, 1)}, nil, 0, "not a character device"},
		{"stat error", nil, fs.ErrPermission, 0, "permission"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := checkNode(p, tt.fi, tt.statErr)
			if tt.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("err = %v, want %q", err, tt.errSub)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

// mknodWorks reports whether this process can make device nodes in dir
// (root, outside a user namespace that forbids it).
func mknodWorks(dir string) error {
	p := filepath.Join(dir, ".probe")
	err := unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3)))
	os.Remove(p)
	return err
}

// TestSerialOpenFakePort runs the whole Open on a fake tree whose port has
// the numbers of /dev/null (1:3): the node is mknod'ed into a temp /dev,
// then opened; reads wait like a port whose host end is not connected.
func TestSerialOpenFakePort(t *testing.T) {
	devRoot := t.TempDir()
	if err := mknodWorks(devRoot); err != nil {
		t.Skipf("cannot mknod a character device here (%v): the decision logic is covered by TestCheckNode", err)
	}
	s := Serial{SysRoot: fakeSysfs(t, []fakePort{{port: "vport2p1", name: SerialPortName, dev: "1:3"}}), DevRoot: devRoot}
	ctx := context.Background()

	c, err := s.Open(ctx, SerialPortName)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(devRoot, "vport2p1"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&fs.ModeCharDevice == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("node mode %v, want a 0600 char device", fi.Mode())
	}
	if n, err := c.Write([]byte("hello")); n != 5 || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	// /dev/null reads end of file at once, as a port without its host end
	// does: Read waits instead, until the deadline.
	c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
	start := time.Now()
	if _, err := c.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("read returned after %v: it did not wait for the host", d)
	}
	// Close unblocks a waiting Read.
	c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := c.Read(make([]byte, 10)); done <- err }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after close: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not unblock Read")
	}

	// A second Open reuses the node it made.
	c2, err := s.Open(ctx, SerialPortName)
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()

	// A node with other numbers is refused, not replaced.
	other := Serial{SysRoot: fakeSysfs(t, []fakePort{{port: "vport2p1", name: SerialPortName, dev: "1:5"}}), DevRoot: devRoot}
	if _, err := other.Open(ctx, SerialPortName); err == nil || !strings.Contains(err.Error(), "is device 1:3") {
		t.Fatalf("err = %v, want a device number mismatch", err)
	}
}

// TestSerialConnReadsData: data the host sent comes through; end of file
// from the driver never reaches the caller.
func TestSerialConnReadsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "port")
	if err := os.WriteFile(path, []byte("abc"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := newSerialConn(f, SerialPort{Name: "test"})
	defer c.Close()
	got := make(chan string, 1)
	go func() {
		b := make([]byte, 6)
		n, _ := io.ReadFull(c, b)
		got <- string(b[:n])
	}()
	time.Sleep(3 * hostWait / 2)
	// More bytes arrive after end of file (regular file: append at the end).
	app, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	app.Write([]byte("def"))
	app.Close()
	select {
	case s := <-got:
		if s != "abcdef" {
			t.Fatalf("read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("read did not see the appended bytes")
	}
}

func TestDialUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := DialUnix(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'x' {
		t.Fatalf("read %q %v", b, err)
	}
	if _, err := DialUnix(context.Background(), filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("dialled a missing socket")
	}
}

func TestDialVsockErrors(t *testing.T) {
	tests := []struct {
		name   string
		cid    func() (uint32, error)
		errSub string
	}{
		{"no device", func() (uint32, error) { return 0, fmt.Errorf("wrapped: %w", fs.ErrNotExist) }, "wrapped"},
		{"host cid", func() (uint32, error) { return 2, nil }, "outside"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := dialVsock(context.Background(), tt.cid, HostCID)
			if err == nil || !strings.Contains(err.Error(), tt.errSub) {
				t.Fatalf("err = %v, want %q", err, tt.errSub)
			}
		})
	}
}

// TestDialVsockLoopback dials through the kernel's vsock loopback (CID 1)
// on the port the scheme gives a guest: it never sends anything to a real
// host. It needs the vsock_loopback module.
func TestDialVsockLoopback(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skipf("AF_VSOCK unavailable (%v): the guest vsock dial is covered by the e2e test", err)
	}
	if cid, err := vsock.ContextID(); err != nil {
		t.Skipf("AF_VSOCK unavailable: cannot read the local CID: %v", err)
	} else {
		t.Logf("this machine's CID is %d", cid)
	}
	const fakeCID = 4242
	port, _ := VsockPort(fakeCID)
	l, err := vsock.ListenContextID(vsock.Local, port, nil)
	if err != nil {
		t.Skipf("AF_VSOCK loopback unavailable (vsock_loopback module not loaded?): %v", err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dialVsock(ctx, func() (uint32, error) { return fakeCID, nil }, vsock.Local)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, 2)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ok" {
		t.Fatalf("read %q %v", b, err)
	}
}

func TestGuestCID(t *testing.T) {
	cid, err := GuestCID()
	if _, serr := os.Stat("/dev/vsock"); serr != nil {
		if err == nil || !strings.Contains(err.Error(), "--transport virtio-serial") {
			t.Fatalf("without /dev/vsock: cid %d, err %v; want an error naming virtio-serial", cid, err)
		}
		t.Skipf("AF_VSOCK unavailable (%v): checked the error only", serr)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CID %d", cid)
}
