package libvirt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// ReasonMissedStop is the teardown reason for a VM instance whose domain
// stopped while the bridge was not told (bridge down, hook lost).
const ReasonMissedStop = "missed-stop"

// KnownVM is a VM instance with a live (not torn down) identity in the
// bridge's log.
type KnownVM struct {
	ID   conceal.Digest // the instance's identity id
	Name string
	UUID [16]byte
}

// Match pairs a live identity with the running domain it belongs to.
type Match struct {
	VM     KnownVM
	Domain DomainInfo
}

// Plan is what Reconcile decided.
type Plan struct {
	// Matched are live identities whose domain runs.
	Matched []Match
	// Unknown are running domains without a live identity: started while
	// the bridge was down (the hook failed open), opted out, or started
	// before tpmmux was installed. They are reported, not changed.
	Unknown []DomainInfo
	// Teardown are live identities whose domain no longer runs: each gets
	// a teardown record with reason ReasonMissedStop.
	Teardown []KnownVM
}

// Reconcile compares the running domains with the live identities. A live
// identity belongs to a running domain when both name and UUID agree (a
// domain undefined and defined anew under the same name has a new UUID, so
// the old identity is torn down and the new domain is reported). When
// several live identities claim one running domain, which the bridge never
// creates, the first in known keeps it and the others are torn down.
//
// Reconcile is pure. Take known before listing the running domains (as
// Client.Plan does): a domain that starts in between then shows up at worst
// as Unknown, never as a false teardown of its fresh identity.
func Reconcile(running []DomainInfo, known []KnownVM) Plan {
	type key struct {
		name string
		uuid [16]byte
	}
	idx := make(map[key]int, len(running))
	for i, d := range running {
		idx[key{d.Name, d.UUID}] = i
	}
	claimed := make([]bool, len(running))
	var p Plan
	for _, vm := range known {
		i, ok := idx[key{vm.Name, vm.UUID}]
		if !ok || claimed[i] {
			p.Teardown = append(p.Teardown, vm)
			continue
		}
		claimed[i] = true
		p.Matched = append(p.Matched, Match{VM: vm, Domain: running[i]})
	}
	for i, d := range running {
		if !claimed[i] {
			p.Unknown = append(p.Unknown, d)
		}
	}
	return p
}

// Plan takes the live identities from known, then lists the running
// domains, and reconciles them (in that order; see Reconcile).
func (c *Client) Plan(ctx context.Context, known func() ([]KnownVM, error)) (Plan, error) {
	vms, err := known()
	if err != nil {
		return Plan{}, fmt.Errorf("reconcile: live identities: %w", err)
	}
	running, err := c.RunningDomains(ctx)
	if err != nil {
		return Plan{}, fmt.Errorf("reconcile: %w", err)
	}
	return Reconcile(running, vms), nil
}

// TeardownFunc ends VM instance vm with reason. It must tear down by
// vm.ID, never by name (a newer instance may have the same name), and treat
// an instance that has already ended as done.
type TeardownFunc func(ctx context.Context, vm KnownVM, reason string) error

// Apply carries out the plan: it logs the unknown domains (at Info when
// their XML opts out of attestation, Warn otherwise) and tears down the
// identities whose domain is gone with ReasonMissedStop. It goes on past a
// failed teardown and returns all failures joined.
func (p Plan) Apply(ctx context.Context, teardown TeardownFunc, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	for _, d := range p.Unknown {
		attrs := []any{"vm", d.Name, "uuid", conceal.FormatUUID(d.UUID), "libvirt_id", d.ID}
		dom, err := d.Parse()
		switch {
		case err != nil:
			log.Warn("running domain without tpmmux identity; its XML does not parse", append(attrs, "err", err)...)
		case dom.Attest == "no":
			log.Info("running domain opted out of tpmmux attestation", attrs...)
		default:
			log.Warn("running domain without tpmmux identity: its measurements are not multiplexed until it restarts", attrs...)
		}
	}
	var errs []error
	for _, vm := range p.Teardown {
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("reconcile: %w", err))
			break
		}
		if err := teardown(ctx, vm, ReasonMissedStop); err != nil {
			errs = append(errs, fmt.Errorf("reconcile: tear down %s (%x): %w", vm.Name, vm.ID[:6], err))
			continue
		}
		log.Info("vm torn down: its domain stopped while the bridge was not told", "vm", vm.Name, "uuid", conceal.FormatUUID(vm.UUID), "reason", ReasonMissedStop)
	}
	return errors.Join(errs...)
}
