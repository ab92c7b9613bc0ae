package bridge

import (
	"crypto/sha256"

	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Launch measures a domain as Prepare does (XML digest, launch files, vsock
// CID, vTPM banks) without giving it an identity: what a VM arriving by
// live migration runs as on this host (its migrated-in record).
func (b *Bridge) Launch(dom *libvirt.Domain, domainXML []byte) mux.Launch {
	l := mux.Launch{UUID: dom.UUID, Name: dom.Name, CID: dom.CID, DomainXML: sha256.Sum256(domainXML)}
	if dom.VTPMSocket != "" {
		l.VTPMBanks = b.VTPMBanks
	}
	for _, f := range dom.Files {
		l.Files = append(l.Files, hashFile(f))
	}
	return l
}
