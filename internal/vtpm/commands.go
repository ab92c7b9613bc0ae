package vtpm

import (
	"context"
	"io"
	"slices"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// done checks that a handler consumed its parameters exactly.
func done(r *reader) uint32 {
	if !r.ok() {
		return rcInsufficient
	}
	if !r.empty() {
		return rcSize
	}
	return rcSuccess
}

// journalRC is the guest's answer when the journal refused an event.
func (v *VTPM) journalRC(err error) uint32 {
	v.log.Error("vtpm: PCR change not journaled; answering TPM_RC_RETRY", "err", err)
	return rcRetry
}

func (v *VTPM) startup(ctx context.Context, req *request) ([]byte, uint32) {
	su := req.params.u16()
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	switch su {
	case suClear:
	case suState:
		// No Shutdown(STATE) is ever saved, so there is nothing to resume
		// (as on a TPM whose saved state was lost): the firmware must
		// start with CLEAR.
		return nil, rcParam(rcValue, 1)
	default:
		return nil, rcParam(rcValue, 1)
	}
	if req.locality != 0 && req.locality != 3 {
		return nil, rcLocality
	}
	banks := v.st.Pending()
	if banks == nil {
		banks = v.st.Active()
	}
	e := vpcr.Event{Kind: vpcr.KindStartup, Command: ccStartup, Locality: req.locality, Banks: banks}
	if err := v.record(ctx, e); err != nil {
		return nil, v.journalRC(err)
	}
	v.started = v.now()
	v.resetHierarchies()
	return nil, rcSuccess
}

func (v *VTPM) shutdown(_ context.Context, req *request) ([]byte, uint32) {
	su := req.params.u16()
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	if su != suClear && su != suState {
		return nil, rcParam(rcValue, 1)
	}
	return nil, rcSuccess
}

func (v *VTPM) selfTest(_ context.Context, req *request) ([]byte, uint32) {
	full := req.params.u8()
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	if full > 1 {
		return nil, rcParam(rcValue, 1)
	}
	return nil, rcSuccess
}

func (v *VTPM) incrementalSelfTest(_ context.Context, req *request) ([]byte, uint32) {
	n := req.params.u32()
	if n > 64 {
		return nil, rcParam(rcSize, 1)
	}
	for range n {
		req.params.u16()
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	var w writer
	w.u32(0) // toDoList: everything is tested
	return w.b, rcSuccess
}

func (v *VTPM) getTestResult(_ context.Context, req *request) ([]byte, uint32) {
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	var w writer
	w.u16(0)         // outData
	w.u32(rcSuccess) // testResult
	return w.b, rcSuccess
}

func (v *VTPM) stirRandom(_ context.Context, req *request) ([]byte, uint32) {
	_, tooBig := req.params.tpm2b(128)
	if tooBig {
		return nil, rcParam(rcSize, 1)
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	// The random source is the host's; additional input is not needed.
	return nil, rcSuccess
}

func (v *VTPM) getRandom(_ context.Context, req *request) ([]byte, uint32) {
	n := int(req.params.u16())
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	n = min(n, maxDigest)
	buf := make([]byte, n)
	if _, err := io.ReadFull(v.rand, buf); err != nil {
		v.log.Error("vtpm: random source failed", "err", err)
		return nil, rcFailure
	}
	var w writer
	w.tpm2b(buf)
	return w.b, rcSuccess
}

func (v *VTPM) readClock(_ context.Context, req *request) ([]byte, uint32) {
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	now := v.now()
	var w writer
	w.u64(uint64(max(now.Sub(v.started), 0) / time.Millisecond)) // time
	w.u64(uint64(max(now.UnixMilli(), 0)))                       // clock: monotonic across bridge restarts
	w.u32(v.st.ResetCount())                                     // resetCount
	w.u32(0)                                                     // restartCount
	w.u8(1)                                                      // safe
	return w.b, rcSuccess
}

// readDigestValues reads a TPML_DIGEST_VALUES (parameter n).
func readDigestValues(r *reader, n int) ([]vpcr.Digest, uint32) {
	count := r.u32()
	if !r.ok() {
		return nil, rcInsufficient
	}
	if count > uint32(len(vpcr.Implemented())) {
		return nil, rcParam(rcSize, n)
	}
	var ds []vpcr.Digest
	for range count {
		a := vpcr.Alg(r.u16())
		if !r.ok() {
			return nil, rcInsufficient
		}
		if !a.Known() {
			return nil, rcParam(rcHash, n)
		}
		d := r.take(a.Size())
		if !r.ok() {
			return nil, rcInsufficient
		}
		ds = append(ds, vpcr.Digest{Alg: a, Value: slices.Clone(d)})
	}
	return ds, rcSuccess
}

// extend journals and applies the active-bank digests of ds into pcr.
func (v *VTPM) extend(ctx context.Context, req *request, pcr uint32, ds []vpcr.Digest, data []byte) uint32 {
	if pcr == rhNull {
		return rcSuccess
	}
	if !vpcr.CanExtend(int(pcr), req.locality) {
		return rcLocality
	}
	var keep []vpcr.Digest
	for _, d := range ds {
		if v.st.IsActive(d.Alg) {
			keep = append(keep, d)
		}
	}
	if len(keep) == 0 {
		return rcSuccess // nothing for an active bank: no PCR changes
	}
	e := vpcr.Event{Kind: vpcr.KindExtend, Command: req.cc, Locality: req.locality, PCR: int(pcr), Digests: keep, Data: data}
	if err := v.record(ctx, e); err != nil {
		return v.journalRC(err)
	}
	return rcSuccess
}

func (v *VTPM) pcrExtend(ctx context.Context, req *request) ([]byte, uint32) {
	ds, rc := readDigestValues(&req.params, 1)
	if rc != rcSuccess {
		return nil, rc
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	return nil, v.extend(ctx, req, req.handles[0], ds, nil)
}

func (v *VTPM) pcrEvent(ctx context.Context, req *request) ([]byte, uint32) {
	data, tooBig := req.params.tpm2b(1024)
	if tooBig {
		return nil, rcParam(rcSize, 1)
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	var ds []vpcr.Digest
	var w writer
	algs := vpcr.Implemented()
	w.u32(uint32(len(algs)))
	for _, a := range algs {
		h := a.Hash().New()
		h.Write(data)
		d := h.Sum(nil)
		ds = append(ds, vpcr.Digest{Alg: a, Value: d})
		w.u16(uint16(a))
		w.bytes(d)
	}
	if rc := v.extend(ctx, req, req.handles[0], ds, slices.Clone(data)); rc != rcSuccess {
		return nil, rc
	}
	return w.b, rcSuccess
}

func (v *VTPM) pcrReset(ctx context.Context, req *request) ([]byte, uint32) {
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	pcr := int(req.handles[0])
	if !vpcr.CanReset(pcr, req.locality) {
		return nil, rcLocality
	}
	if err := v.record(ctx, vpcr.Event{Kind: vpcr.KindReset, Command: ccPCRReset, Locality: req.locality, PCR: pcr}); err != nil {
		return nil, v.journalRC(err)
	}
	return nil, rcSuccess
}

// pcrSelection is one TPMS_PCR_SELECTION.
type pcrSelection struct {
	alg     vpcr.Alg
	select_ []byte
}

// pcrSelectMin and pcrSelectMax bound sizeofSelect (24 PCRs: 3 bytes), as
// the reference implementation (and swtpm) do.
const (
	pcrSelectMin = 3
	pcrSelectMax = 3
)

// readPCRSelections reads a TPML_PCR_SELECTION (parameter n).
func readPCRSelections(r *reader, n int) ([]pcrSelection, uint32) {
	count := r.u32()
	if !r.ok() {
		return nil, rcInsufficient
	}
	if count > uint32(len(vpcr.Implemented())) {
		return nil, rcParam(rcSize, n)
	}
	var sels []pcrSelection
	for range count {
		a := vpcr.Alg(r.u16())
		size := int(r.u8())
		if !r.ok() {
			return nil, rcInsufficient
		}
		if !a.Known() {
			return nil, rcParam(rcHash, n)
		}
		if size < pcrSelectMin || size > pcrSelectMax {
			return nil, rcParam(rcValue, n)
		}
		b := r.take(size)
		if !r.ok() {
			return nil, rcInsufficient
		}
		sels = append(sels, pcrSelection{alg: a, select_: slices.Clone(b)})
	}
	return sels, rcSuccess
}

func (v *VTPM) pcrRead(_ context.Context, req *request) ([]byte, uint32) {
	sels, rc := readPCRSelections(&req.params, 1)
	if rc != rcSuccess {
		return nil, rc
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	const maxDigests = 8 // TPML_DIGEST holds at most 8
	var digests [][]byte
	var w writer
	w.u32(v.st.UpdateCounter())
	w.u32(uint32(len(sels)))
	for _, s := range sels {
		out := make([]byte, len(s.select_))
		if v.st.IsActive(s.alg) {
			for i := 0; i < vpcr.NumPCRs && i < 8*len(s.select_); i++ {
				if s.select_[i/8]&(1<<(i%8)) == 0 || len(digests) == maxDigests {
					continue
				}
				out[i/8] |= 1 << (i % 8)
				digests = append(digests, v.st.Read(s.alg, i))
			}
		}
		w.u16(uint16(s.alg))
		w.u8(uint8(len(out)))
		w.bytes(out)
	}
	w.u32(uint32(len(digests)))
	for _, d := range digests {
		w.tpm2b(d)
	}
	return w.b, rcSuccess
}

func (v *VTPM) pcrAllocate(ctx context.Context, req *request) ([]byte, uint32) {
	sels, rc := readPCRSelections(&req.params, 1)
	if rc != rcSuccess {
		return nil, rc
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	next := v.st.Pending()
	if next == nil {
		next = v.st.Active()
	}
	ok := true
	for _, s := range sels {
		all, none := true, true
		for i := range vpcr.NumPCRs {
			if s.select_[i/8]&(1<<(i%8)) != 0 {
				none = false
			} else {
				all = false
			}
		}
		switch {
		case all:
			if !slices.Contains(v.st.Allocatable(), s.alg) {
				ok = false // the operator did not configure this bank
			} else if !slices.Contains(next, s.alg) {
				next = append(next, s.alg)
			}
		case none:
			next = slices.DeleteFunc(next, func(a vpcr.Alg) bool { return a == s.alg })
		default:
			// A bank with only some PCRs is legal on hardware; this vTPM
			// allocates whole banks only.
			return nil, rcParam(rcValue, 1)
		}
	}
	slices.Sort(next)
	if len(next) == 0 {
		ok = false
	}
	var w writer
	needed := 0
	for _, a := range next {
		needed += vpcr.NumPCRs * a.Size()
	}
	avail := 0
	for _, a := range v.st.Allocatable() {
		avail += vpcr.NumPCRs * a.Size()
	}
	if ok {
		e := vpcr.Event{Kind: vpcr.KindAllocate, Command: ccPCRAllocate, Locality: req.locality, Banks: next}
		if err := v.record(ctx, e); err != nil {
			return nil, v.journalRC(err)
		}
		w.u8(1)
	} else {
		w.u8(0)
	}
	w.u32(vpcr.NumPCRs)
	w.u32(uint32(needed))
	w.u32(uint32(avail))
	return w.b, rcSuccess
}

func (v *VTPM) hierarchyChangeAuth(_ context.Context, req *request) ([]byte, uint32) {
	newAuth, tooBig := req.params.tpm2b(maxDigest)
	if tooBig {
		return nil, rcParam(rcSize, 1)
	}
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	v.auth[req.handles[0]] = slices.Clone(trimZeros(newAuth))
	return nil, rcSuccess
}

func (v *VTPM) hierarchyControl(_ context.Context, req *request) ([]byte, uint32) {
	enable := req.params.u32()
	state := req.params.u8()
	if rc := done(&req.params); rc != rcSuccess {
		return nil, rc
	}
	var flag *bool
	switch enable {
	case rhOwner:
		flag = &v.shEnable
	case rhEndorsement:
		flag = &v.ehEnable
	case rhPlatform:
		flag = &v.phEnable
	case rhPlatformNV:
		flag = &v.phEnableNV
	default:
		return nil, rcParam(rcValue, 1)
	}
	if state > 1 {
		return nil, rcParam(rcValue, 2)
	}
	if req.handles[0] == rhOwner && (state == 1 || enable == rhPlatform || enable == rhPlatformNV) {
		// The owner may only disable its own or the endorsement hierarchy.
		return nil, rcHandleN(rcAuthType, 1)
	}
	*flag = state == 1
	return nil, rcSuccess
}
