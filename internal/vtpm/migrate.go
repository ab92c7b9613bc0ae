package vtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Live migration (docs/vtpm.md "Live migration"). QEMU's TPM emulator
// backend moves a vTPM's state in its migration stream: on the source it
// reads three state blobs (CMD_GET_STATEBLOB: permanent, volatile,
// savestate) once the VM is stopped; on the destination it stops the TPM
// (CMD_STOP), writes the blobs back (CMD_SET_STATEBLOB) and resumes it with
// CMD_INIT(PTM_INIT_FLAG_DELETE_VOLATILE), with no Startup from the guest.
//
// The blobs cross the host's migration stream, which the bridge does not
// authenticate, so they carry nothing the vPCRs depend on: only a marker
// and the locality. The destination's vPCRs come from the bridges'
// authenticated handover (the chain of the VM's records, verified, and the
// snapshot in its migrated-in record), installed with Adopt. Until then the
// destination's vTPM is incoming: it answers QEMU's control commands
// without journaling anything (it has no identity to journal under yet),
// and a guest TPM command waits for Adopt.

// Blob types (PTM_BLOB_TYPE_*) and the init flag QEMU resumes with.
const (
	blobPermanent      uint32 = 1
	blobVolatile       uint32 = 2
	blobSavestate      uint32 = 3
	initDeleteVolatile uint32 = 1
)

// blobMagic starts every state blob this vTPM writes.
var blobMagic = []byte("tpmmux-vtpm-v1\x00\x00")

// maxStateBlob bounds a CMD_SET_STATEBLOB body this vTPM reads; its own
// blobs are a few dozen bytes. A larger one (swtpm's are kilobytes) closes
// the connection with a clear line.
const maxStateBlob = 4096

// stateBlob is a state blob's content.
type stateBlob struct {
	Type     uint32
	Locality uint8
	Seq      uint64 // the source's last event: informational, checked against Adopt
}

func (b stateBlob) marshal() []byte {
	out := append([]byte(nil), blobMagic...)
	out = binary.BigEndian.AppendUint32(out, b.Type)
	if b.Type == blobVolatile {
		out = append(out, b.Locality)
		out = binary.BigEndian.AppendUint64(out, b.Seq)
	}
	return out
}

// parseStateBlob decodes a state blob of the given type. The bytes come
// from QEMU's migration stream: they are checked exactly.
func parseStateBlob(typ uint32, p []byte) (stateBlob, error) {
	if !bytes.HasPrefix(p, blobMagic) {
		return stateBlob{}, errors.New("not a tpmmux vTPM state blob (migrating from swtpm or another vTPM is not supported)")
	}
	p = p[len(blobMagic):]
	if len(p) < 4 {
		return stateBlob{}, errors.New("state blob truncated")
	}
	b := stateBlob{Type: binary.BigEndian.Uint32(p)}
	p = p[4:]
	if b.Type != typ {
		return stateBlob{}, fmt.Errorf("state blob of type %d sent as type %d", b.Type, typ)
	}
	switch b.Type {
	case blobPermanent:
	case blobVolatile:
		if len(p) < 9 {
			return stateBlob{}, errors.New("volatile state blob truncated")
		}
		b.Locality, b.Seq = p[0], binary.BigEndian.Uint64(p[1:9])
		p = p[9:]
		if b.Locality > vpcr.MaxLocality {
			return stateBlob{}, fmt.Errorf("volatile state blob: locality %d", b.Locality)
		}
	default:
		return stateBlob{}, fmt.Errorf("state blob of unknown type %d", b.Type)
	}
	if len(p) != 0 {
		return stateBlob{}, fmt.Errorf("state blob has %d trailing bytes", len(p))
	}
	return b, nil
}

// getStateBlob answers CMD_GET_STATEBLOB (request: state_flags, type,
// offset; response: result, state_flags, totlength, length, data).
func (v *VTPM) getStateBlob(body []byte) []byte {
	typ, offset := binary.BigEndian.Uint32(body[4:8]), binary.BigEndian.Uint32(body[8:12])
	v.mu.Lock()
	var blob []byte
	switch typ {
	case blobPermanent:
		blob = stateBlob{Type: blobPermanent}.marshal()
	case blobVolatile:
		blob = stateBlob{Type: blobVolatile, Locality: v.locality, Seq: v.st.Seq()}.marshal()
	case blobSavestate:
		// Nothing: the state is in the journal.
	default:
		v.mu.Unlock()
		return append(be32(ptmBadParameter), make([]byte, 12)...)
	}
	v.mu.Unlock()
	if int(offset) > len(blob) {
		return append(be32(ptmBadParameter), make([]byte, 12)...)
	}
	blob = blob[offset:]
	resp := be32(ptmSuccess)
	resp = binary.BigEndian.AppendUint32(resp, 0) // state_flags: not encrypted
	resp = binary.BigEndian.AppendUint32(resp, uint32(len(blob)))
	resp = binary.BigEndian.AppendUint32(resp, uint32(len(blob)))
	return append(resp, blob...)
}

// setStateBlob takes a CMD_SET_STATEBLOB blob. Only the vTPM of a VM
// migrating in accepts one, until its resume (the handover may be adopted
// before or after QEMU loads the blobs); the volatile blob arms the resume that the
// next CMD_INIT(DELETE_VOLATILE) performs.
func (v *VTPM) setStateBlob(typ uint32, blob []byte) uint32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.awaitResume {
		v.log.Warn("vtpm: CMD_SET_STATEBLOB refused: this VM is not migrating in (its vTPM already runs here)")
		return ptmBadOrdinal
	}
	b, err := parseStateBlob(typ, blob)
	if err != nil {
		v.log.Warn("vtpm: CMD_SET_STATEBLOB refused", "type", typ, "err", err)
		return ptmBadParameter
	}
	if b.Type == blobVolatile {
		v.locality = b.Locality
		v.blobSeq = b.Seq
		v.resumeArmed = true
	}
	return ptmSuccess
}

// Incoming reports whether the vTPM waits for its migrated state (Adopt).
func (v *VTPM) Incoming() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.incoming
}

// Adopt installs a migrated-in VM's vPCRs: the snapshot its migrated-in
// record carries, then past, the VM's events on this host since (none at
// the handover; a restarted bridge passes them). Guest TPM commands waiting
// for it run from then on. It fails, changing nothing, on a snapshot that
// does not fit the vTPM's banks or events that do not apply.
func (v *VTPM) Adopt(sn *vpcr.Snapshot, past []vpcr.Event) error {
	if sn == nil {
		return errors.New("vtpm: adopt migrated state: no vPCR snapshot")
	}
	// The VM's banks come with it (its genesis fixed them), whatever this
	// host's vtpm_banks say for VMs started here.
	st, err := vpcr.ReplayFrom(nil, sn, past)
	if err != nil {
		return fmt.Errorf("vtpm: adopt migrated state: %w", err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.incoming {
		return errors.New("vtpm: adopt migrated state: the vTPM is not incoming")
	}
	if v.blobSeq != 0 && v.blobSeq != sn.Seq {
		v.log.Warn("vtpm: QEMU's state blob names another vTPM event than the handover; using the handover's", "blob_seq", v.blobSeq, "handover_seq", sn.Seq)
	}
	v.st = st
	if len(past) > 0 {
		v.last = past[len(past)-1]
	}
	v.incoming = false
	close(v.adopted)
	return nil
}

// waitAdopted blocks a guest command of an incoming vTPM until Adopt (nil)
// or ctx ends. QEMU's probe at its start (a TPM command before any INIT)
// does not wait: it gets the answer of a TPM that is not initialised, as
// on any VM's start.
func (v *VTPM) waitAdopted(ctx context.Context) error {
	v.mu.Lock()
	wait := v.incoming && v.incomingInit
	v.mu.Unlock()
	if !wait {
		return nil
	}
	select {
	case <-v.adopted:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
