package daemon

import (
	"context"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/mux"
)

// migrateOut ends VM id's segment here with its migrated-out record.
func (d *Daemon) migrateOut(ctx context.Context, id conceal.Digest, out migrate.Out) (*evidence.Evidence, error) {
	return d.mux.MigrateOut(ctx, id, migrate.MigratedOut(out))
}

// migrateIn opens an arrived VM's segment here.
func (d *Daemon) migrateIn(ctx context.Context, ar *migrate.Arrival, l mux.Launch) (conceal.Digest, error) {
	return d.mux.MigrateIn(ctx, mux.Arrival{Identity: ar.Identity, Launch: l, SourceHost: ar.SourceHost,
		SourceAK: ar.SourceAK, Chain: ar.Chain, VPCRs: ar.VPCRs})
}
