package tpm

import (
	"context"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// ClockInfo is the TPM's TPMS_CLOCK_INFO: the counters that tie a quote to
// one power cycle of the TPM. ResetCount increments on every TPM Reset (a
// host reboot) and only TPM2_Clear sets it back (to zero); RestartCount
// increments on every TPM Restart or Resume (Shutdown(STATE) then Startup,
// e.g. resume from suspend or hibernation) and is zeroed by a Reset. Clock
// is milliseconds the TPM has been powered, zeroed only by TPM2_Clear (and
// moved forward by TPM2_ClockSet).
type ClockInfo struct {
	Clock        uint64
	ResetCount   uint32
	RestartCount uint32
	Safe         bool
	// ClearDisabled is TPM_PT_PERMANENT's disableClear: TPM2_Clear, the
	// one command that sets resetCount and the clock back, is refused
	// until the platform (firmware) authority allows it again.
	ClearDisabled bool
}

// ptPermanentDisableClear is disableClear's bit in TPM_PT_PERMANENT.
const ptPermanentDisableClear = 1 << 8

// ClockInfo reads the TPM's clock and counters (TPM2_ReadClock) and
// whether TPM2_Clear is disabled (TPM_PT_PERMANENT).
func (d *dev) ClockInfo(ctx context.Context) (ClockInfo, error) {
	if err := d.lock("read clock"); err != nil {
		return ClockInfo{}, err
	}
	defer d.mu.Unlock()
	rsp, err := tpm2.ReadClock{}.Execute(d.tr(ctx))
	if err != nil {
		return ClockInfo{}, fmt.Errorf("tpm %s: read clock: %w", d.spec, err)
	}
	perm, err := d.property(ctx, tpm2.TPMPTPermanent)
	if err != nil {
		return ClockInfo{}, fmt.Errorf("tpm %s: read TPM_PT_PERMANENT: %w", d.spec, err)
	}
	ci := rsp.CurrentTime.ClockInfo
	return ClockInfo{Clock: ci.Clock, ResetCount: ci.ResetCount, RestartCount: ci.RestartCount, Safe: ci.Safe,
		ClearDisabled: perm&ptPermanentDisableClear != 0}, nil
}

// ResettablePCRs returns the PCRs this TPM lets anyone reset at locality 0
// (TPM_PT_PCR_RESET_L0 of TPM_CAP_PCR_PROPERTIES). On a PC-client TPM these
// are 16 and 23; a PCR in this list can be reset by whoever reaches the TPM
// without a reboot, so history anchored in it can be rolled back.
func (d *dev) ResettablePCRs(ctx context.Context) ([]int, error) {
	if err := d.lock("read PCR properties"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapPCRProperties,
		Property:      uint32(tpm2.TPMPTPCRResetL0),
		PropertyCount: 1,
	}.Execute(d.tr(ctx))
	if err != nil {
		return nil, fmt.Errorf("tpm %s: read TPM_PT_PCR_RESET_L0: %w", d.spec, err)
	}
	props, err := rsp.CapabilityData.Data.PCRProperties()
	if err != nil {
		return nil, fmt.Errorf("tpm %s: read TPM_PT_PCR_RESET_L0: %w", d.spec, err)
	}
	for _, p := range props.PCRProperty {
		if p.Tag != tpm2.TPMPTPCRResetL0 {
			continue
		}
		var out []int
		for i, b := range p.PCRSelect {
			for bit := 0; bit < 8; bit++ {
				if b&(1<<bit) != 0 {
					out = append(out, i*8+bit)
				}
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("tpm %s: TPM did not report TPM_PT_PCR_RESET_L0", d.spec)
}
