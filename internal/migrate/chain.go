package migrate

import (
	"crypto/ecdsa"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// VerifyChain is the destination's default check of a source's final chain
// evidence (Options.VerifyChain): post-mortem evidence that verifies for the
// VM's identity against the source's enrolled AK, and that has ended.
func VerifyChain(ev *evidence.Evidence, id *conceal.Identity, sourceAK *ecdsa.PublicKey, _ Out) error {
	rep, err := verify.Verify(ev, verify.Options{PostMortem: true, Identity: id, AK: sourceAK, ExpectUUID: id.UUID})
	if err != nil {
		return err
	}
	if !rep.Ended {
		return fmt.Errorf("the source's evidence does not end the VM's segment there")
	}
	return nil
}
