package record

import (
	"fmt"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Live migration (docs/protocol.md "Migration"): a VM keeps its identity
// (uuid, instance, K) when it moves between hosts, and its history becomes
// a chain of segments, one per stay on a host. Record numbers continue
// across hosts: when the source's migrated-out record is number n, the
// destination's migrated-in record is n+1.

// maxHostName bounds a host or domain name in a migration record (far
// above what DNS or libvirt use: it only keeps hostile input small).
const maxHostName = 4096

// MigratedOut is the last record of a VM's segment on the source host: the
// VM left for the destination named here. The source keeps a post-mortem
// quote over it, as for a teardown, and hands that final evidence to the
// destination, whose migrated-in record names this record's hash.
type MigratedOut struct {
	DestHost string `cbor:"1,keyasint" json:"dest_host"`
	// DestAK is the SHA-256 of the destination AK's DER SubjectPublicKeyInfo
	// (the fingerprint enroll.AKFingerprint prints): the only AK that may
	// sign the next segment.
	DestAK [32]byte `cbor:"2,keyasint" json:"dest_ak_sha256"`
	// Nonce is the destination's handover nonce.
	Nonce [32]byte `cbor:"3,keyasint" json:"nonce"`
	// Credential is the SHA-256 of the credential blob || encrypted secret
	// that wrapped K to the destination's TPM.
	Credential [32]byte `cbor:"4,keyasint" json:"credential_sha256"`
}

// MigratedIn is the first record of a VM's segment on a destination host,
// its genesis there: who the VM is and what it runs as here (as Genesis),
// and where it came from, bound to the source's history by Prev.
type MigratedIn struct {
	UUID      [16]byte `cbor:"1,keyasint" json:"uuid"`
	Name      string   `cbor:"2,keyasint" json:"name"`
	Instance  [16]byte `cbor:"3,keyasint" json:"instance"`
	CID       uint32   `cbor:"4,keyasint,omitempty" json:"cid,omitempty"`
	DomainXML [32]byte `cbor:"5,keyasint" json:"domain_xml_sha256"`
	Files     []File   `cbor:"6,keyasint,omitempty" json:"files,omitempty"`
	Host      string   `cbor:"7,keyasint,omitempty" json:"host,omitempty"`
	// Epoch is H(R_epoch) of the destination epoch the segment lives in,
	// as Genesis.Epoch.
	Epoch [32]byte `cbor:"8,keyasint" json:"epoch_sha256"`
	// VTPMBanks are the VM's vTPM banks (fixed by its genesis); empty
	// without a vTPM.
	VTPMBanks []uint16 `cbor:"9,keyasint,omitempty" json:"vtpm_banks,omitempty"`
	// SourceHost, SourceAK (SHA-256 of its DER SubjectPublicKeyInfo) and
	// SourceEpoch (H(R_epoch)) name the previous segment's host, the AK
	// that signed it and its epoch.
	SourceHost  string   `cbor:"10,keyasint,omitempty" json:"source_host,omitempty"`
	SourceAK    [32]byte `cbor:"11,keyasint" json:"source_ak_sha256"`
	SourceEpoch [32]byte `cbor:"12,keyasint" json:"source_epoch_sha256"`
	// Prev is H(R) of the source's migrated-out record: where the previous
	// segment ended.
	Prev [32]byte `cbor:"13,keyasint" json:"prev_sha256"`
	// Seq is this record's number: the migrated-out record's plus one
	// (the commitment binds it too; it is spelled out so that a verifier
	// can say where a segment claims to start).
	Seq uint64 `cbor:"14,keyasint" json:"seq"`
	// VPCRs, for a VM with a bridge-served vTPM, are its vPCRs when it
	// arrived: the destination's vTPM starts from them, and a verifier
	// replays the segment's TPM event records from them.
	VPCRs *vpcr.Snapshot `cbor:"15,keyasint,omitempty" json:"vpcrs,omitempty"`
}

// Validate bounds for a migrated-in record.
const (
	maxMigratedFiles = 64
	maxSnapshotBanks = 8
)

func (m *MigratedIn) validate() error {
	if len(m.Host) > maxHostName || len(m.SourceHost) > maxHostName || len(m.Name) > maxHostName {
		return fmt.Errorf("migrated-in record with a name of more than %d bytes", maxHostName)
	}
	if m.Seq == 0 {
		return fmt.Errorf("migrated-in record numbered 0: record 0 is always a genesis")
	}
	if len(m.Files) > maxMigratedFiles || len(m.VTPMBanks) > maxSnapshotBanks {
		return fmt.Errorf("migrated-in record with %d files and %d vTPM banks", len(m.Files), len(m.VTPMBanks))
	}
	if sn := m.VPCRs; sn != nil {
		if len(m.VTPMBanks) == 0 {
			return fmt.Errorf("migrated-in record carries vPCRs but declares no vTPM banks")
		}
		if len(sn.Allocatable) > maxSnapshotBanks || len(sn.Active) > maxSnapshotBanks || len(sn.Pending) > maxSnapshotBanks || len(sn.Values) > maxSnapshotBanks {
			return fmt.Errorf("migrated-in vPCR snapshot with too many banks")
		}
		if _, err := vpcr.FromSnapshot(sn); err != nil {
			return fmt.Errorf("migrated-in record: %w", err)
		}
	} else if len(m.VTPMBanks) > 0 {
		return fmt.Errorf("migrated-in record of a vTPM VM without its vPCR snapshot")
	}
	return nil
}
