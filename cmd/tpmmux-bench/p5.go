package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/daemon"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/transport"
)

// domainXML is a typical libvirt domain: disk boot (so no launch files to
// hash), a vsock device and the tpmmux virtio-serial channel whose host
// socket the bridge opens at prepare; with vtpmDir, also a TPM whose
// external backend is the bridge's vTPM socket there (docs/vtpm.md).
func domainXML(name string, cid uint32, sockDir, vtpmDir string) []byte {
	var tpmXML string
	if vtpmDir != "" {
		tpmXML = fmt.Sprintf(`    <tpm model='tpm-crb'>
      <backend type='external' version='2.0'><source type='unix' mode='connect' path='%s'/></backend>
    </tpm>
`, vtpmSocket(vtpmDir, name))
	}
	var u [16]byte
	rand.Read(u[:])
	return []byte(fmt.Sprintf(`<domain type='kvm'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/%s.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <vsock model='virtio'><cid auto='no' address='%d'/></vsock>
    <channel type='unix'>
      <source mode='connect' path='%s/%s.sock'/>
      <target type='virtio' name='%s'/>
    </channel>
%s  </devices>
</domain>
`, name, conceal.FormatUUID(u), name, cid, sockDir, name, transport.SerialPortName, tpmXML))
}

// vtpmSocket is where domainXML puts VM name's vTPM socket in vtpmDir.
func vtpmSocket(vtpmDir, name string) string { return filepath.Join(vtpmDir, name+".sock") }

// bridgeRig is the bridge daemon (internal/daemon, as tpmmux-bridge run
// starts it) on a fresh TPM and state directory: its control socket, its
// per-VM virtio-serial listeners and its per-VM state files, all real.
type bridgeRig struct {
	rt    *runTPM
	dir   string
	d     *daemon.Daemon
	socks string
	vtpms string // the daemon's vtpm_dir
	n     int
}

// openRig starts the bridge daemon on a fresh TPM of kind; mods adjust its
// configuration last.
func (e *env) openRig(ctx context.Context, kind string, mods ...func(*daemon.Config)) (*bridgeRig, error) {
	rt, err := e.openTPM(ctx, kind)
	if err != nil {
		return nil, err
	}
	r := &bridgeRig{rt: rt}
	if r.dir, err = tempDir(e.work, "bridge-"); err != nil {
		r.close()
		return nil, err
	}
	r.socks = filepath.Join(r.dir, "serial")
	cfg := daemon.DefaultConfig()
	cfg.TPM = "sim" // unused: Options.TPM is the run's TPM
	cfg.StateDir = filepath.Join(r.dir, "state")
	cfg.ControlSocket = filepath.Join(r.dir, "control.sock")
	cfg.SerialDir = r.socks
	cfg.Vsock = "off"
	cfg.LogLevel = "error"
	cfg.Host = "bench"
	cfg.VTPMDir = filepath.Join(r.dir, "vtpm")
	for _, m := range mods {
		m(&cfg)
	}
	r.vtpms = cfg.VTPMDir
	r.d, err = daemon.Start(ctx, cfg, daemon.Options{Version: "bench", Logger: quiet, TPM: rt.TPM,
		VsockAvailable: func() error { return errors.New("no vsock in the benchmark") }})
	if err != nil {
		r.close()
		return nil, err
	}
	if f := r.d.Mux().Status().Fault; f != "" {
		r.close()
		return nil, fmt.Errorf("multiplexer faulted: %s", f)
	}
	return r, nil
}

func (r *bridgeRig) close() {
	if r.d != nil {
		r.d.Shutdown()
	}
	r.rt.Close()
	removeAll(r.dir)
}

// vmName is the name of the rig's i-th VM.
func vmName(i int) string { return fmt.Sprintf("vm-%04d", i) }

// storePath is where the daemon keeps its log store.
func (r *bridgeRig) storePath() string { return filepath.Join(r.dir, "state", "log.db") }

// prepareN provisions n VMs one after the other, as libvirt starts
// domains (the hook's "prepare begin": identity, genesis durable and
// extended, the VM's listener), and returns each one's time.
func (r *bridgeRig) prepareN(ctx context.Context, n int) ([]float64, error) {
	var ds []float64
	for i := r.n; i < r.n+n; i++ {
		xml := domainXML(vmName(i), uint32(3+i), r.socks, "")
		t := time.Now()
		if _, err := r.d.ControlHandler().Prepare(ctx, xml, false); err != nil {
			return nil, err
		}
		ds = append(ds, float64(time.Since(t)))
	}
	r.n += n
	return ds, nil
}

// swtpmFacts is what the vTPM way costs per VM, measured here.
type swtpmFacts struct {
	n       int
	setup   []float64 // swtpm_setup time per VM
	total   []float64 // swtpm_setup plus swtpm start until it answers
	rss     []float64 // VmRSS of each running swtpm
	anon    []float64 // RssAnon of each
	skipMsg string
}

// swtpmProvision provisions n vTPMs as libvirt does for a <tpm
// model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>: one
// swtpm_setup (EK, EK certificate, platform certificate, locked NVRAM)
// per VM, then one swtpm socket process per VM, all running at once.
func (e *env) swtpmProvision(ctx context.Context, n int) (*swtpmFacts, error) {
	f := &swtpmFacts{n: n}
	if _, err := exec.LookPath("swtpm_setup"); err != nil {
		f.skipMsg = "swtpm_setup not installed (scripts/setup.sh test)"
		return f, nil
	}
	if err := swtpmproc.Available(); err != nil {
		f.skipMsg = err.Error()
		return f, nil
	}
	base, err := tempDir(e.work, "vtpm-")
	if err != nil {
		return nil, err
	}
	defer removeAll(base)
	var procs []*swtpmproc.Proc
	defer func() {
		for _, p := range procs {
			p.Stop()
		}
	}()
	for i := 0; i < n; i++ {
		dir := filepath.Join(base, fmt.Sprintf("vm-%02d", i))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		var u [16]byte
		rand.Read(u[:])
		t := time.Now()
		cmd := exec.CommandContext(ctx, "swtpm_setup", "--tpm2", "--tpmstate", dir,
			"--vmid", fmt.Sprintf("vm-%02d:%s", i, conceal.FormatUUID(u)),
			"--logfile", filepath.Join(dir, "setup.log"),
			"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			log, _ := os.ReadFile(filepath.Join(dir, "setup.log"))
			return nil, fmt.Errorf("swtpm_setup: %v: %s %s", err, out.String(), log)
		}
		setup := time.Since(t)
		p, err := swtpmproc.StartWith(ctx, swtpmproc.Options{StateDir: dir, DieWithParent: true})
		if err != nil {
			return nil, err
		}
		procs = append(procs, p)
		f.setup = append(f.setup, float64(setup))
		f.total = append(f.total, float64(time.Since(t)))
	}
	time.Sleep(200 * time.Millisecond)
	for _, p := range procs {
		mi, err := readMem(p.Pid())
		if err != nil {
			return nil, err
		}
		f.rss = append(f.rss, float64(mi.RSS))
		f.anon = append(f.anon, float64(mi.Anon))
	}
	return f, nil
}

// idleFacts is the child's report of the bridge's memory for n idle VMs.
type idleFacts struct {
	N     int   `json:"n"`
	RSS0  int64 `json:"rss0"`
	RSS1  int64 `json:"rss1"`
	Anon0 int64 `json:"anon0"`
	Anon1 int64 `json:"anon1"`
	File0 int64 `json:"file0"`
	File1 int64 `json:"file1"`
}

// benchProvision runs P5.
func (e *env) benchProvision(ctx context.Context) error {
	nSwtpm, nPrep, nIdle := 20, 20, 1000
	if e.quick {
		nSwtpm, nPrep, nIdle = 5, 10, 200
	}
	facts, err := e.swtpmProvision(ctx, nSwtpm)
	if err != nil {
		return err
	}
	e.swtpm = facts
	if facts.skipMsg == "" {
		e.logf("  P5 vTPM way, %d VMs: swtpm_setup median %s, setup+start median %s, swtpm VmRSS median %s (RssAnon %s)",
			nSwtpm, fmtDur(time.Duration(median(facts.setup))), fmtDur(time.Duration(median(facts.total))),
			fmtBytes(median(facts.rss)), fmtBytes(median(facts.anon)))
	}
	// With activity concealment on (the default) a VM's genesis is durable
	// at once and held for the next slot (conceal.interval), which batches
	// and extends it: the prepare does not wait for it. Off, the genesis
	// is batched and extended before the prepare returns.
	for _, conceal := range []bool{true, false} {
		for _, kind := range e.tpms {
			var per []float64
			n := nPrep
			for r := 0; r < e.runs; r++ {
				rig, err := e.openRig(ctx, kind, func(c *daemon.Config) {
					if !conceal {
						c.Conceal.Pad = -1
					}
				})
				if err != nil {
					return err
				}
				ds, err := rig.prepareN(ctx, n)
				rig.close()
				if err != nil {
					return err
				}
				per = append(per, median(ds))
			}
			v := median(per)
			what := "concealment on (default)"
			if !conceal {
				what = "concealment off"
			}
			e.logf("  P5 bridge prepare on %s, %s: median %s per VM", tpmLabel(kind), what, fmtDur(time.Duration(v)))
			r := row{ID: "P5", Case: "provisioning time per VM, " + what, TPM: tpmLabel(kind), Value: fmtDur(time.Duration(v)), V: v,
				Target: "≥20× faster", Notes: fmt.Sprintf("the bridge daemon's prepare (identity, genesis durable and extended, virtio-serial listener, state file), %d VMs one after another", n)}
			if conceal {
				r.Notes = fmt.Sprintf("the bridge daemon's prepare (identity, genesis durable, virtio-serial listener, state file), %d VMs one after another; the genesis is held for the next slot of conceal.interval, which batches and extends it, so that a VM start's time does not show in the log (docs/security.md)", n)
			}
			if facts.skipMsg != "" {
				r.Baseline, r.Ratio, r.Met, r.Notes = "-", "-", "-", r.Notes+"; no baseline: "+facts.skipMsg
			} else {
				b := median(facts.total)
				r.B, r.R = b, b/v
				r.Baseline = fmtDur(time.Duration(b)) + " (swtpm_setup+swtpm)"
				r.Ratio, r.Met = fmtRatio(b/v), yesNo(b/v >= 20)
			}
			e.add(r)
		}
	}
	// Memory per idle VM, in a fresh process.
	var idle idleFacts
	if err := e.child(ctx, "idle", nIdle, 0, &idle); err != nil {
		return err
	}
	per := float64(idle.RSS1-idle.RSS0) / float64(idle.N)
	perAnon := float64(idle.Anon1-idle.Anon0) / float64(idle.N)
	e.logf("  P5 bridge memory: %d idle VMs: RSS %s → %s (anon %s → %s): %s per VM (anon %s)", idle.N,
		fmtBytes(float64(idle.RSS0)), fmtBytes(float64(idle.RSS1)), fmtBytes(float64(idle.Anon0)), fmtBytes(float64(idle.Anon1)), fmtBytes(per), fmtBytes(perAnon))
	r := row{ID: "P5", Case: fmt.Sprintf("memory per idle VM (%d VMs)", idle.N), TPM: "sim", Value: fmtBytes(per) + " RSS", V: per,
		Target: "far less (≥10×)", Notes: fmt.Sprintf("RSS delta over %d idle VMs with listeners, after GC (anon %s/VM); swtpm: VmRSS of each process, RssAnon %s",
			idle.N, fmtBytes(perAnon), fmtBytes(median(facts.anon)))}
	if facts.skipMsg != "" {
		r.Baseline, r.Ratio, r.Met = "-", "-", "-"
	} else {
		b := median(facts.rss)
		r.B, r.R = b, b/per
		r.Baseline = fmtBytes(b) + " (1 swtpm)"
		r.Ratio, r.Met = fmtRatio(b/per), yesNo(b/per >= 10)
	}
	e.add(r)
	return nil
}

// child runs a memory measurement in a fresh process of this program, so
// nothing else the benchmark allocated counts, and decodes its JSON report.
func (e *env) child(ctx context.Context, what string, n, m int, out any) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, exe, "--child", what, "--child-n", fmt.Sprint(n), "--child-m", fmt.Sprint(m), "--work", e.work)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("child %s: %v: %s", what, err, stderr.String())
	}
	return json.Unmarshal(stdout.Bytes(), out)
}

// childMain is the fresh process's side of child.
func childMain(ctx context.Context, what string, n, m int, work string, stdout, stderr io.Writer) int {
	if work == "" {
		work = os.TempDir()
	}
	e := &env{work: work, log: stderr}
	var out any
	var err error
	switch what {
	case "idle":
		out, err = e.childIdle(ctx, n)
	case "scale":
		out, err = e.childScale(ctx, n, m)
	case "vtpm":
		out, err = e.childVTPM(ctx, n, os.Stdin, stdout)
	default:
		err = fmt.Errorf("unknown child %q", what)
	}
	if err != nil {
		fmt.Fprintf(stderr, "child %s: %v\n", what, err)
		return 1
	}
	json.NewEncoder(stdout).Encode(out)
	return 0
}

// childIdle measures the bridge's RSS before and after n idle VMs.
func (e *env) childIdle(ctx context.Context, n int) (*idleFacts, error) {
	rig, err := e.openRig(ctx, kindSim)
	if err != nil {
		return nil, err
	}
	defer rig.close()
	// Warm the code paths once so their one-time costs are not charged
	// to the VMs: one VM, then measure from there.
	if _, err := rig.prepareN(ctx, 1); err != nil {
		return nil, err
	}
	settle()
	m0, err := readMem(0)
	if err != nil {
		return nil, err
	}
	// All at once, as libvirt starts domains in parallel.
	if err := rig.prepareAll(ctx, n, false); err != nil {
		return nil, err
	}
	settle()
	m1, err := readMem(0)
	if err != nil {
		return nil, err
	}
	return &idleFacts{N: n, RSS0: m0.RSS, RSS1: m1.RSS, Anon0: m0.Anon, Anon1: m1.Anon, File0: m0.File, File1: m1.File}, nil
}
