package tpm

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// The extend fast path. Every batch the multiplexer closes costs one
// TPM2_PCR_Extend, so its overhead bounds the batch rate on a fast TPM.
// go-tpm's reflection marshalling costs tens of microseconds per command;
// the command below is a fixed 65-byte layout that we fill in place.

// Wire constants of TPM 2.0 Part 2 used by the hand-built command.
const (
	stSessions  = 0x8002     // TPM_ST_SESSIONS
	ccPCRExtend = 0x00000182 // TPM_CC_PCR_Extend
	rsPW        = 0x40000009 // TPM_RS_PW: the password pseudo-session
	algSHA256   = 0x000B     // TPM_ALG_SHA256

	// pwAuthSize is one TPMS_AUTH_COMMAND for an empty password:
	// sessionHandle (4), nonceCaller size (2), sessionAttributes (1),
	// hmac size (2).
	pwAuthSize = 4 + 2 + 1 + 2

	// extendCmdLen is header (10) + pcrHandle (4) + authorizationSize (4)
	// + the auth area + TPML_DIGEST_VALUES with one sha256 digest
	// (count 4, hashAlg 2, digest 32).
	extendCmdLen = headerSize + 4 + 4 + pwAuthSize + 4 + 2 + 32
)

// buildExtend writes TPM2_PCR_Extend(pcr, sha256:digest), authorized by an
// empty password session, into buf. The bytes equal what go-tpm marshals for
// the same command (TestBuildExtendMatchesGoTPM).
func buildExtend(buf *[extendCmdLen]byte, pcr int, digest *[32]byte) {
	b := buf[:]
	binary.BigEndian.PutUint16(b[0:], stSessions)
	binary.BigEndian.PutUint32(b[2:], extendCmdLen)
	binary.BigEndian.PutUint32(b[6:], ccPCRExtend)
	binary.BigEndian.PutUint32(b[10:], uint32(pcr)) // PCR handles are 0..23
	binary.BigEndian.PutUint32(b[14:], pwAuthSize)
	binary.BigEndian.PutUint32(b[18:], rsPW)
	binary.BigEndian.PutUint16(b[22:], 0) // nonceCaller: empty
	b[24] = 0                             // sessionAttributes: none
	binary.BigEndian.PutUint16(b[25:], 0) // hmac (the password): empty
	binary.BigEndian.PutUint32(b[27:], 1) // TPML_DIGEST_VALUES.count
	binary.BigEndian.PutUint16(b[31:], algSHA256)
	copy(b[33:], digest[:])
}

// parseExtendResponse checks a TPM2_PCR_Extend response: a whole response
// whose code is TPM_RC_SUCCESS. A failure code is returned as a tpm2.TPMRC,
// whose message decodes it and which errors.Is matches.
func parseExtendResponse(rsp []byte) error {
	if len(rsp) < headerSize {
		return fmt.Errorf("short response: %d bytes", len(rsp))
	}
	if size := binary.BigEndian.Uint32(rsp[2:]); int(size) != len(rsp) {
		return fmt.Errorf("response size field %d, got %d bytes", size, len(rsp))
	}
	if rc := binary.BigEndian.Uint32(rsp[6:]); rc != 0 {
		return fmt.Errorf("TPM2_PCR_Extend: %w", tpm2.TPMRC(rc))
	}
	if tag := binary.BigEndian.Uint16(rsp[0:]); tag != stSessions {
		return fmt.Errorf("successful TPM2_PCR_Extend response has tag 0x%04x, want TPM_ST_SESSIONS", tag)
	}
	return nil
}

// extendFast sends the hand-built extend. The caller holds d.mu, which also
// guards d.extendCmd.
func (d *dev) extendFast(ctx context.Context, pcr int, digest *[32]byte) error {
	buildExtend(&d.extendCmd, pcr, digest)
	rsp, err := d.conn.send(ctx, d.extendCmd[:])
	if err != nil {
		return err
	}
	return parseExtendResponse(rsp)
}
