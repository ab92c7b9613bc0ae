package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// qemuBinary finds qemu-system-x86_64; without it the test is skipped,
// except in CI (CI=true), where it fails.
func qemuBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-system-x86_64 not found (CI=true): install qemu-system-x86 (scripts/libvirtd.sh start does)")
		}
		t.Skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86); skipping the real-QEMU test")
	}
	return p
}

// startQEMU runs a diskless, kernel-less QEMU under TCG (it idles in the
// BIOS) with a QMP socket and extra arguments, and returns the socket path.
func startQEMU(t *testing.T, extra ...string) string {
	t.Helper()
	bin := qemuBinary(t)
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "tpmmux-qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	args := append([]string{"-machine", "pc,accel=tcg", "-nodefaults", "-display", "none", "-m", "32",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}, extra...)
	cmd := exec.Command(bin, args...)
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		stderr.Close()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(stderr.Name())
			t.Fatalf("qemu exited before its QMP socket appeared: %s", b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu's QMP socket %s did not appear within 20s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dial connects to a QMP socket, closing it at the end of the test.
func dial(t *testing.T, sock string) *SocketMonitor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	mon, err := DialSocket(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mon.Close() })
	return mon
}

// exchange is one QMP command and QEMU's reply.
type exchange struct {
	Command json.RawMessage `json:"command"`
	Reply   json.RawMessage `json:"reply"`
}

// transcript is a file of recorded exchanges (testdata/*.json).
type transcript struct {
	Source    string     `json:"source"`
	Exchanges []exchange `json:"exchanges"`
}

// canonical re-encodes a JSON value with sorted object keys.
func canonical(b []byte) (string, error) {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return "", err
	}
	c, err := json.Marshal(v)
	return string(c), err
}

// replayMonitor answers commands from a transcript.
type replayMonitor struct {
	replies map[string][]byte
}

func loadReplay(t *testing.T, file string) *replayMonitor {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var tr transcript
	if err := json.Unmarshal(b, &tr); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	m := &replayMonitor{replies: map[string][]byte{}}
	for _, ex := range tr.Exchanges {
		k, err := canonical(ex.Command)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		m.replies[k] = ex.Reply
	}
	return m
}

func (m *replayMonitor) Run(ctx context.Context, cmd []byte) ([]byte, error) {
	k, err := canonical(cmd)
	if err != nil {
		return nil, err
	}
	r, ok := m.replies[k]
	if !ok {
		return nil, fmt.Errorf("replay: no recorded reply to %s", k)
	}
	return r, nil
}

func (m *replayMonitor) Close() error { return nil }

// recorder wraps a Monitor and keeps every exchange.
type recorder struct {
	Monitor
	mu sync.Mutex
	tr transcript
}

func (r *recorder) Run(ctx context.Context, cmd []byte) ([]byte, error) {
	out, err := r.Monitor.Run(ctx, cmd)
	if err == nil {
		r.mu.Lock()
		r.tr.Exchanges = append(r.tr.Exchanges, exchange{Command: append([]byte(nil), cmd...), Reply: append([]byte(nil), out...)})
		r.mu.Unlock()
	}
	return out, err
}

// save writes the transcript to file when TPMMUX_QMP_RECORD=1.
func (r *recorder) save(t *testing.T, file, source string) {
	t.Helper()
	if os.Getenv("TPMMUX_QMP_RECORD") != "1" {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tr.Source = source
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r.tr); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("recorded %d exchanges to %s", len(r.tr.Exchanges), file)
}

// fakeQMP is a QMP server that greets, accepts the capabilities handshake
// and then never answers: it stands for a hung QEMU.
func fakeQMP(t *testing.T, greet bool) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmmux-fake")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				if !greet {
					_, _ = c.Read(make([]byte, 1)) // until closed
					return
				}
				fmt.Fprintf(c, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}`+"\r\n")
				dec := json.NewDecoder(c)
				var cmd map[string]any
				if dec.Decode(&cmd) != nil {
					return
				}
				fmt.Fprintf(c, `{"return": {}}`+"\r\n")
				for dec.Decode(&cmd) == nil { // swallow commands, never reply
				}
			}()
		}
	}()
	return sock
}
