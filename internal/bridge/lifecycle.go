// Package bridge ties the multiplexer to the host and to the guests. It has
// two halves, one per side:
//
//   - lifecycle.go turns libvirt lifecycle events (from the hook, or from
//     the demo, which uses the same path) into VM identities, genesis and
//     teardown records (Bridge.Prepare).
//   - session.go is the guest server: it runs the guest protocol on a
//     connection that a transport has already tied to one VM instance,
//     turns the agent's measurements into that VM's records, and answers
//     its evidence requests (Bridge.Serve).
//
// The daemon (internal/daemon) owns the listeners and the control socket
// and calls both; the tpmmux-bridge binary runs the daemon.
package bridge

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sync/semaphore"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/libvirt"
)

// maxLaunchFile bounds how much of one launch file the bridge hashes, so a
// domain XML that names a huge or endless file cannot stall a start.
const maxLaunchFile = 4 << 30

// Bridge handles VM lifecycle events for one multiplexer.
type Bridge struct {
	Mux *mux.Mux
	Log *slog.Logger
	// MaxQueued bounds the guest records submitted and not yet settled
	// across all VMs (default DefaultMaxQueued).
	MaxQueued int
	// VTPMBanks are the PCR banks (TPM_ALG_IDs) of the vTPM of a domain
	// that has an external TPM backend (DESIGN.md §9): Prepare writes
	// them into its genesis. Nil: the bridge serves no vTPMs.
	VTPMBanks []uint16

	// Quota bounds each VM instance's records (quota.go); the zero value
	// takes the defaults.
	Quota Quota

	quotaMu sync.Mutex
	quotas  map[conceal.Digest]*vmQuota

	budgetOnce sync.Once
	budget     *semaphore.Weighted
	budgetMax  int64

	sessMu sync.Mutex
	sess   sessions
}

// Prepare handles libvirt's "prepare begin": it parses the domain XML,
// measures the launch (the XML's digest and the files it boots from), and
// gives the VM a fresh concealment identity with its genesis record.
func (b *Bridge) Prepare(ctx context.Context, domainXML []byte) (*libvirt.Domain, *conceal.Identity, error) {
	dom, err := libvirt.ParseDomain(domainXML)
	if err != nil {
		return nil, nil, fmt.Errorf("prepare: %w", err)
	}
	if id, ok := b.Mux.Lookup(dom.Name); ok {
		// A start that libvirt retried, or a prepare for a domain whose
		// stop we missed: end the old instance first.
		if _, err := b.Mux.Teardown(ctx, id, "missed-stop"); err != nil {
			return nil, nil, fmt.Errorf("prepare %s: end previous instance: %w", dom.Name, err)
		}
	}
	l := mux.Launch{UUID: dom.UUID, Name: dom.Name, CID: dom.CID, DomainXML: sha256.Sum256(domainXML)}
	if dom.VTPMSocket != "" {
		l.VTPMBanks = b.VTPMBanks
	}
	for _, f := range dom.Files {
		l.Files = append(l.Files, hashFile(f))
	}
	ident, err := b.Mux.NewVM(ctx, l)
	if err != nil {
		return nil, nil, fmt.Errorf("prepare %s: %w", dom.Name, err)
	}
	b.logger().Info("vm prepared", "vm", dom.Name, "uuid", conceal.FormatUUID(dom.UUID), "cid", dom.CID)
	return dom, ident, nil
}

// Stopped handles "stopped end" and "release end": it records the VM's
// teardown. Both hooks fire for one stop, so a second call is a no-op.
func (b *Bridge) Stopped(ctx context.Context, name, reason string) error {
	id, ok := b.Mux.Lookup(name)
	if !ok {
		return nil
	}
	if _, err := b.Mux.Teardown(ctx, id, reason); err != nil && !errors.Is(err, mux.ErrEnded) {
		return fmt.Errorf("stopped %s: %w", name, err)
	}
	b.forgetQuota(id)
	b.logger().Info("vm torn down", "vm", name, "reason", reason)
	return nil
}

func (b *Bridge) logger() *slog.Logger {
	if b.Log != nil {
		return b.Log
	}
	return slog.Default()
}

// hashFile measures one launch file; an unreadable file is recorded with
// the reason rather than failing the start.
func hashFile(f libvirt.LaunchFile) record.File {
	out := record.File{Role: f.Role, Path: f.Path}
	fh, err := os.Open(f.Path)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	defer fh.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(fh, maxLaunchFile+1))
	switch {
	case err != nil:
		out.Error = err.Error()
	case n > maxLaunchFile:
		out.Error = fmt.Sprintf("larger than %d bytes", maxLaunchFile)
	default:
		out.SHA256 = h.Sum(nil)
	}
	return out
}
