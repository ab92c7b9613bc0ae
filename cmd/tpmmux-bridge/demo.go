package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
)

type demoVM struct {
	name     string
	xml      []byte
	ident    *conceal.Identity
	files    []string
	nonce    []byte
	ev       *evidence.Evidence
	final    *evidence.Evidence
	ingest   time.Duration
	verified string
	cross    string
	post     string
	evBytes  int
}

func demoMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge demo",
		Synopsis: []string{"[--vms N] [--records N] [--tpm TPM] [--out DIR] [-v]"},
		Summary:  "run the whole flow in one process",
		Description: `N VMs get identities through the hook's lifecycle path, stream real ima-ng measurements at
once through the multiplexer, get per-VM evidence that is verified (and rejected with another
VM's identity), are torn down, and verified again post mortem. Exit status 1 unless every VM
verified. The default TPM, sim, is the embedded simulator (builds with cgo only; its AK is public
knowledge).`,
	}
	fset := cmd.FlagSet()
	nVMs := fset.Int("vms", 3, "number of VMs, `N`")
	nRecs := fset.Int("records", 25, "measurement records per VM, `N`")
	tpmSpec := fset.String("tpm", "sim", "the `TPM`: sim, swtpm:HOST:PORT, swtpm:unix:PATH or device[:PATH]")
	out := fset.String("out", "", "write per-VM evidence, nonce, identity and quote files into `DIR`")
	verbose := fset.Bool("v", false, "log what the bridge does")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *nVMs < 1 || *nVMs > 10000 || *nRecs < 0 || *nRecs > 1_000_000 {
		fmt.Fprintln(stderr, "demo: --vms must be 1..10000 and --records 0..1000000")
		return 2
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	if err := demo(ctx, demoConfig{vms: *nVMs, records: *nRecs, tpm: *tpmSpec, out: *out, log: log}, stdout); err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	return 0
}

type demoConfig struct {
	vms, records int
	tpm, out     string
	log          *slog.Logger
}

func demo(ctx context.Context, cfg demoConfig, w io.Writer) error {
	t, err := tpm.Open(ctx, cfg.tpm)
	if err != nil {
		return err
	}
	defer t.Close()
	stateDir, err := os.MkdirTemp("", "tpmmux-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateDir)
	st, err := logstore.Open(filepath.Join(stateDir, "log.db"), nil)
	if err != nil {
		return err
	}
	defer st.Close()
	host, _ := os.Hostname()
	m, err := mux.Open(ctx, t, st, mux.Config{Host: host, Version: version, Logger: cfg.log})
	if err != nil {
		return err
	}
	defer m.Close()
	if s := m.Status(); s.Fault != "" {
		return fmt.Errorf("bridge refuses to serve: %s (the TPM's PCR %d was extended by someone else; use a fresh TPM)", s.Fault, s.PCR)
	}
	br := &bridge.Bridge{Mux: m, Log: cfg.log}
	fmt.Fprintf(w, "tpmmux demo: %d VMs x %d IMA records on TPM %q, PCR %d\n\n", cfg.vms, cfg.records, cfg.tpm, mux.DefaultPCR)

	files, err := realFiles(cfg.vms * cfg.records)
	if err != nil {
		return err
	}
	// 1. Identities through the lifecycle path the libvirt hook uses.
	vms := make([]*demoVM, cfg.vms)
	for i := range vms {
		v := &demoVM{name: fmt.Sprintf("vm-%02d", i+1)}
		v.xml = domainXML(v.name, uint32(3+i))
		if _, v.ident, err = br.Prepare(ctx, v.xml); err != nil {
			return err
		}
		for j := 0; j < cfg.records && len(files) > 0; j++ {
			v.files = append(v.files, files[(i*cfg.records+j)%len(files)])
		}
		vms[i] = v
	}
	// 2. Every VM streams its measurements at once; group commit folds them.
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(vms))
	for i, v := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			errs[i] = ingest(ctx, m, v)
			v.ingest = time.Since(t0)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	ingestAll := time.Since(start)
	// 3. Evidence for a fresh nonce and verification, per VM.
	ak := t.AK()
	ok, err := verifyEach(ctx, m, ak, vms)
	if err != nil {
		return err
	}
	if cfg.out != "" {
		if err := writeOut(cfg.out, t, vms); err != nil {
			return err
		}
	}
	// 4. Teardown of each, then post-mortem verification of its final quote.
	for _, v := range vms {
		if err := br.Stopped(ctx, v.name, "destroyed"); err != nil {
			return err
		}
	}
	for _, v := range vms {
		if v.final, err = m.FinalEvidence(v.ident.ID()); err != nil {
			return err
		}
		v.post = verdict(verify.Verify(v.final, verify.Options{PostMortem: true, Identity: v.ident, AK: ak, PCR: mux.DefaultPCR}))
		ok = ok && v.post == "trusted"
		if cfg.out != "" {
			if err := writeJSON(filepath.Join(cfg.out, v.name, "final-evidence.json"), v.final); err != nil {
				return err
			}
		}
	}
	printDemo(w, cfg, vms, m.Status(), ingestAll)
	if !ok {
		return fmt.Errorf("not every VM verified")
	}
	fmt.Fprintln(w, "every VM verified: own evidence trusted, another VM's identity rejected, post-mortem trusted")
	return nil
}

// verifyEach gets each VM's evidence for a fresh nonce and verifies it
// with its own identity (it must be trusted) and with the next VM's (it
// must not be); ok says both held for every VM.
func verifyEach(ctx context.Context, m *mux.Mux, ak *ecdsa.PublicKey, vms []*demoVM) (ok bool, err error) {
	ok = true
	for i, v := range vms {
		v.nonce = make([]byte, 20)
		rand.Read(v.nonce)
		if v.ev, err = m.Evidence(ctx, v.ident.ID(), v.nonce); err != nil {
			return false, err
		}
		b, _ := v.ev.MarshalBinary()
		v.evBytes = len(b)
		v.verified = verdict(verify.Verify(v.ev, verify.Options{Nonce: v.nonce, Identity: v.ident, AK: ak, PCR: mux.DefaultPCR}))
		other := vms[(i+1)%len(vms)]
		if other != v {
			v.cross = verdict(verify.Verify(v.ev, verify.Options{Nonce: v.nonce, Identity: other.ident, AK: ak, PCR: mux.DefaultPCR}))
		} else {
			v.cross = "n/a"
		}
		ok = ok && v.verified == "trusted" && (other == v || v.cross != "trusted")
	}
	return ok, nil
}

// printDemo prints the demo's table and summary: st is the multiplexer's
// state at the end, ingestAll the time every VM took to stream.
func printDemo(w io.Writer, cfg demoConfig, vms []*demoVM, st mux.Status, ingestAll time.Duration) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tRECORDS\tINGEST\tEVIDENCE\tVERIFY (own identity)\tVERIFY (next VM's identity)\tPOST-MORTEM")
	for _, v := range vms {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d B\t%s\t%s\t%s\n", v.name, len(v.ev.Records), v.ingest.Round(time.Millisecond), v.evBytes, v.verified, v.cross, v.post)
	}
	tw.Flush()
	recs := uint64(cfg.vms * (cfg.records + 1))
	fmt.Fprintf(w, "\n%d records in %s over %d batches (%d TPM extends, largest batch %d): %.0f records/s\n",
		recs, ingestAll.Round(time.Millisecond), st.Stats.Batches, st.Stats.Extends, st.Stats.MaxBatch, float64(cfg.vms*cfg.records)/ingestAll.Seconds())
	fmt.Fprintf(w, "log: epoch %d, %d batches, %d entries; PCR %d = %x\n", st.Epoch, st.Batches, st.Entries, st.PCR, st.PCRValue)
	if cfg.out != "" {
		fmt.Fprintf(w, "files in %s; check one by hand with:\n  tpmmux-verify --evidence %s --nonce $(cat %s) --identity %s --ak %s\n",
			cfg.out, filepath.Join(cfg.out, vms[0].name, "evidence.json"), filepath.Join(cfg.out, vms[0].name, "nonce.hex"),
			filepath.Join(cfg.out, vms[0].name, "identity.json"), filepath.Join(cfg.out, "ak.pem"))
	}
}

func verdict(_ *verify.Report, err error) string {
	if err == nil {
		return "trusted"
	}
	var rj *verify.Rejection
	if errors.As(err, &rj) {
		return fmt.Sprintf("rejected at step %d", rj.Step)
	}
	return "error: " + err.Error()
}

// ingest submits the VM's measurements as the guest agent would: in
// batches, waiting for each acknowledgement.
func ingest(ctx context.Context, m *mux.Mux, v *demoVM) error {
	id := v.ident.ID()
	const chunk = 64
	bootID := "demo-" + v.name
	for i := 0; i < len(v.files); i += chunk {
		var recs []*record.Record
		for j := i; j < min(i+chunk, len(v.files)); j++ {
			e, err := fileEntry(v.files[j])
			if err != nil {
				return err
			}
			recs = append(recs, &record.Record{Kind: record.KindMeasurement, Time: time.Now().UnixNano(), Measurement: &record.Measurement{
				PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
				TemplateData: e.TemplateData, LogIndex: uint64(j + 1), BootID: bootID,
			}})
		}
		t, err := m.Submit(id, recs...)
		if err != nil {
			return fmt.Errorf("%s: %w", v.name, err)
		}
		if _, err := t.Wait(ctx); err != nil {
			return fmt.Errorf("%s: %w", v.name, err)
		}
	}
	return nil
}

// fileEntry builds the ima-ng entry the guest kernel would log for path.
func fileEntry(path string) (ima.Entry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ima.Entry{}, fmt.Errorf("measure %s: %w", path, err)
	}
	d := sha256.Sum256(b)
	return ima.NewIMANG(10, "sha256", d[:], path), nil
}

// realFiles lists up to n readable regular files of this machine to measure.
func realFiles(n int) ([]string, error) {
	var out []string
	for _, dir := range []string{"/usr/bin", "/usr/sbin", "/usr/lib"} {
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || len(out) >= n {
				if len(out) >= n {
					return fs.SkipAll
				}
				return nil
			}
			if !d.Type().IsRegular() {
				return nil
			}
			if info, err := d.Info(); err != nil || info.Size() > 4<<20 {
				return nil
			}
			out = append(out, p)
			return nil
		})
		if err != nil {
			return nil, err
		}
		if len(out) >= n {
			break
		}
	}
	sort.Strings(out)
	if len(out) == 0 && n > 0 {
		return nil, fmt.Errorf("no files to measure under /usr")
	}
	return out, nil
}

func domainXML(name string, cid uint32) []byte {
	var u [16]byte
	rand.Read(u[:])
	return []byte(fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/proc/self/exe</kernel><cmdline>console=ttyS0 ima_policy=tcb</cmdline></os>
  <devices>
    <vsock model='virtio'><cid auto='no' address='%d'/></vsock>
  </devices>
</domain>
`, name, conceal.FormatUUID(u), cid))
}

func writeOut(dir string, t tpm.TPM, vms []*demoVM) error {
	pemBytes, err := tpm.AKPEM(t.AK())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "ak.pem"), pemBytes, 0o644); err != nil {
		return err
	}
	for _, v := range vms {
		d := filepath.Join(dir, v.name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := writeJSON(filepath.Join(d, "evidence.json"), v.ev); err != nil {
			return err
		}
		b, err := v.ev.MarshalBinary()
		if err != nil {
			return err
		}
		files := map[string][]byte{
			"evidence.cbor": b,
			"nonce.hex":     []byte(hex.EncodeToString(v.nonce) + "\n"),
			"quote.msg":     v.ev.Quote.Attest,
			"quote.sig":     v.ev.Quote.Signature,
			"domain.xml":    v.xml,
			"extradata.hex": []byte(extraHex(v) + "\n"),
		}
		for name, content := range files {
			if err := os.WriteFile(filepath.Join(d, name), content, 0o644); err != nil {
				return err
			}
		}
		if err := writeJSONMode(filepath.Join(d, "identity.json"), v.ident, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// extraHex is the quote's qualifying data H(nonce || id), which
// tpm2_checkquote -q compares against.
func extraHex(v *demoVM) string {
	d := conceal.NonceData(v.nonce, v.ident.ID())
	return strings.ToLower(hex.EncodeToString(d[:]))
}

func writeJSON(path string, v any) error { return writeJSONMode(path, v, 0o644) }

func writeJSONMode(path string, v any, mode os.FileMode) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), mode)
}
