package vtpm

import (
	"context"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Capabilities (TPM_CAP).
const (
	capAlgs          uint32 = 0
	capHandles       uint32 = 1
	capCommands      uint32 = 2
	capPPCommands    uint32 = 3
	capAuditCommands uint32 = 4
	capPCRs          uint32 = 5
	capTPMProperties uint32 = 6
	capPCRProperties uint32 = 7
	capECCCurves     uint32 = 8
	capAuthPolicies  uint32 = 9
	capACT           uint32 = 10
)

// maxCapData bounds a GetCapability answer's list (MAX_CAP_BUFFER 1024
// minus the headers), so every response fits the smallest buffer.
const maxCapData = 1024 - 8

// vendor strings: "tpmmux vTPM".
const (
	manufacturer = 0x544D5558 // "TMUX"
	vendor1      = 0x74706D6D // "tpmm"
	vendor2      = 0x75782076 // "ux v"
	vendor3      = 0x54504D00 // "TPM\0"
)

func (v *VTPM) getCapability(_ context.Context, req *request) ([]byte, uint32) {
	capability, property, count := req.params.u32(), req.params.u32(), req.params.u32()
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	var w writer
	w.u8(0) // moreData, patched below
	w.u32(capability)
	more := false
	switch capability {
	case capAlgs:
		var items [][2]uint32
		for _, a := range vpcr.Implemented() {
			if uint32(a) >= property {
				items = append(items, [2]uint32{uint32(a), 0x0004}) // TPMA_ALGORITHM: hash
			}
		}
		items, more = limit(items, count, maxCapData/6)
		w.u32(uint32(len(items)))
		for _, it := range items {
			w.u16(uint16(it[0]))
			w.u32(it[1])
		}
	case capHandles:
		var hs []uint32
		switch property >> 24 {
		case 0x00: // PCR handles
			for i := uint32(0); i < vpcr.NumPCRs; i++ {
				if i >= property {
					hs = append(hs, i)
				}
			}
		case 0x40: // permanent handles
			for _, h := range []uint32{rhOwner, rhNull, rsPW, rhLockout, rhEndorsement, rhPlatform, rhPlatformNV} {
				if h >= property {
					hs = append(hs, h)
				}
			}
		}
		hs, more = limit(hs, count, maxCapData/4)
		w.u32(uint32(len(hs)))
		for _, h := range hs {
			w.u32(h)
		}
	case capCommands:
		var attrs []uint32
		for _, c := range commandTable {
			if c.cc >= property {
				attrs = append(attrs, commandAttributes(c))
			}
		}
		attrs, more = limit(attrs, count, maxCapData/4)
		w.u32(uint32(len(attrs)))
		for _, a := range attrs {
			w.u32(a)
		}
	case capPPCommands, capAuditCommands, capECCCurves, capAuthPolicies, capACT:
		w.u32(0) // empty list
	case capPCRs:
		banks := v.st.Allocatable()
		w.u32(uint32(len(banks)))
		for _, a := range banks {
			w.u16(uint16(a))
			w.u8(pcrSelectMin)
			if v.st.IsActive(a) {
				w.bytes([]byte{0xFF, 0xFF, 0xFF})
			} else {
				w.bytes([]byte{0, 0, 0})
			}
		}
	case capTPMProperties:
		var props [][2]uint32
		for _, p := range v.properties() {
			if p[0] >= property {
				props = append(props, p)
			}
		}
		props, more = limit(props, count, maxCapData/8)
		w.u32(uint32(len(props)))
		for _, p := range props {
			w.u32(p[0])
			w.u32(p[1])
		}
	case capPCRProperties:
		var tags []uint32
		for t := uint32(0); t <= 0x14; t++ {
			if t >= property && pcrPropertyMask(t) != nil {
				tags = append(tags, t)
			}
		}
		tags, more = limit(tags, count, maxCapData/8)
		w.u32(uint32(len(tags)))
		for _, t := range tags {
			w.u32(t)
			w.u8(pcrSelectMin)
			w.bytes(pcrPropertyMask(t))
		}
	default:
		return nil, rcParam(rcValue, 1)
	}
	if more {
		w.b[0] = 1
	}
	return w.b, rcSuccess
}

// limit cuts items to at most count (and at most max) and says whether any
// were left out.
func limit[T any](items []T, count uint32, max int) ([]T, bool) {
	n := min(uint64(count), uint64(max))
	if uint64(len(items)) <= n {
		return items, false
	}
	return items[:n], true
}

// commandAttributes is the TPMA_CC of an implemented command.
func commandAttributes(c command) uint32 {
	a := c.cc & 0xFFFF
	if c.nv {
		a |= 1 << 22
	}
	a |= uint32(c.handles) << 25
	return a
}

// pcrPropertyMask returns the PCRs (3-byte select) that have PCR property
// tag t (TPM_PT_PCR), or nil for a tag that is not reported.
func pcrPropertyMask(t uint32) []byte {
	var m [3]byte
	set := func(i int) { m[i/8] |= 1 << (i % 8) }
	switch {
	case t == 0: // TPM_PT_PCR_SAVE
		for i := range vpcr.NumPCRs {
			if vpcr.PCRAttributes(i).StateSave {
				set(i)
			}
		}
	case t >= 1 && t <= 10: // EXTEND_L0, RESET_L0, ..., RESET_L4
		loc := uint8((t - 1) / 2)
		for i := range vpcr.NumPCRs {
			if (t%2 == 1 && vpcr.CanExtend(i, loc)) || (t%2 == 0 && vpcr.CanReset(i, loc)) {
				set(i)
			}
		}
	case t == 0x12: // TPM_PT_PCR_DRTM_RESET
		for i := 17; i <= 22; i++ {
			set(i)
		}
	default:
		return nil
	}
	return m[:]
}

// properties is the TPM_PT table, sorted by property.
func (v *VTPM) properties() [][2]uint32 {
	var permanent uint32
	if len(v.auth[rhOwner]) > 0 {
		permanent |= 1 << 0
	}
	if len(v.auth[rhEndorsement]) > 0 {
		permanent |= 1 << 1
	}
	if len(v.auth[rhLockout]) > 0 {
		permanent |= 1 << 2
	}
	var startupClear uint32
	for i, b := range []bool{v.phEnable, v.shEnable, v.ehEnable, v.phEnableNV} {
		if b {
			startupClear |= 1 << i
		}
	}
	n := uint32(len(commandTable))
	return [][2]uint32{
		{0x100, 0x322E3000}, // FAMILY_INDICATOR "2.0"
		{0x101, 0},          // LEVEL
		{0x102, 159},        // REVISION 1.59
		{0x103, 1},          // DAY_OF_YEAR
		{0x104, 2026},       // YEAR
		{0x105, manufacturer},
		{0x106, vendor1},
		{0x107, vendor2},
		{0x108, vendor3},
		{0x109, 0},
		{0x10A, 0},          // VENDOR_TPM_TYPE
		{0x10B, 0x00010000}, // FIRMWARE_VERSION_1
		{0x10C, 0},
		{0x10D, 1024}, // INPUT_BUFFER
		{0x10E, 0},    // HR_TRANSIENT_MIN: no objects
		{0x10F, 0},    // HR_PERSISTENT_MIN
		{0x110, 0},    // HR_LOADED_MIN
		{0x111, 0},    // ACTIVE_SESSIONS_MAX: no sessions
		{0x112, vpcr.NumPCRs},
		{0x113, pcrSelectMin},
		{0x114, 0},      // CONTEXT_GAP_MAX
		{0x116, 0},      // NV_COUNTERS_MAX
		{0x117, 0},      // NV_INDEX_MAX
		{0x118, 0},      // MEMORY
		{0x119, 4096},   // CLOCK_UPDATE
		{0x11A, 0x000B}, // CONTEXT_HASH sha256
		{0x11B, 0x0010}, // CONTEXT_SYM: TPM_ALG_NULL
		{0x11C, 0},      // CONTEXT_SYM_SIZE
		{0x11D, 0},      // ORDERLY_COUNT
		{0x11E, v.bufSize},
		{0x11F, v.bufSize},
		{0x120, maxDigest},
		{0x121, 0}, // MAX_OBJECT_CONTEXT
		{0x122, 0}, // MAX_SESSION_CONTEXT
		{0x123, 1}, // PS_FAMILY_INDICATOR: PC client
		{0x124, 0},
		{0x125, 0x100},
		{0x126, 0},
		{0x127, 0},
		{0x128, 0}, // SPLIT_MAX
		{0x129, n}, // TOTAL_COMMANDS
		{0x12A, n}, // LIBRARY_COMMANDS
		{0x12B, 0}, // VENDOR_COMMANDS
		{0x12C, 0}, // NV_BUFFER_MAX
		{0x12D, 0}, // MODES
		{0x12E, 1024},
		{0x200, permanent},
		{0x201, startupClear},
		{0x202, 0}, {0x203, 0}, {0x204, 0}, {0x205, 0}, {0x206, 0}, {0x207, 0}, {0x208, 0}, {0x209, 0},
		{0x20A, 0}, {0x20B, 0}, {0x20C, 0}, {0x20D, 0},
		{0x20E, 0},    // LOCKOUT_COUNTER
		{0x20F, 3},    // MAX_AUTH_FAIL
		{0x210, 1000}, // LOCKOUT_INTERVAL
		{0x211, 1000}, // LOCKOUT_RECOVERY
		{0x212, 0}, {0x213, 0}, {0x214, 0},
	}
}
