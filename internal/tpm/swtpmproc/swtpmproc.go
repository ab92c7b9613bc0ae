// Package swtpmproc starts and stops a real swtpm process (TPM 2.0 over TCP)
// for tests, the demo and benchmarks, so the "swtpm" TPM backend can be
// exercised against the same emulator QEMU uses.
//
// # Lifetime and PCR persistence (measured with swtpm 0.7.1)
//
// swtpm keeps only permanent state (seeds, NV, persistent objects) in
// stateDir/tpm2-00.permall; PCRs, transient objects and sessions live in the
// process. Hence:
//
//   - A stopped and restarted swtpm is a rebooted TPM: with
//     --flags startup-clear every PCR is back at zero and the reset count has
//     moved. Stopping gracefully (ctrl CMD_SHUTDOWN, or SIGTERM) saves
//     nothing volatile. The endorsement seed persists, so the AK is the same.
//   - Even TPM2_Shutdown(STATE) followed by a restart with startup-state only
//     keeps PCRs 0-15; PCRs 16-23 (the bridge's PCR 23 among them) are reset
//     on every TPM Restart/Resume, as on hardware.
//   - "The TPM kept running" across a swtpm process restart needs its volatile
//     state: ctrl CMD_STORE_VOLATILE writes stateDir/tpm2-00.volatilestate and
//     the next swtpm start loads it (PCRs and all, whatever the startup flag,
//     because TPM2_Startup then fails with TPM_RC_INITIALIZE). That is
//     StopSaveState followed by Resume.
//   - swtpm does not delete tpm2-00.volatilestate after loading it, so every
//     later start would silently roll the PCRs back to that snapshot. Start
//     therefore deletes a leftover one, and Resume deletes it once loaded.
//   - The normal crash case for tpmmux is the bridge dying while swtpm keeps
//     running: then nothing is lost, PCRs included; only the dead client's
//     transient objects linger (the tpm package flushes them on Open).
//
// swtpm serves one client connection at a time on its server socket: a second
// client's connection is accepted by the kernel but gets no answer until the
// first one closes. Close a tpm.TPM before running tpm2-tools against the
// same swtpm.
package swtpmproc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Binary is the name of the swtpm executable looked up in PATH.
const Binary = "swtpm"

// LogFile is the file in the state directory that receives swtpm's stdout
// and stderr (truncated at each start).
const LogFile = "swtpm.log"

// VolatileStateFile is the file in the state directory that
// CMD_STORE_VOLATILE writes and a starting swtpm loads.
const VolatileStateFile = "tpm2-00.volatilestate"

// startTimeout bounds the wait for a new swtpm to accept connections when
// the caller's context has no earlier deadline.
const startTimeout = 10 * time.Second

// stopTimeout bounds each step of Stop (graceful, then SIGTERM, then
// SIGKILL).
const stopTimeout = 5 * time.Second

// Control channel command codes (swtpm's tpm_ioctl.h).
const (
	cmdGetCapability = 1
	cmdInit          = 2
	cmdShutdown      = 3
	cmdStoreVolatile = 10
)

// Available reports whether the swtpm binary is installed (nil if it is).
func Available() error {
	if _, err := exec.LookPath(Binary); err != nil {
		return fmt.Errorf("swtpm not available (Debian: apt-get install swtpm swtpm-tools): %w", err)
	}
	return nil
}

// Options configures StartWith.
type Options struct {
	// StateDir holds swtpm's state files; it is created if missing.
	StateDir string
	// Resume loads the volatile state a previous StopSaveState left (PCRs,
	// loaded objects): the TPM continues as if it had never stopped. Without
	// it a leftover volatile state file is deleted and the TPM boots fresh.
	Resume bool
	// DieWithParent asks the kernel to SIGKILL swtpm when the process that
	// started it dies (tests: no orphans after a crash or timeout; strictly,
	// Linux ties this to the starting OS thread, which the Go runtime keeps
	// alive). Leave it false when swtpm should outlive its starter, like a
	// real TPM outlives a crashed bridge: swtpm then also gets its own process
	// group, so a Ctrl-C aimed at the starter does not reach it.
	DieWithParent bool
}

// Proc is a running swtpm process.
type Proc struct {
	cmd      *exec.Cmd
	stateDir string
	addr     string
	ctrlAddr string
	logPath  string

	exited  chan struct{} // closed when the process has been waited for
	waitErr error         // valid after exited is closed

	stopOnce sync.Once
	stopErr  error
}

// Start runs a fresh swtpm ("booted": PCRs at zero) on stateDir with TCP
// server and control sockets on free loopback ports, and returns once both
// accept connections.
func Start(ctx context.Context, stateDir string) (*Proc, error) {
	return StartWith(ctx, Options{StateDir: stateDir})
}

// Resume starts swtpm on stateDir from the volatile state StopSaveState
// wrote, so PCRs and the rest continue where they were.
func Resume(ctx context.Context, stateDir string) (*Proc, error) {
	return StartWith(ctx, Options{StateDir: stateDir, Resume: true})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, o Options) (*Proc, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if o.StateDir == "" {
		return nil, errors.New("start swtpm: empty state directory")
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("start swtpm: %w", err)
	}
	vol := filepath.Join(o.StateDir, VolatileStateFile)
	if o.Resume {
		if _, err := os.Stat(vol); err != nil {
			return nil, fmt.Errorf("resume swtpm in %s: no saved volatile state: %w", o.StateDir, err)
		}
	} else if err := os.Remove(vol); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("start swtpm: remove stale volatile state: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	var errs []error
	for attempt := 0; attempt < 5; attempt++ {
		p, err := start(ctx, o)
		if err == nil {
			if o.Resume {
				// Loaded now (the control channel answered, so swtpm is past
				// its initialization); never load this snapshot again.
				if err := os.Remove(vol); err != nil {
					return nil, errors.Join(fmt.Errorf("resume swtpm: remove loaded volatile state: %w", err), p.Stop())
				}
			}
			return p, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil || !errors.Is(err, errPortTaken) {
			break
		}
	}
	return nil, fmt.Errorf("start swtpm in %s: %w", o.StateDir, errors.Join(errs...))
}

// errPortTaken marks a start that lost the race for its free ports.
var errPortTaken = errors.New("port taken")

// start makes one attempt on fresh ports.
func start(ctx context.Context, o Options) (*Proc, error) {
	port, err := freePortPair()
	if err != nil {
		return nil, err
	}
	p := &Proc{
		stateDir: o.StateDir,
		addr:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		ctrlAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1)),
		logPath:  filepath.Join(o.StateDir, LogFile),
		exited:   make(chan struct{}),
	}
	// swtpm's output goes to a file, not a pipe: a pipe would break (and
	// SIGPIPE swtpm) when a starter it is meant to outlive exits.
	logf, err := os.OpenFile(p.logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create swtpm log: %w", err)
	}
	defer logf.Close() // the child has its own descriptor
	// The control port is the server port + 1, which is where tpm2-tools'
	// swtpm TCTI (-T swtpm:host=…,port=P) expects it.
	p.cmd = exec.Command(Binary, "socket", "--tpm2",
		"--tpmstate", "dir="+o.StateDir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--flags", "not-need-init,startup-clear",
	)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if o.DieWithParent {
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	} else {
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("run %s: %w", Binary, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	if err := p.waitReady(ctx); err != nil {
		_ = p.kill()
		out := p.Output()
		if strings.Contains(out, "in use") || strings.Contains(out, "Could not open") {
			err = fmt.Errorf("%w: %w", errPortTaken, err)
		}
		return nil, fmt.Errorf("%w (swtpm output: %q)", err, out)
	}
	return p, nil
}

// waitReady polls until the server port accepts and the control channel
// answers CMD_GET_CAPABILITY, the process exits, or ctx ends.
func (p *Proc) waitReady(ctx context.Context) error {
	for {
		err := p.probe(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("swtpm exited during start-up: %v", p.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("swtpm not ready on %s: %w (last error: %v)", p.addr, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (p *Proc) probe(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return err
	}
	// Closing at once releases swtpm's single client slot.
	if err := c.Close(); err != nil {
		return err
	}
	_, err = p.ctrl(ctx, cmdGetCapability, 8)
	return err
}

// ctrl sends one control-channel command (no payload) and reads n response
// bytes.
func (p *Proc) ctrl(ctx context.Context, cmd uint32, n int) ([]byte, error) {
	return p.ctrlWith(ctx, cmd, nil, n)
}

// ctrlWith sends one control-channel command with payload and reads n
// response bytes.
func (p *Proc) ctrlWith(ctx context.Context, cmd uint32, payload []byte, n int) ([]byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", p.ctrlAddr)
	if err != nil {
		return nil, fmt.Errorf("control channel %s: %w", p.ctrlAddr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(stopTimeout))
	}
	req := binary.BigEndian.AppendUint32(nil, cmd)
	if _, err := c.Write(append(req, payload...)); err != nil {
		return nil, fmt.Errorf("control command %d: %w", cmd, err)
	}
	rsp := make([]byte, n)
	if _, err := io.ReadFull(c, rsp); err != nil {
		return nil, fmt.Errorf("control command %d: read response: %w", cmd, err)
	}
	return rsp, nil
}

// ctrlResult runs a control command whose answer is a 4-byte result code.
func (p *Proc) ctrlResult(ctx context.Context, cmd uint32) error {
	rsp, err := p.ctrl(ctx, cmd, 4)
	if err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return fmt.Errorf("control command %d: swtpm result 0x%x", cmd, rc)
	}
	return nil
}

// Init sends CMD_INIT: the TPM's _TPM_Init, as a platform reset or resume
// does. What follows decides what it was: TPM2_Startup(STATE) after a
// TPM2_Shutdown(STATE) is a TPM Resume (suspend to RAM: PCRs 0-15 kept,
// restartCount+1), TPM2_Startup(CLEAR) after it a TPM Restart (hibernation:
// PCRs reset, restartCount+1), and TPM2_Startup(CLEAR) otherwise a TPM
// Reset (reboot: resetCount+1). The client must then send TPM2_Startup.
func (p *Proc) Init(ctx context.Context) error {
	rsp, err := p.ctrlWith(ctx, cmdInit, make([]byte, 4), 4)
	if err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return fmt.Errorf("control command INIT: swtpm result 0x%x", rc)
	}
	return nil
}

// Spec returns the tpm.Open spec for this swtpm: "swtpm:127.0.0.1:PORT".
func (p *Proc) Spec() string { return "swtpm:" + p.addr }

// Addr returns the server (TPM command) socket's address, HOST:PORT.
func (p *Proc) Addr() string { return p.addr }

// CtrlAddr returns the control socket's address, HOST:PORT; its port is
// Addr's port + 1.
func (p *Proc) CtrlAddr() string { return p.ctrlAddr }

// Port returns the server socket's port (tpm2-tools:
// -T swtpm:host=127.0.0.1,port=PORT).
func (p *Proc) Port() int {
	_, ps, _ := net.SplitHostPort(p.addr)
	n, _ := strconv.Atoi(ps)
	return n
}

// StateDir returns the state directory swtpm runs on.
func (p *Proc) StateDir() string { return p.stateDir }

// Pid returns swtpm's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Stop ends swtpm: CMD_SHUTDOWN on the control channel, then SIGTERM, then
// SIGKILL, each given a few seconds, and waits for the process. The TPM's
// permanent state stays in the state directory; PCRs do not survive (the next
// Start is a reboot). Stop is idempotent.
func (p *Proc) Stop() error {
	return p.stop(false)
}

// StopSaveState stores swtpm's volatile state (CMD_STORE_VOLATILE) and then
// stops it, so that Resume on the same directory continues with the same PCR
// values: the "TPM kept running" semantics across a swtpm process restart.
func (p *Proc) StopSaveState() error {
	return p.stop(true)
}

func (p *Proc) stop(save bool) error {
	p.stopOnce.Do(func() {
		select {
		case <-p.exited:
			p.stopErr = fmt.Errorf("stop swtpm (pid %d): it had already exited: %v (output: %q)", p.cmd.Process.Pid, p.waitErr, p.Output())
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		var errs []error
		if save {
			if err := p.ctrlResult(ctx, cmdStoreVolatile); err != nil {
				errs = append(errs, fmt.Errorf("store volatile state: %w", err))
			}
		}
		if err := p.ctrlResult(ctx, cmdShutdown); err != nil {
			errs = append(errs, fmt.Errorf("graceful shutdown: %w", err))
		}
		if !p.waitExit(stopTimeout) {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			if !p.waitExit(stopTimeout) {
				errs = append(errs, errors.New("swtpm ignored CMD_SHUTDOWN and SIGTERM; killed"))
				_ = p.kill()
			}
		}
		if len(errs) > 0 {
			p.stopErr = fmt.Errorf("stop swtpm (pid %d): %w", p.cmd.Process.Pid, errors.Join(errs...))
		}
	})
	return p.stopErr
}

// Kill ends swtpm with SIGKILL, as a crash would, and waits for it. Nothing
// volatile is saved.
func (p *Proc) Kill() error {
	var err error
	p.stopOnce.Do(func() { err = p.kill() })
	return err
}

func (p *Proc) kill() error {
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill swtpm (pid %d): %w", p.cmd.Process.Pid, err)
	}
	<-p.exited
	return nil
}

// waitExit waits up to d for the process to exit.
func (p *Proc) waitExit(d time.Duration) bool {
	select {
	case <-p.exited:
		return true
	case <-time.After(d):
		return false
	}
}

// Output returns the tail (up to 8 KiB) of swtpm's stdout and stderr, which
// go to LogFile in the state directory; for error messages.
func (p *Proc) Output() string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no swtpm output: %v)", err)
	}
	defer f.Close()
	const tail = 8 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > tail {
		_, _ = f.Seek(-tail, io.SeekEnd)
	}
	b, _ := io.ReadAll(io.LimitReader(f, tail))
	return string(b)
}

// freePortPair finds a port P on 127.0.0.1 such that P and P+1 were both
// free a moment ago (swtpm binds them itself, so a race remains; StartWith
// retries).
func freePortPair() (int, error) {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1)))
		l.Close()
		if err != nil {
			continue
		}
		l2.Close()
		return port, nil
	}
	return 0, errors.New("find a free port pair on 127.0.0.1: none after 20 tries")
}
