package verify_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// world is one honest bridge run on the simulator shared by this package's
// tests: VMs A and B stream interleaved measurements into small batches,
// then A is torn down.
type world struct {
	tpm    tpm.TPM
	m      *mux.Mux
	a, b   *conceal.Identity
	nonce  []byte
	evA    *evidence.Evidence // A's fresh evidence before teardown
	evB    *evidence.Evidence
	evAEnd *evidence.Evidence // A's fresh evidence after teardown
	nonceE []byte
	finalA *evidence.Evidence
	bRecs  [][]byte // B's canonical records
	bPaths []string
}

var (
	worldOnce sync.Once
	theWorld  *world
	worldErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if theWorld != nil {
		theWorld.m.Close()
		theWorld.tpm.Close()
	}
	os.Exit(code)
}

func getWorld(t *testing.T) *world {
	t.Helper()
	worldOnce.Do(func() { theWorld, worldErr = buildWorld() })
	if worldErr != nil {
		t.Fatalf("build honest bridge run: %v", worldErr)
	}
	return theWorld
}

func measurement(vm string, i int) *record.Record {
	path := fmt.Sprintf("/opt/%s/bin/tool-%03d", vm, i)
	d := sha256.Sum256([]byte(path))
	e := ima.NewIMANG(10, "sha256", d[:], path)
	return &record.Record{Kind: record.KindMeasurement, Time: int64(i), Measurement: &record.Measurement{
		PCR: 10, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, TemplateData: e.TemplateData, LogIndex: uint64(i),
	}}
}

func buildWorld() (*world, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t, err := tpm.Open(ctx, "sim")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "tpmmux-verify-test-")
	if err != nil {
		return nil, err
	}
	st, err := logstore.Open(filepath.Join(dir, "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		return nil, err
	}
	m, err := mux.Open(ctx, t, st, mux.Config{MaxBatch: 3, Host: "test-host", Version: "test"})
	if err != nil {
		return nil, err
	}
	w := &world{tpm: t, m: m}
	w.a, err = m.NewVM(ctx, mux.Launch{UUID: [16]byte{0xaa}, Name: "vm-a", CID: 3})
	if err != nil {
		return nil, err
	}
	w.b, err = m.NewVM(ctx, mux.Launch{UUID: [16]byte{0xbb}, Name: "vm-b", CID: 4})
	if err != nil {
		return nil, err
	}
	// Interleave A's and B's records so their leaves share batches.
	var tickets []*mux.Ticket
	for i := 1; i <= 12; i++ {
		for _, v := range []struct {
			name string
			id   *conceal.Identity
		}{{"vm-a", w.a}, {"vm-b", w.b}} {
			r := measurement(v.name, i)
			if v.name == "vm-b" {
				raw, _ := r.Marshal()
				w.bRecs = append(w.bRecs, raw)
				w.bPaths = append(w.bPaths, fmt.Sprintf("/opt/vm-b/bin/tool-%03d", i))
			}
			tk, err := m.Submit(v.id.ID(), r)
			if err != nil {
				return nil, err
			}
			tickets = append(tickets, tk)
		}
	}
	for _, tk := range tickets {
		if _, err := tk.Wait(ctx); err != nil {
			return nil, err
		}
	}
	w.nonce = []byte("nonce-1 of the verifier")
	if w.evA, err = m.Evidence(ctx, w.a.ID(), w.nonce); err != nil {
		return nil, err
	}
	if w.evB, err = m.Evidence(ctx, w.b.ID(), w.nonce); err != nil {
		return nil, err
	}
	if _, err := m.Teardown(ctx, w.a.ID(), "destroyed"); err != nil {
		return nil, err
	}
	// B keeps writing after A's teardown.
	if _, err := m.Append(ctx, w.b.ID(), measurement("vm-b", 13)); err != nil {
		return nil, err
	}
	w.nonceE = []byte("nonce-after-teardown")
	if w.evAEnd, err = m.Evidence(ctx, w.a.ID(), w.nonceE); err != nil {
		return nil, err
	}
	if w.finalA, err = m.FinalEvidence(w.a.ID()); err != nil {
		return nil, err
	}
	return w, nil
}

// clone deep-copies evidence through its binary encoding.
func clone(t *testing.T, ev *evidence.Evidence) *evidence.Evidence {
	t.Helper()
	b, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	out, err := evidence.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// forge plays a malicious or buggy bridge that holds the real TPM: it
// writes an arbitrary record sequence for ident into a fresh PCR pcr and
// quotes it genuinely. Each call must use a PCR no other test extends and
// whose reset value is zero (11-16 on the simulator).
func forge(t *testing.T, tp tpm.TPM, pcr int, ident *conceal.Identity, recs []*record.Record, nonce []byte) *evidence.Evidence {
	return forgeEpoch(t, tp, pcr, ident, recs, nonce, nil)
}

// forgeEpoch is forge with the epoch record changed by mutate (when not
// nil) before it is extended: an epoch that lies about the power cycle.
func forgeEpoch(t *testing.T, tp tpm.TPM, pcr int, ident *conceal.Identity, recs []*record.Record, nonce []byte, mutate func(*record.Epoch)) *evidence.Evidence {
	t.Helper()
	ctx := context.Background()
	ci, err := tp.ClockInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	er := record.Epoch{Host: "forger", BridgeVersion: "x", PCR: uint32(pcr), Time: 1,
		ResetCount: ci.ResetCount, RestartCount: ci.RestartCount, Clock: ci.Clock, AK: quote.AKFingerprint(tp.AK())}
	if mutate != nil {
		mutate(&er)
	}
	erRaw, err := er.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	epochHash := record.EpochHash(erRaw)
	keys := ident.Keys()
	id := ident.ID()
	leaves := []conceal.Digest{conceal.EpochLeaf(erRaw)}
	var entries []byte
	ev := &evidence.Evidence{Version: evidence.Version, Kind: evidence.KindQuote, PCR: uint32(pcr),
		Epoch: evidence.Epoch{Number: 1, Record: erRaw},
		VM:    evidence.VM{UUID: conceal.FormatUUID(ident.UUID), Instance: ident.Instance[:]}}
	for s, r := range recs {
		if r.Kind == record.KindGenesis && r.Genesis.Epoch == ([32]byte{}) {
			g := *r.Genesis
			g.Epoch = epochHash
			r = &record.Record{Kind: r.Kind, Time: r.Time, Genesis: &g}
		}
		raw, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		tg := keys.Tag(uint64(s))
		c := keys.Commit(id, uint64(s), record.Hash(raw))
		leaves = append(leaves, conceal.Leaf(tg, c))
		entries = append(entries, tg[:]...)
		entries = append(entries, c[:]...)
		ev.Records = append(ev.Records, evidence.Record{G: uint64(s + 1), R: raw})
	}
	v := conceal.BatchDigest(0, leaves)
	cur, err := tp.ReadPCRs(ctx, []int{pcr})
	if err != nil {
		t.Fatal(err)
	}
	if cur[0] != (conceal.Digest{}) {
		t.Fatalf("forge: PCR %d already used", pcr)
	}
	if err := tp.Extend(ctx, pcr, v); err != nil {
		t.Fatal(err)
	}
	ev.Log = []evidence.LogBatch{{G0: 0, Entries: entries}}
	sel := []int{pcr}
	nd := conceal.NonceData(nonce, id)
	q, err := tp.Quote(ctx, sel, nd[:])
	if err != nil {
		t.Fatal(err)
	}
	vals, err := tp.ReadPCRs(ctx, sel)
	if err != nil {
		t.Fatal(err)
	}
	ev.Quote = evidence.Quote{Attest: q.Attest, Signature: q.Signature}
	ev.PCRValues = []evidence.PCRValue{{Index: uint32(pcr), SHA256: vals[0][:]}}
	return ev
}

// resign signs attest with a software key: a quote "by another AK".
func resign(t *testing.T, attest []byte) (sig []byte, key *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(attest)
	r, s, err := ecdsa.Sign(rand.Reader, key, d[:])
	if err != nil {
		t.Fatal(err)
	}
	// TPMT_SIGNATURE: sigAlg ECDSA (0x0018), hash SHA256 (0x000B), r, s as TPM2B.
	b := binary.BigEndian.AppendUint16(nil, 0x0018)
	b = binary.BigEndian.AppendUint16(b, 0x000B)
	rb, sb := r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))
	b = binary.BigEndian.AppendUint16(b, 32)
	b = append(b, rb...)
	b = binary.BigEndian.AppendUint16(b, 32)
	b = append(b, sb...)
	return b, key
}

// tenantInputs gives ExampleVerify what a tenant holds for VM B of the
// honest bridge run: its fresh evidence, the nonce, its identity and the
// simulator's AK.
func tenantInputs() (*evidence.Evidence, []byte, *conceal.Identity, *ecdsa.PublicKey) {
	worldOnce.Do(func() { theWorld, worldErr = buildWorld() })
	if worldErr != nil {
		panic(fmt.Sprintf("build honest bridge run: %v", worldErr))
	}
	w := theWorld
	return w.evB, w.nonce, w.b, w.tpm.AK()
}
