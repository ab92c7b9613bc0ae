package mux

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"sort"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
)

// Launch describes a VM instance at domain start: what the genesis record
// holds besides the identity the mux draws.
type Launch struct {
	UUID      [16]byte
	Name      string
	CID       uint32
	DomainXML [32]byte      // SHA-256 of the domain XML
	Files     []record.File // launch files the XML names, with digests
	// VTPMBanks are the PCR banks (TPM_ALG_IDs) of the VM's bridge-served
	// vTPM; empty when it has none.
	VTPMBanks []uint16
}

// NewVM gives a starting VM a fresh concealment identity (new instance and
// key) and commits its genesis record. It returns once the genesis record
// is durable and extended; with Cover on, once it is durable: the next
// slot batches and extends it (a batch made sooner takes it too), so the
// VM starts at once and its start shows nothing off the slot schedule.
// Until then, readers of the VM's state wait for that slot.
func (m *Mux) NewVM(ctx context.Context, l Launch) (*conceal.Identity, error) {
	ident, err := conceal.NewIdentity(l.UUID)
	if err != nil {
		return nil, err
	}
	id := ident.ID()
	now := m.cfg.Now()
	gen := &record.Record{Kind: record.KindGenesis, Time: now.UnixNano(), Genesis: &record.Genesis{
		UUID: l.UUID, Name: l.Name, Instance: ident.Instance, CID: l.CID,
		DomainXML: l.DomainXML, Files: l.Files, Host: m.cfg.Host, VTPMBanks: l.VTPMBanks,
	}}
	m.commitMu.Lock()
	epoch := m.epoch
	gen.Genesis.Epoch = record.EpochHash(m.epochRec)
	m.commitMu.Unlock()
	raw, err := gen.Marshal()
	if err != nil {
		return nil, fmt.Errorf("new vm %s: %w", l.Name, err)
	}
	vs := &vmState{
		vm: logstore.VM{ID: id, UUID: l.UUID, Instance: ident.Instance, Name: l.Name, CID: l.CID,
			Epoch: epoch, Created: now.UnixNano()},
		id:   id,
		keys: ident.Keys(),
	}
	if err := m.openVM(ctx, vs, ident.Key, raw, record.KindGenesis, "instance collision"); err != nil {
		return nil, fmt.Errorf("new vm %s: %w", l.Name, err)
	}
	return ident, nil
}

// openVM makes vs live on this host and commits the record that opens its
// stay (a genesis, or a migrated-in record): its key wrapped for the
// store, the record durable and extended (a genesis with Cover on: durable,
// and batched at the next slot). If the record fails, a VM with
// no record yet is forgotten again; dup is the error when vs is live
// already.
func (m *Mux) openVM(ctx context.Context, vs *vmState, key conceal.Key, raw []byte, kind record.Kind, dup string) error {
	if err := m.wrapKey(&vs.vm, key); err != nil {
		return err
	}
	m.mu.Lock()
	if _, live := m.vms[vs.id]; live {
		m.mu.Unlock()
		return errors.New(dup)
	}
	m.vms[vs.id] = vs
	m.mu.Unlock()
	it := &item{r: raw, h: record.Hash(raw), kind: kind}
	held := kind == record.KindGenesis && m.cfg.Cover.on()
	if held {
		// Durable is enough for the VM to start; the record is batched
		// at the slot, as if it had waited for it (pendingHeld).
		it.wait = waitDurable
	}
	t, err := m.enqueue(vs.id, []*item{it})
	if err == nil {
		if held {
			var durable bool
			if durable, err = t.WaitDurable(ctx); durable {
				err = nil
			} else if err == nil {
				err = errors.New("not recorded")
			}
		} else {
			_, err = t.Wait(ctx)
		}
	}
	if err != nil {
		m.mu.Lock()
		if vs.vm.NextSeq == vs.vm.FirstSeq {
			delete(m.vms, vs.id)
		}
		m.mu.Unlock()
		return fmt.Errorf("%s record: %w", kind, err)
	}
	return nil
}

// Teardown commits VM id's teardown record with reason and then keeps a
// post-mortem quote over it, so the VM's whole history stays verifiable
// after the PCR is reset. Tearing down an ended VM is not an error: libvirt
// fires both stopped and release hooks.
func (m *Mux) Teardown(ctx context.Context, id conceal.Digest, reason string) (Ack, error) {
	r := &record.Record{Kind: record.KindTeardown, Time: m.cfg.Now().UnixNano(), Teardown: &record.Teardown{Reason: reason}}
	ack, err := m.Append(ctx, id, r)
	if errors.Is(err, ErrEnded) || errors.Is(err, ErrUnknownVM) {
		if ended, _ := m.isEnded(id); ended {
			return Ack{}, nil
		}
	}
	if err != nil {
		return Ack{}, fmt.Errorf("teardown: %w", err)
	}
	if err := m.takeFinal(ctx, id); err != nil {
		return ack, fmt.Errorf("teardown: %w", err)
	}
	return ack, nil
}

func (m *Mux) isEnded(id conceal.Digest) (bool, error) {
	return viewVM(m, id, func(vm *logstore.VM) (bool, error) { return vm.Ended, nil })
}

// viewVM reads VM instance id's stored state in one read transaction and
// returns what f makes of it. A live VM whose genesis is durable but not
// in bbolt yet (NewVM returns at durable with Cover on: its batch is being
// applied, or it is held for the slot) it reads once bbolt holds it.
func viewVM[T any](m *Mux, id conceal.Digest, f func(vm *logstore.VM) (T, error)) (T, error) {
	var out T
	read := func() error {
		return m.store.View(func(sn *logstore.Snapshot) error {
			vm, err := sn.VM(id)
			if err != nil {
				return err
			}
			out, err = f(vm)
			return err
		})
	}
	err := read()
	if errors.Is(err, logstore.ErrNotFound) {
		m.syncVM(id)
		err = read()
	}
	return out, err
}

// takeFinal quotes the log with extraData = H("tpmmux/v1/final" || id ||
// H(R_last)), R_last the teardown or migrated-out record that ended the
// segment, and keeps the quote.
func (m *Mux) takeFinal(ctx context.Context, id conceal.Digest) error {
	var last []byte
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		if vm.NextSeq == vm.FirstSeq {
			return fmt.Errorf("vm %s has no records", vm.Name)
		}
		return sn.Records(id, vm.NextSeq-1, func(r *logstore.Record) error {
			last = r.R
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("final quote: %w", err)
	}
	rec, err := record.Unmarshal(last)
	if err != nil || !rec.Kind.Terminal() {
		return fmt.Errorf("final quote: last record of vm %x is not a teardown or migrated-out (%v)", id[:8], err)
	}
	extra := conceal.FinalData(id, record.Hash(last))
	m.commitMu.Lock()
	q, vals, err := m.quoteLocked(ctx, extra[:], nil)
	epoch, batch := m.epoch, m.nextBatch-1
	m.commitMu.Unlock()
	if err != nil {
		return fmt.Errorf("final quote: %w", err)
	}
	fq := &logstore.FinalQuote{Epoch: epoch, Batch: batch, Attest: q.Attest, Signature: q.Signature}
	for i, p := range m.sel {
		fq.PCRs = append(fq.PCRs, uint32(p))
		fq.Values = append(fq.Values, vals[i][:])
	}
	return m.store.PutFinal(id, fq)
}

// VMInfo describes one VM instance for listings.
type VMInfo struct {
	ID       conceal.Digest
	UUID     [16]byte
	Instance [16]byte
	Name     string
	CID      uint32
	Epoch    uint64
	Records  uint64
	Ended    bool
	EndedBy  string
	// Live says the instance is the live one of its name (see Lookup):
	// it has an identity in the current epoch and no durable teardown.
	Live bool
}

func infoOf(vm *logstore.VM) VMInfo {
	return VMInfo{ID: vm.ID, UUID: vm.UUID, Instance: vm.Instance, Name: vm.Name, CID: vm.CID,
		Epoch: vm.Epoch, Records: vm.NextSeq, Ended: vm.Ended, EndedBy: vm.EndedBy}
}

// VMs lists every VM instance the store knows, live ones first, by name.
// A VM just started, whose genesis is durable but not in bbolt yet (held
// for the slot with Cover on), is listed once bbolt holds it: the listing
// waits for that, at most one slot.
func (m *Mux) VMs() ([]VMInfo, error) {
	var out []VMInfo
	read := func() error {
		out = out[:0]
		return m.store.View(func(sn *logstore.Snapshot) error {
			return sn.VMs(func(vm *logstore.VM) error {
				out = append(out, infoOf(vm))
				return nil
			})
		})
	}
	err := read()
	if err == nil {
		if missing := m.liveMissing(out); len(missing) > 0 {
			for _, id := range missing {
				m.syncVM(id)
			}
			err = read()
		}
	}
	m.markLive(out)
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Ended != out[j].Ended {
			return !out[i].Ended
		}
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return out[i].Epoch > out[j].Epoch
	})
	return out, err
}

// liveMissing returns the live VMs that listing infos (read from bbolt)
// does not hold.
func (m *Mux) liveMissing(infos []VMInfo) []conceal.Digest {
	have := make(map[conceal.Digest]bool, len(infos))
	for _, in := range infos {
		have[in.ID] = true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []conceal.Digest
	for id := range m.vms {
		if !have[id] {
			out = append(out, id)
		}
	}
	return out
}

// LiveVMs lists the live VM instances, one per name, by name.
func (m *Mux) LiveVMs() ([]VMInfo, error) {
	all, err := m.VMs()
	live := all[:0]
	for _, v := range all {
		if v.Live {
			live = append(live, v)
		}
	}
	return live, err
}

// Info returns what VMs reports about VM instance id alone, with one store
// lookup where VMs reads and sorts every VM the store knows.
func (m *Mux) Info(id conceal.Digest) (VMInfo, error) {
	info, err := viewVM(m, id, func(vm *logstore.VM) (VMInfo, error) { return infoOf(vm), nil })
	if err != nil {
		return info, err
	}
	infos := []VMInfo{info}
	m.markLive(infos)
	return infos[0], nil
}

// markLive sets Live on each of infos, read from the store before, by the
// one rule of what is live: the instance Lookup returns for its name, and
// no durable teardown. An instance leaves m.vms only after its teardown is
// durable, and enters it before its genesis is, so a listing read from the
// store and then checked here never calls a torn-down instance live.
func (m *Mux) markLive(infos []VMInfo) {
	m.mu.Lock()
	live := m.liveLocked()
	m.mu.Unlock()
	for i := range infos {
		infos[i].Live = !infos[i].Ended && live[infos[i].Name] == infos[i].ID
	}
}

// liveLocked maps each name to its live instance: of the current epoch's
// instances not torn down (m.vms), the newest of that name (a new instance
// can be given its identity before an older one's teardown is durable).
// m.vms only ever holds instances of the current epoch (NewVM, loadVMs),
// so "live" needs no separate epoch check. The caller holds m.mu.
func (m *Mux) liveLocked() map[string]conceal.Digest {
	out := make(map[string]conceal.Digest, len(m.vms))
	for id, vs := range m.vms {
		if cur, ok := out[vs.vm.Name]; ok && !newer(vs, m.vms[cur]) {
			continue
		}
		out[vs.vm.Name] = id
	}
	return out
}

// newer orders two instances of one name by creation, then by id so the
// choice never depends on map order.
func newer(a, b *vmState) bool {
	if a.vm.Created != b.vm.Created {
		return a.vm.Created > b.vm.Created
	}
	return bytes.Compare(a.id[:], b.id[:]) > 0
}

// Lookup returns the live VM instance named name: the one definition of
// "live" (VMInfo.Live, LiveVMs and Info agree with it).
func (m *Mux) Lookup(name string) (conceal.Digest, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var found *vmState
	for _, vs := range m.vms {
		if vs.vm.Name == name && (found == nil || newer(vs, found)) {
			found = vs
		}
	}
	if found == nil {
		return conceal.Digest{}, false
	}
	return found.id, true
}

// Identity returns the concealment identity of VM instance id, secret
// included: only the VM's own channel and its owner may be given it.
func (m *Mux) Identity(id conceal.Digest) (*conceal.Identity, error) {
	return viewVM(m, id, func(vm *logstore.VM) (*conceal.Identity, error) {
		k, err := m.unwrapKey(vm)
		if err != nil {
			return nil, err
		}
		return &conceal.Identity{UUID: vm.UUID, Instance: vm.Instance, Key: k}, nil
	})
}

// NextSeq returns how many of VM id's records are durable: for a live VM,
// staged in the write-ahead log (some may not be batched yet).
func (m *Mux) NextSeq(id conceal.Digest) (uint64, error) {
	m.mu.Lock()
	vs, ok := m.vms[id]
	m.mu.Unlock()
	if ok {
		m.commitMu.Lock()
		n := vs.vm.NextSeq
		m.commitMu.Unlock()
		return n, nil
	}
	return viewVM(m, id, func(vm *logstore.VM) (uint64, error) { return vm.NextSeq, nil })
}

// Status is a point-in-time summary of the multiplexer.
type Status struct {
	Epoch    uint64
	Batches  uint64
	Entries  uint64
	PCR      int
	PCRValue conceal.Digest
	LiveVMs  int
	Queued   int
	Fault    string
	Stats    Stats
}

// Status reports the multiplexer's state.
func (m *Mux) Status() Status {
	m.commitMu.Lock()
	m.smu.Lock()
	stats := m.stats
	m.smu.Unlock()
	st := Status{Epoch: m.epoch, Batches: m.nextBatch, Entries: m.nextG, PCR: m.cfg.PCR, PCRValue: m.pcrValue, Stats: stats}
	m.commitMu.Unlock()
	m.mu.Lock()
	st.LiveVMs, st.Queued = len(m.vms), len(m.queue)
	if m.fault != nil {
		st.Fault = m.fault.Error()
	}
	m.mu.Unlock()
	return st
}

// AK returns the public key of the TPM's attestation key.
func (m *Mux) AK() *ecdsa.PublicKey { return m.tpm.AK() }
