package daemon

import (
	"context"
	"errors"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/mux"
)

// errNoMuxMigration is returned until the multiplexer's MigrateOut and
// MigrateIn are on this branch (issue 14, h-chain).
var errNoMuxMigration = errors.New("this bridge's multiplexer cannot migrate VMs yet")

// migrateOut ends VM id's segment here with its migrated-out record.
func (d *Daemon) migrateOut(ctx context.Context, id conceal.Digest, out migrate.Out) (*evidence.Evidence, error) {
	return nil, errNoMuxMigration
}

// migrateIn opens an arrived VM's segment here.
func (d *Daemon) migrateIn(ctx context.Context, ar *migrate.Arrival, l mux.Launch) (conceal.Digest, error) {
	return conceal.Digest{}, errNoMuxMigration
}
