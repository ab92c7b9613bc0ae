package migrate

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// VerifyChain is the destination's check of a source's final chain
// evidence (Options.VerifyChain): the chain verifies (verify.Verify,
// post-mortem) for the VM's identity; its last segment is the source's,
// signed by the source's enrolled AK; and it ends with the migrated-out
// record of this very handover (this host's AK and name, the nonce, the
// credential). Earlier segments are verified too when every one of them
// names an AK among trusted (this host's and its peers'); a VM that comes
// from further away (A -> B -> C, C a peer of B only) has them taken as
// the source verified them at its own handover, still chained on their
// records (verify.Options.LastSegmentOnly): the tenant's verifier checks
// the whole chain.
func VerifyChain(ev *evidence.Evidence, id *conceal.Identity, sourceAK *ecdsa.PublicKey, trusted []*ecdsa.PublicKey, out Out) error {
	aks := append([]*ecdsa.PublicKey{sourceAK}, trusted...)
	known := map[[32]byte]bool{}
	for _, k := range aks {
		known[quote.AKFingerprint(k)] = true
	}
	lastOnly := false
	for i := range ev.Previous {
		if !known[sha256.Sum256(ev.Previous[i].AK)] {
			lastOnly = true
		}
	}
	if lastOnly {
		aks = []*ecdsa.PublicKey{sourceAK}
	}
	rep, err := verify.Verify(ev, verify.Options{PostMortem: true, Identity: id, AKs: aks, ExpectUUID: id.UUID, LastSegmentOnly: lastOnly, NoPairing: true})
	if err != nil {
		return err
	}
	if n := len(rep.Segments); n > 0 {
		fp := quote.AKFingerprint(sourceAK)
		if got := rep.Segments[n-1].AK; got != hex.EncodeToString(fp[:]) {
			return fmt.Errorf("the last segment is signed by AK sha256:%.16s, not the source's", got)
		}
	}
	if len(ev.Records) == 0 {
		return errors.New("the source's final evidence holds no records")
	}
	last, err := record.Unmarshal(ev.Records[len(ev.Records)-1].R)
	if err != nil {
		return fmt.Errorf("last record: %w", err)
	}
	mo := last.MigratedOut
	switch {
	case last.Kind != record.KindMigratedOut || mo == nil:
		return fmt.Errorf("the VM's segment on the source ended with a %s record, not migrated-out", last.Kind)
	case mo.DestAK != out.DestAK || mo.DestHost != out.DestHost:
		return fmt.Errorf("the migrated-out record sends the VM to %s (AK sha256:%x), not to this host", mo.DestHost, mo.DestAK[:8])
	case mo.Nonce != out.Nonce:
		return errors.New("the migrated-out record is for another handover (nonce): replayed")
	case mo.Credential != out.Credential:
		return errors.New("the migrated-out record names another credential than the one that carried the identity")
	}
	return nil
}

// MigratedOut is the migrated-out record the multiplexer writes for out.
func MigratedOut(out Out) record.MigratedOut {
	return record.MigratedOut{DestHost: out.DestHost, DestAK: out.DestAK, Nonce: out.Nonce, Credential: out.Credential}
}
