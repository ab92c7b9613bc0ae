package daemon

import (
	"context"
	"crypto/sha256"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/vtpm/qemutpm"
)

// TestVTPMIdleParked: the daemon serves its vTPMs with one shared
// vtpm.Parker, so a vTPM VM that QEMU has connected to holds no goroutine
// once idle (docs/vtpm.md, Memory): both its channels wait in the Parker,
// and the guest's next command is answered.
func TestVTPMIdleParked(t *testing.T) {
	e := newEnv(t)
	e.cfg.VTPMDir = filepath.Join(e.dir, "run", "vtpm")
	e.start()
	sock := filepath.Join(e.cfg.VTPMDir, "vm-p.sock")
	x := strings.Replace(e.domainXML("vm-p", ""), "</devices>", "<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='"+sock+"'/></backend></tpm></devices>", 1)
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: x})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qemutpm.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Startup(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Run(ctx, qemutpm.ExtendIMA(sha256.Sum256([]byte("busy")))); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1600 * time.Millisecond) // over the channels' idle second
	if e.d.parker == nil {
		t.Fatal("the daemon has no Parker: each vTPM channel keeps a goroutine")
	}
	if got := e.d.parker.Parked(); got != 2 {
		t.Errorf("%d sockets parked, want the idle vTPM's control and data", got)
	}
	if err := c.Run(ctx, qemutpm.ExtendIMA(sha256.Sum256([]byte("after idle")))); err != nil {
		t.Fatalf("extend after the idle time: %v", err)
	}
}
