//go:build cgo && !nosim

package tpm

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
)

// SimAvailable says whether this build has the in-process simulator.
const SimAvailable = true

// simInUse is this package's one deliberate piece of package-level mutable
// state. The go-tpm-tools simulator is a process-wide singleton whose Get
// blocks until the previous holder closes it; this flag lets a second
// Open("sim") fail at once with a clear error instead of hanging.
var simInUse atomic.Bool

// simTPM is the "sim" backend: a dev plus the simulator handle for Reset.
type simTPM struct {
	*dev
	sim *simulator.Simulator
}

// simConn sends commands to the in-process simulator.
type simConn struct {
	sim *simulator.Simulator
	buf []byte
}

func (s *simConn) send(ctx context.Context, cmd []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("simulator: %w", err)
	}
	if _, err := s.sim.Write(cmd); err != nil {
		return nil, fmt.Errorf("simulator: run command: %w", err)
	}
	rsp, err := readResponse(s.sim, s.buf)
	if err != nil {
		return nil, fmt.Errorf("simulator: %w", err)
	}
	s.buf = rsp[:0]
	return rsp, nil
}

func (s *simConn) close() error { return s.sim.Close() }

// openSim takes the process's simulator, manufactures it with seed (the
// go-tpm-tools simulator sends TPM2_Startup(CLEAR) itself), and loads the AK.
func openSim(ctx context.Context, spec string, seed int64) (TPM, error) {
	if !simInUse.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("open tpm %q: the in-process simulator is already open in this process (it is a process-wide singleton: Close the other TPM first)", spec)
	}
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		simInUse.Store(false)
		return nil, fmt.Errorf("open tpm %q: start simulator: %w", spec, err)
	}
	c := &simConn{sim: sim, buf: make([]byte, 0, 4096)}
	d := &dev{spec: spec, conn: c, onClose: func() error { simInUse.Store(false); return nil }}
	err = d.persistSeeds(ctx)
	if err == nil {
		err = d.init(ctx, false)
	}
	if err != nil {
		cerr := c.close()
		simInUse.Store(false)
		return nil, errors.Join(fmt.Errorf("open tpm %q: %w", spec, err), cerr)
	}
	return &simTPM{dev: d, sim: sim}, nil
}

// persistSeeds makes the fixed seeds survive Reset. GetWithFixedSeedInsecure
// sets the seeds only in the simulator's RAM copy of its persistent data, so
// a simulated reboot (which reloads that data from the simulator's NV) would
// bring back the random seeds of manufacture and with them a different AK.
// TPM2_Clear writes the whole persistent data block to NV; it leaves the
// endorsement seed alone and on a freshly manufactured TPM has nothing else
// to lose (lockout auth is empty).
func (d *dev) persistSeeds(ctx context.Context) error {
	_, err := tpm2.Clear{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHLockout, Auth: tpm2.PasswordAuth(nil)},
	}.Execute(d.tr(ctx))
	if err != nil {
		return fmt.Errorf("persist simulator seeds (TPM2_Clear): %w", err)
	}
	return nil
}

// Reset implements Resetter: TPM2_Shutdown(CLEAR), a simulated power cycle,
// TPM2_Startup(CLEAR), then the AK is re-created (transient objects do not
// survive a reset) and checked to be the same key.
func (s *simTPM) Reset(ctx context.Context) error {
	if err := s.lock("reset"); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("tpm %s: reset: %w", s.spec, err)
	}
	if err := s.sim.Reset(); err != nil {
		return fmt.Errorf("tpm %s: reset simulator: %w", s.spec, err)
	}
	s.ak = 0
	if err := s.loadAK(ctx); err != nil {
		return fmt.Errorf("tpm %s: reload AK after reset: %w", s.spec, err)
	}
	return nil
}
