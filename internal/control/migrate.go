package control

import (
	"context"
	"fmt"
)

// OpMigrate is the destination's "migrate begin" (Request.Name, XML: the
// incoming domain XML libvirt gives the hook): the bridge reserves the VM at
// the source bridge for the handover of its identity (docs/migration.md).
// An error fails the hook, and libvirt cancels the migration.
const OpMigrate = "migrate"

// MigrateHandler is implemented by a bridge that takes part in live
// migration.
type MigrateHandler interface {
	// MigrateBegin reserves the incoming domain's identity at its source.
	MigrateBegin(ctx context.Context, name string, xml []byte) (*VM, error)
}

func (s *Server) dispatchMigrate(ctx context.Context, req *Request, resp *Response) error {
	h, ok := s.Handler.(MigrateHandler)
	if !ok {
		return fmt.Errorf("op %q: this bridge does not migrate VMs", req.Op)
	}
	if req.XML == "" {
		return fmt.Errorf("op %q: no domain XML", req.Op)
	}
	var err error
	resp.VM, err = h.MigrateBegin(ctx, req.Name, []byte(req.XML))
	return err
}
