package daemon

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// listenerState is what the daemon keeps about a live VM instance's
// listeners, so that a restarted bridge can open them again: the serial
// socket at the path recorded at prepare (QEMU's channel, with
// <reconnect>, finds it again) with the owner libvirt gave it, and the
// vsock CID.
type listenerState struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	UUID   string `json:"uuid"`
	CID    uint32 `json:"cid,omitempty"`
	Serial string `json:"serial,omitempty"`
	Owner  *owner `json:"serial_owner,omitempty"`
	VTPM   string `json:"vtpm,omitempty"` // the vTPM socket path
}

// owner is a socket file's owner.
type owner struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
}

// stateFiles keeps one listenerState per live VM instance as JSON, in
// STATEDIR/vms/<id>.json. The files are hints for a restart, not a trust
// input: failures to write them are logged, not returned.
type stateFiles struct {
	dir string
	log *slog.Logger
}

func (f stateFiles) path(id conceal.Digest) string {
	return filepath.Join(f.dir, hex.EncodeToString(id[:])+".json")
}

// save writes st atomically (a temporary file renamed over the old one).
func (f stateFiles) save(id conceal.Digest, st listenerState) {
	b, _ := json.MarshalIndent(st, "", "  ")
	if err := os.MkdirAll(f.dir, 0o700); err != nil {
		f.log.Warn("vm state not saved", "vm", st.Name, "err", err)
		return
	}
	tmp := f.path(id) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		f.log.Warn("vm state not saved", "vm", st.Name, "err", err)
		return
	}
	if err := os.Rename(tmp, f.path(id)); err != nil {
		f.log.Warn("vm state not saved", "vm", st.Name, "err", err)
	}
}

// load reads instance id's state; nil when there is none or it is
// unreadable.
func (f stateFiles) load(id conceal.Digest) *listenerState {
	b, err := os.ReadFile(f.path(id))
	if err != nil {
		return nil
	}
	var st listenerState
	if err := json.Unmarshal(b, &st); err != nil {
		f.log.Warn("vm state unreadable", "file", f.path(id), "err", err)
		return nil
	}
	return &st
}

// remove deletes instance id's state.
func (f stateFiles) remove(id conceal.Digest) {
	if err := os.Remove(f.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		f.log.Warn("vm state not removed", "err", err)
	}
}

// keepOnly deletes the state of every instance not in live (hex ids).
func (f stateFiles) keepOnly(live map[string]bool) {
	ents, _ := os.ReadDir(f.dir)
	for _, ent := range ents {
		if !live[strings.TrimSuffix(ent.Name(), ".json")] {
			os.Remove(filepath.Join(f.dir, ent.Name()))
		}
	}
}
