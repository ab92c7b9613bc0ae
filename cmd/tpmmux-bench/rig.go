package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
)

// muxRig is the multiplexer a run measures: a fresh TPM of a kind, a log
// store in a temporary directory of the work dir, n VMs made there with a
// default multiplexer (makeVMs), and then the multiplexer under test, with
// the run's configuration, on the same store.
type muxRig struct {
	rt     *runTPM
	dir    string
	st     *logstore.Store
	m      *mux.Mux
	idents []*conceal.Identity
}

// openMuxRig opens a muxRig; cfg's Host, Version and Logger are the
// benchmark's. On error what was opened is closed again.
func (e *env) openMuxRig(ctx context.Context, kind, prefix string, nVM int, so *logstore.Options, cfg mux.Config) (_ *muxRig, err error) {
	r := &muxRig{}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if r.rt, err = e.openTPM(ctx, kind); err != nil {
		return nil, err
	}
	if r.dir, err = tempDir(e.work, prefix); err != nil {
		return nil, err
	}
	if r.st, err = logstore.Open(filepath.Join(r.dir, "log.db"), so); err != nil {
		return nil, err
	}
	if r.idents, err = makeVMs(ctx, r.rt.TPM, r.st, nVM); err != nil {
		return nil, err
	}
	cfg.Host, cfg.Version, cfg.Logger = "bench", "bench", quiet
	if r.m, err = mux.Open(ctx, r.rt.TPM, r.st, cfg); err != nil {
		return nil, err
	}
	if f := r.m.Status().Fault; f != "" {
		return nil, fmt.Errorf("multiplexer faulted: %s", f)
	}
	return r, nil
}

// reopen closes the multiplexer and opens it again on the same TPM and
// store with cfg (Host, Version and Logger the benchmark's).
func (r *muxRig) reopen(ctx context.Context, cfg mux.Config) error {
	r.m.Close()
	r.m = nil
	cfg.Host, cfg.Version, cfg.Logger = "bench", "bench", quiet
	m, err := mux.Open(ctx, r.rt.TPM, r.st, cfg)
	if err != nil {
		return fmt.Errorf("reopen the multiplexer: %w", err)
	}
	r.m = m
	if f := m.Status().Fault; f != "" {
		return fmt.Errorf("multiplexer faulted after reopening: %s", f)
	}
	return nil
}

// close closes the multiplexer, the store and the TPM and removes the
// directory.
func (r *muxRig) close() {
	if r.m != nil {
		r.m.Close()
	}
	if r.st != nil {
		r.st.Close()
	}
	if r.dir != "" {
		removeAll(r.dir)
	}
	if r.rt != nil {
		r.rt.Close()
	}
}
