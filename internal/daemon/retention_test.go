package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/evidence"
)

// TestRetentionCompacts runs the real path of key retention: the daemon's
// retention loop forgets an ended VM and compacts the store, after which
// the state directory's log file holds none of that VM's record bytes
// (docs/security.md, Forgetting). It would fail if forgetting only freed
// the pages.
func TestRetentionCompacts(t *testing.T) {
	e := newEnv(t)
	e.cfg.KeyRetention = Duration(time.Second)
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-r", "")})
	e.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-r", Reason: "destroyed"})
	pm := e.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-r", Nonce: []byte("n")}).Evidence
	ev, err := evidence.Decode(pm.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	genesis := []byte(ev.Records[0].R)
	db := filepath.Join(e.cfg.StateDir, "log.db")
	if raw, _ := os.ReadFile(db); !bytes.Contains(raw, genesis) {
		t.Fatal("the store does not hold the genesis record before retention: the test proves nothing")
	}
	deadline := time.Now().Add(15 * time.Second)
	for !e.log.contains("log store compacted") {
		if time.Now().After(deadline) {
			t.Fatal("the retention loop did not forget and compact within 15 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	raw, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, genesis) {
		t.Fatal("the log file still holds the forgotten VM's genesis record")
	}
	// The bridge goes on: a new VM gets its identity on the compacted store.
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-s", "")})
}
