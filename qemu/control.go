package qemu

import (
	"context"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/record"
)

// ActionPause is the action name of the record the bridge appends after
// pausing a VM for policy enforcement.
const ActionPause = "pause"

// StatusInfo is QEMU's run state (query-status).
type StatusInfo struct {
	Running bool   `json:"running"`
	Status  string `json:"status"` // e.g. "running", "paused", "prelaunch", "shutdown", "guest-panicked"
}

// Status returns the VM's run state.
func Status(ctx context.Context, mon Monitor) (StatusInfo, error) {
	var st StatusInfo
	if err := Execute(ctx, mon, "query-status", nil, &st); err != nil {
		return StatusInfo{}, fmt.Errorf("status: %w", err)
	}
	if st.Status == "" {
		return StatusInfo{}, fmt.Errorf("status: query-status reply has no status")
	}
	return st, nil
}

// Pause stops the VM's vCPUs (QMP "stop") and checks that it is no longer
// running. Pausing a paused VM is not an error. Through libvirt, the domain
// then shows as paused (reason "unknown"); anyone allowed to resume it
// (virsh resume, QMP "cont") still can: the pause is an enforcement step,
// the action record is the durable consequence.
func Pause(ctx context.Context, mon Monitor) error {
	if err := Execute(ctx, mon, "stop", nil, nil); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	st, err := Status(ctx, mon)
	if err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	if st.Running {
		return fmt.Errorf("pause: VM still running after stop (status %q)", st.Status)
	}
	return nil
}

// PauseRecord is the action record for a pause that took place at now;
// detail says why (e.g. the policy rule). Append it after Pause succeeded,
// so the log never claims a pause that did not happen.
func PauseRecord(now time.Time, detail string) *record.Record {
	return &record.Record{Kind: record.KindAction, Time: now.UnixNano(), Action: &record.Action{Action: ActionPause, Detail: detail}}
}
