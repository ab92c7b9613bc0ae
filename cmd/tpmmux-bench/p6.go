package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/tpmmux/tpmmux/internal/mux"
)

// scaleFacts is the child's report of the bridge's memory at scale.
type scaleFacts struct {
	VMs       int     `json:"vms"`
	Records   int     `json:"records"`
	Build     float64 `json:"build_ns"`
	Built     memInfo `json:"built"`
	GCed      memInfo `json:"gced"`
	HeapInuse uint64  `json:"heap_inuse"`
	StoreSize int64   `json:"store_size"`
}

// childScale builds a bridge with vms VMs (each with its listener) and a
// log of records measurement records, with fsync, and reports its RSS
// after the build and after a full GC.
func (e *env) childScale(ctx context.Context, vms, records int) (*scaleFacts, error) {
	p, err := newPool(1024)
	if err != nil {
		return nil, err
	}
	rig, err := e.openRig(ctx, kindSim)
	if err != nil {
		return nil, err
	}
	defer rig.close()
	t := time.Now()
	if err := rig.prepareAll(ctx, vms, false); err != nil {
		return nil, err
	}
	m := rig.d.Mux()
	lb := &logBuilder{m: m, p: p}
	for _, v := range liveVMs(m) {
		lb.ids = append(lb.ids, v.ID)
	}
	lb.counts = make([]int, len(lb.ids))
	need := make([]int, len(lb.ids))
	for i := range need {
		need[i] = records / len(need)
	}
	for i := 0; i < records%len(need); i++ {
		need[i]++
	}
	if err := lb.add(ctx, need); err != nil {
		return nil, err
	}
	f := &scaleFacts{VMs: vms, Records: lb.total, Build: float64(time.Since(t))}
	if f.Built, err = readMem(0); err != nil {
		return nil, err
	}
	settle()
	if f.GCed, err = readMem(0); err != nil {
		return nil, err
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	f.HeapInuse = ms.HeapInuse
	if fi, err := os.Stat(rig.storePath()); err == nil {
		f.StoreSize = fi.Size()
	}
	return f, nil
}

func liveVMs(m *mux.Mux) []mux.VMInfo {
	vms, _ := m.VMs()
	var live []mux.VMInfo
	for _, v := range vms {
		if !v.Ended {
			live = append(live, v)
		}
	}
	return live
}

// benchScale runs P6.
func (e *env) benchScale(ctx context.Context) error {
	vms, records := 1000, 1_000_000
	if e.quick {
		records = 100_000
	}
	var f scaleFacts
	if err := e.child(ctx, "scale", vms, records, &f); err != nil {
		return err
	}
	e.logf("  P6 %d VMs, %d records built in %s: RSS %s (anon %s, file %s); after GC %s (anon %s, file %s); Go heap in use %s; store %s",
		f.VMs, f.Records, fmtDur(time.Duration(f.Build)), fmtBytes(float64(f.Built.RSS)), fmtBytes(float64(f.Built.Anon)), fmtBytes(float64(f.Built.File)),
		fmtBytes(float64(f.GCed.RSS)), fmtBytes(float64(f.GCed.Anon)), fmtBytes(float64(f.GCed.File)), fmtBytes(float64(f.HeapInuse)), fmtBytes(float64(f.StoreSize)))
	if e.swtpm == nil {
		if e.swtpm, _ = e.swtpmProvision(ctx, 3); e.swtpm == nil {
			e.swtpm = &swtpmFacts{skipMsg: "swtpm not measured"}
		}
	}
	label := fmt.Sprintf("bridge RSS, %d VMs + %s records", f.VMs, sizeLabel(f.Records))
	for _, m := range []struct {
		when string
		mi   memInfo
	}{{"after build", f.Built}, {"after full GC", f.GCed}} {
		r := row{ID: "P6", Case: label + ", " + m.when, TPM: "sim", Value: fmtBytes(float64(m.mi.RSS)), V: float64(m.mi.RSS),
			Target: "≤ 200 MB", Met: yesNo(m.mi.RSS <= 200e6),
			Notes: fmt.Sprintf("anon %s, file-backed %s (bbolt's mmap of a %s store)", fmtBytes(float64(m.mi.Anon)), fmtBytes(float64(m.mi.File)), fmtBytes(float64(f.StoreSize)))}
		if e.swtpm.skipMsg != "" || len(e.swtpm.rss) == 0 {
			r.Baseline, r.Ratio = "-", "-"
		} else {
			b := median(e.swtpm.rss) * float64(f.VMs)
			r.B, r.R = b, b/float64(m.mi.RSS)
			r.Baseline = fmtBytes(b) + fmt.Sprintf(" (%d swtpm)", f.VMs)
			r.Ratio = fmtRatio(b / float64(m.mi.RSS))
		}
		e.add(r)
	}
	return nil
}
