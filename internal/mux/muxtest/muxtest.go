// Package muxtest opens a multiplexer on the in-process TPM simulator with
// a throw-away log store, for the tests of the packages built on the mux
// (bridge, agent, commands). The simulator is a process singleton, so tests
// using it must not run in parallel.
package muxtest

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Open returns a multiplexer on a fresh simulator and a store in
// t.TempDir() (no fsync: tests do not need durability against power loss),
// closed when the test ends.
func Open(t testing.TB, cfg mux.Config) *mux.Mux {
	t.Helper()
	return OpenWrapped(t, cfg, nil)
}

// OpenWrapped is Open with the simulator seen through wrap (when not nil),
// for a test that needs a TPM with other timing, e.g. a quote as slow as
// a hardware TPM's.
func OpenWrapped(t testing.TB, cfg mux.Config, wrap func(tpm.TPM) tpm.TPM) *mux.Mux {
	t.Helper()
	ctx := context.Background()
	tp, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	st, err := logstore.Open(filepath.Join(t.TempDir(), "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		tp.Close()
		t.Fatal(err)
	}
	var seen tpm.TPM = tp
	if wrap != nil {
		seen = wrap(tp)
	}
	m, err := mux.Open(ctx, seen, st, cfg)
	if err != nil {
		st.Close()
		tp.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); st.Close(); tp.Close() })
	return m
}
