//go:build !cgo || nosim

package tpm

import (
	"context"
	"fmt"
)

// SimAvailable says whether this build has the in-process simulator (it
// needs cgo and libcrypto, which the daemon build leaves out).
const SimAvailable = false

// simTPM exists only so code that type-switches on it builds; no value of
// it is ever made without the simulator.
type simTPM struct{ *dev }

// openSim refuses: this build has no simulator. Host builds are static
// (CGO_ENABLED=0) or tagged nosim so that the daemon needs neither cgo nor
// libcrypto at run time.
func openSim(_ context.Context, spec string, _ int64) (TPM, error) {
	return nil, fmt.Errorf("open tpm %q: this build has no in-process simulator (a static build, for hosts); use --tpm device or --tpm swtpm:HOST:PORT (swtpm_setup and swtpm socket, see docs/hook.md), or build with cgo for the simulator", spec)
}
