package daemon

import (
	"context"
	"encoding/hex"
)

// restoreLive opens the listeners of every VM instance that is live in the
// store (the bridge restarted while VMs run): the serial socket at the path
// recorded at prepare, so QEMU's channel (with <reconnect>) finds it again,
// vsock by the recorded CID, the dev unix socket by name.
func (d *Daemon) restoreLive(ctx context.Context) {
	infos, err := d.mux.LiveVMs()
	if err != nil {
		d.log.Error("listing live VMs", "err", err)
		return
	}
	live := map[string]bool{}
	for _, v := range infos {
		live[hex.EncodeToString(v.ID[:])] = true
		e := d.newEntry(v.Name, v.ID, v.UUID)
		p := listenPlan{cid: v.CID}
		if st := d.states.load(v.ID); st != nil {
			if st.CID != 0 {
				p.cid = st.CID
			}
			if st.VTPM != "" {
				if path, err := d.checkVTPMPath(st.VTPM); err == nil {
					p.vtpm = path
				} else {
					d.log.Warn("recorded vTPM socket no longer allowed", "vm", v.Name, "err", err)
				}
			}
			if st.Serial != "" {
				if path, err := d.checkSerialPath(st.Serial); err == nil {
					p.serial, p.owner = path, st.Owner
				} else {
					d.log.Warn("recorded serial socket no longer allowed", "vm", v.Name, "err", err)
				}
			}
		} else {
			d.log.Warn("no listener state for a live VM: its virtio-serial socket reopens when libvirt reconnects (or at its next start)", "vm", v.Name)
		}
		if err := d.register(e); err != nil {
			return
		}
		if err := d.openListeners(e, p); err != nil {
			d.log.Error("live VM: listeners not reopened", "vm", v.Name, "err", err)
		}
		if p.vtpm != "" {
			if err := d.restoreVTPM(e, p.vtpm); err != nil {
				d.log.Error("live VM: vTPM not restored", "vm", v.Name, "err", err)
			}
		}
		d.saveState(e)
		d.log.Info("live VM re-adopted", "vm", v.Name, "listeners", len(e.listenerInfo()))
	}
	// Drop the state of instances that are no longer live.
	d.states.keepOnly(live)
}
