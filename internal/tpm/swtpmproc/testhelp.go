package swtpmproc

import (
	"context"
	"os"
)

// TB is the part of testing.TB the test helpers use; *testing.T and
// *testing.B satisfy it. (Taking this interface keeps the testing package out
// of binaries that import swtpmproc for the demo.)
type TB interface {
	Helper()
	Skipf(format string, args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
	TempDir() string
	Context() context.Context
}

// Need skips the test when swtpm is not installed, with a message saying so,
// unless the environment variable CI is "true": CI installs swtpm, so there
// its absence fails the test instead of hiding it.
func Need(t TB) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %v", err)
			return
		}
		t.Skipf("skipping: %v", err)
	}
}

// StartTest calls Need, starts a fresh swtpm in a temporary state directory
// (killed with the test process if that dies) and stops it when the test
// ends.
func StartTest(t TB) *Proc {
	t.Helper()
	Need(t)
	p, err := StartWith(t.Context(), Options{StateDir: t.TempDir(), DieWithParent: true})
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Fatalf("%v", err)
		}
	})
	return p
}
