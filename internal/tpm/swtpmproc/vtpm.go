package swtpmproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// VTPM is a swtpm process serving one VM's vTPM the way libvirt runs it
// for a domain's <tpm><backend type='emulator' version='2.0'/></tpm>: TPM
// 2.0, a control channel on a unix socket over which QEMU hands the data
// socket (CMD_SET_DATAFD) and then initializes the TPM (CMD_INIT), and no
// server socket of its own. It is the per-VM vTPM that the bridge's vTPM
// replaces, started here as the baseline of benchmarks (docs/performance.md).
type VTPM struct {
	cmd     *exec.Cmd
	ctrl    string
	logPath string
	exited  chan struct{}
	waitErr error
}

// StartVTPM runs swtpm as a per-VM vTPM on stateDir (created if missing),
// with its control socket at stateDir/ctrl.sock, and returns once the
// socket exists. swtpm dies with the process that started it.
func StartVTPM(ctx context.Context, stateDir string) (*VTPM, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("start swtpm vTPM: %w", err)
	}
	v := &VTPM{ctrl: filepath.Join(stateDir, "ctrl.sock"), logPath: filepath.Join(stateDir, LogFile), exited: make(chan struct{})}
	os.Remove(v.ctrl)
	logf, err := os.OpenFile(v.logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create swtpm log: %w", err)
	}
	defer logf.Close()
	v.cmd = exec.Command(Binary, "socket", "--tpm2", "--tpmstate", "dir="+stateDir,
		"--ctrl", "type=unixio,path="+v.ctrl+",mode=0600")
	v.cmd.Stdout, v.cmd.Stderr = logf, logf
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		return nil, fmt.Errorf("run %s: %w", Binary, err)
	}
	go func() {
		v.waitErr = v.cmd.Wait()
		close(v.exited)
	}()
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	for {
		if fi, err := os.Stat(v.ctrl); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return v, nil
		}
		select {
		case <-v.exited:
			return nil, fmt.Errorf("swtpm vTPM exited during start-up: %v (output: %q)", v.waitErr, v.output())
		case <-ctx.Done():
			v.Stop()
			return nil, fmt.Errorf("swtpm vTPM control socket %s: %w", v.ctrl, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// CtrlPath is the control socket QEMU (or qemutpm.Dial) connects to.
func (v *VTPM) CtrlPath() string { return v.ctrl }

// Pid returns swtpm's process id.
func (v *VTPM) Pid() int { return v.cmd.Process.Pid }

// Stop ends swtpm (SIGTERM, then SIGKILL after a few seconds) and waits
// for it. It is idempotent.
func (v *VTPM) Stop() error {
	select {
	case <-v.exited:
		return nil
	default:
	}
	if err := v.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop swtpm vTPM (pid %d): %w", v.cmd.Process.Pid, err)
	}
	select {
	case <-v.exited:
	case <-time.After(stopTimeout):
		v.cmd.Process.Kill()
		<-v.exited
	}
	return nil
}

func (v *VTPM) output() string {
	b, _ := os.ReadFile(v.logPath)
	return string(b)
}

// CPUTime is the user plus system CPU time swtpm used, once it has exited
// (after Stop, or after QEMU shut it down and Stop reaped it); 0 before.
// Benchmarks compare it with the bridge's CPU per VM.
func (v *VTPM) CPUTime() time.Duration {
	select {
	case <-v.exited:
	default:
		return 0
	}
	if v.cmd.ProcessState == nil {
		return 0
	}
	return v.cmd.ProcessState.UserTime() + v.cmd.ProcessState.SystemTime()
}
