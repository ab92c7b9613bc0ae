// Package tpm gives the bridge its one way to talk to a TPM 2.0: extend a
// PCR, read PCRs, and quote them with a fixed attestation key (AK).
//
// Three backends share one implementation of the TPM commands and differ only
// in how command bytes reach the TPM:
//
//   - "sim": the Microsoft reference TPM compiled into this process
//     (go-tpm-tools' simulator). It is the default for tests and the demo.
//   - "swtpm:HOST:PORT" or "swtpm:unix:/path": a swtpm server socket speaking
//     raw TPM 2.0 commands. swtpm must run with --flags not-need-init (this
//     package never sends control-channel or platform commands);
//     startup-clear is recommended, and Open sends TPM2_Startup(CLEAR) itself
//     when the TPM has not been started.
//   - "device" or "device:/dev/tpmrm0": the kernel's TPM resource manager.
//
// The bridge is the TPM's one owner (docs/protocol.md, PCR and epochs): every value returned
// by Open serializes its commands with a mutex, so it is safe for concurrent
// use, and the swtpm backend assumes nobody else is using the swtpm while it
// is open (it flushes transient objects that a crashed predecessor left).
package tpm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// NumPCRs is the number of PCRs in the sha256 bank this package addresses
// (the PC Client profile's 24). PCR indices outside [0, NumPCRs) are refused
// before any command is sent.
const NumPCRs = 24

// pcrSelectSize is sizeofSelect for NumPCRs PCRs: one bit per PCR.
const pcrSelectSize = NumPCRs / 8

// maxPCRReadAttempts bounds how often ReadPCRs restarts when the PCR update
// counter moves between the chunks of one multi-command read.
const maxPCRReadAttempts = 10

// openProbeTimeout bounds the first command on a fresh connection when the
// caller's context has no earlier deadline: swtpm accepts a second client's
// connection but does not answer it until the first disconnects, so without a
// bound Open would hang silently.
const openProbeTimeout = 10 * time.Second

// Quote is a TPM2_Quote result in the TPM's wire form.
type Quote struct {
	Attest    []byte // marshalled TPMS_ATTEST (tpm2_checkquote's -m message)
	Signature []byte // marshalled TPMT_SIGNATURE (tpm2_checkquote's -s)
}

// TPM is the bridge's view of a TPM: the few commands the multiplexer and the
// evidence builder need. Implementations are safe for concurrent use; all
// commands to one TPM are serialized.
type TPM interface {
	// Extend extends the sha256 bank of pcr with digest (TPM2_PCR_Extend).
	Extend(ctx context.Context, pcr int, digest [32]byte) error
	// ReadPCRs returns the sha256 values of pcrs in the order given. It
	// issues as many TPM2_PCR_Read commands as needed (a TPM returns at most
	// eight digests per call) and retries when the PCR update counter changes
	// between them, so the values are one consistent snapshot.
	ReadPCRs(ctx context.Context, pcrs []int) ([][32]byte, error)
	// AK returns the attestation key's public key (shared: do not modify).
	AK() *ecdsa.PublicKey
	// Quote signs the sha256 PCRs pcrs with the AK over extraData
	// (TPM2_Quote's qualifyingData; at most sizeof(TPMT_HA) bytes, which is
	// 66 on a TPM with SHA-512 and 34 on one with only SHA-256).
	Quote(ctx context.Context, pcrs []int, extraData []byte) (Quote, error)
	// ClockInfo reads the TPM's clock, resetCount and restartCount
	// (TPM2_ReadClock): the multiplexer binds each epoch to them.
	ClockInfo(ctx context.Context) (ClockInfo, error)
	// ResettablePCRs lists the PCRs the TPM lets anyone reset at locality
	// 0; the multiplexer refuses to anchor history in one of them.
	ResettablePCRs(ctx context.Context) ([]int, error)
	// Close flushes the AK and releases the connection (and, for "sim", the
	// process-wide simulator).
	Close() error
}

// Resetter is implemented by backends that can simulate a host reboot (the
// "sim" backend). After Reset the PCRs are back at their reset values, the
// TPM's reset count has incremented, and AK still returns the same key (the
// AK is re-created from the same template and seed).
type Resetter interface {
	// Reset power-cycles the TPM as a host reboot would.
	Reset(ctx context.Context) error
}

// Open connects to the TPM named by spec, starts it if needed, and loads the
// AK. spec is one of "sim", "sim:SEED" (SEED a decimal int64 that fixes the
// simulator's endorsement seed; default DefaultSimSeed), "swtpm:HOST:PORT",
// "swtpm:unix:/path", "device" or "device:/path".
func Open(ctx context.Context, spec string) (TPM, error) {
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "sim":
		seed := int64(DefaultSimSeed)
		if arg != "" {
			s, err := strconv.ParseInt(arg, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("open tpm %q: simulator seed: %w", spec, err)
			}
			seed = s
		}
		return openSim(ctx, spec, seed)
	case "swtpm":
		network, addr := "tcp", arg
		if rest, ok := strings.CutPrefix(arg, "unix:"); ok {
			network, addr = "unix", rest
		}
		if addr == "" {
			return nil, fmt.Errorf("open tpm %q: want swtpm:HOST:PORT or swtpm:unix:/path", spec)
		}
		c, err := dialStream(ctx, network, addr)
		if err != nil {
			return nil, fmt.Errorf("open tpm %q: %w", spec, err)
		}
		d, err := newDev(ctx, spec, c, true)
		if err != nil {
			return nil, err
		}
		return d, nil
	case "device":
		path := arg
		if path == "" {
			path = "/dev/tpmrm0"
		}
		c, err := openDevice(path)
		if err != nil {
			return nil, fmt.Errorf("open tpm %q: %w", spec, err)
		}
		d, err := newDev(ctx, spec, c, false)
		if err != nil {
			return nil, err
		}
		return d, nil
	default:
		return nil, fmt.Errorf("open tpm %q: unknown backend %q (want sim, swtpm:HOST:PORT, swtpm:unix:/path, device or device:/path)", spec, kind)
	}
}

// AKPEM encodes pub as a PKIX "PUBLIC KEY" PEM block, the form
// tpm2_checkquote -u and openssl accept, so verifiers and tools can pin the AK.
func AKPEM(pub *ecdsa.PublicKey) ([]byte, error) {
	if pub == nil {
		return nil, errors.New("encode AK PEM: nil public key")
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encode AK PEM: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// AKTemplate returns the public template the AK is created from with
// TPM2_CreatePrimary under the endorsement hierarchy: the TCG default AK
// shape (as go-tpm-tools' AKTemplateECC): ECC NIST P-256, nameAlg SHA-256,
// restricted signing key with the ECDSA-SHA256 scheme, attributes
// fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign|noDA,
// empty authPolicy, and a unique field of two 32-byte zero coordinates.
// Because a primary key is a deterministic function of the hierarchy seed and
// this template, the AK is the same key after every restart of the same TPM.
func AKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			Restricted:          true,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme: tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
					&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		}),
	}
}

// dev is the backend-independent TPM implementation: it owns one connection,
// the loaded AK, and the mutex that serializes every command.
type dev struct {
	spec string

	mu     sync.Mutex // held for every command; guards all fields below
	conn   conn
	closed bool
	ak     tpm2.TPMHandle
	akName tpm2.TPM2BName
	akPub  *ecdsa.PublicKey
	// maxExtraData is sizeof(TPMT_HA) on this TPM: 2 + TPM_PT_MAX_DIGEST.
	maxExtraData int
	// extendCmd is the reusable buffer for the hand-built TPM2_PCR_Extend.
	extendCmd [extendCmdLen]byte
	// onClose runs after the connection is closed (releases the simulator).
	onClose func() error
}

// exclusive marks a backend without a resource manager whose TPM this
// process owns alone (swtpm): Open sends TPM2_Startup (tolerating
// TPM_RC_INITIALIZE) and flushes handles a crashed previous owner left.
type exclusive bool

// newDev runs the start-up sequence on a fresh connection: for an exclusive
// backend TPM2_Startup and flushing stale handles, then reading TPM limits
// and creating the AK. On error it closes c.
func newDev(ctx context.Context, spec string, c conn, excl exclusive) (*dev, error) {
	d := &dev{spec: spec, conn: c}
	if err := d.init(ctx, excl); err != nil {
		return nil, errors.Join(fmt.Errorf("open tpm %q: %w", spec, err), c.close())
	}
	return d, nil
}

func (d *dev) init(ctx context.Context, excl exclusive) error {
	// The first command doubles as a liveness probe: bound it.
	pctx, cancel := context.WithTimeout(ctx, openProbeTimeout)
	defer cancel()
	if excl {
		_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(d.tr(pctx))
		if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
			return d.probeErr(pctx, "TPM2_Startup", err)
		}
	}
	maxDigest, err := d.property(pctx, tpm2.TPMPTMaxDigest)
	if err != nil {
		return d.probeErr(pctx, "read TPM_PT_MAX_DIGEST", err)
	}
	d.maxExtraData = 2 + int(maxDigest)
	if excl {
		if err := d.flushStale(ctx); err != nil {
			return err
		}
	}
	return d.loadAK(ctx)
}

// probeErr explains a failed first command: a timeout on swtpm almost always
// means another client holds its one connection.
func (d *dev) probeErr(pctx context.Context, what string, err error) error {
	if errors.Is(pctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%s: no answer within %v (swtpm serves one client at a time: is another client, e.g. tpm2-tools or a second bridge, connected?): %w", what, openProbeTimeout, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// property reads one TPM_CAP_TPM_PROPERTIES value.
func (d *dev) property(ctx context.Context, p tpm2.TPMPT) (uint32, error) {
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(p),
		PropertyCount: 1,
	}.Execute(d.tr(ctx))
	if err != nil {
		return 0, err
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return 0, err
	}
	for _, tp := range props.TPMProperty {
		if tp.Property == p {
			return tp.Value, nil
		}
	}
	return 0, fmt.Errorf("TPM did not report property 0x%x", uint32(p))
}

// flushStale flushes every transient object and loaded session the TPM
// reports. It runs only on exclusive backends (swtpm): swtpm has no resource
// manager, so objects outlive the connection that created them, and without
// this flush the few object slots (three in libtpms) run out after a few
// bridge crashes. (A kernel resource manager flushes a closed connection's
// objects itself, and other clients' sessions are not ours to flush.)
func (d *dev) flushStale(ctx context.Context) error {
	for _, first := range []tpm2.TPMHandle{
		tpm2.TPMHandle(uint32(tpm2.TPMHTTransient) << 24),
		tpm2.TPMHandle(uint32(tpm2.TPMHTHMACSession) << 24),
		tpm2.TPMHandle(uint32(tpm2.TPMHTPolicySession) << 24),
	} {
		rsp, err := tpm2.GetCapability{
			Capability:    tpm2.TPMCapHandles,
			Property:      uint32(first),
			PropertyCount: 64,
		}.Execute(d.tr(ctx))
		if err != nil {
			return fmt.Errorf("list handles from 0x%08x: %w", uint32(first), err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return fmt.Errorf("list handles from 0x%08x: %w", uint32(first), err)
		}
		for _, h := range hs.Handle {
			if uint32(h)>>24 != uint32(first)>>24 {
				continue
			}
			if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(d.tr(ctx)); err != nil {
				return fmt.Errorf("flush stale handle 0x%08x: %w", uint32(h), err)
			}
		}
	}
	return nil
}

// loadAK creates the AK with TPM2_CreatePrimary under the endorsement
// hierarchy and keeps its handle. If an AK was loaded before (Reset), the new
// key must be the same key.
func (d *dev) loadAK(ctx context.Context) error {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(AKTemplate()),
	}.Execute(d.tr(ctx))
	if err != nil {
		return fmt.Errorf("create AK under the endorsement hierarchy: %w", err)
	}
	pub, err := akPublic(rsp.OutPublic)
	if err != nil {
		_, ferr := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.tr(ctx))
		return errors.Join(fmt.Errorf("create AK: %w", err), ferr)
	}
	if d.akPub != nil && !d.akPub.Equal(pub) {
		_, ferr := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.tr(ctx))
		return errors.Join(errors.New("re-created AK differs from the previous AK (endorsement seed changed?)"), ferr)
	}
	d.ak, d.akName, d.akPub = rsp.ObjectHandle, rsp.Name, pub
	return nil
}

// akPublic converts the TPM's TPM2B_PUBLIC of the AK to a crypto key.
func akPublic(p tpm2.TPM2BPublic) (*ecdsa.PublicKey, error) {
	pub, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("parse AK public area: %w", err)
	}
	k, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, fmt.Errorf("convert AK public key: %w", err)
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("AK public key is %T, want *ecdsa.PublicKey", k)
	}
	return ek, nil
}

// tr adapts the connection to go-tpm's transport for one call under ctx.
func (d *dev) tr(ctx context.Context) transport.TPM { return ctxTransport{ctx: ctx, c: d.conn} }

// ctxTransport is a go-tpm transport bound to a context. It copies the
// response because connections reuse their receive buffer.
type ctxTransport struct {
	ctx context.Context
	c   conn
}

// Send implements transport.TPM.
func (t ctxTransport) Send(cmd []byte) ([]byte, error) {
	rsp, err := t.c.send(t.ctx, cmd)
	if err != nil {
		return nil, err
	}
	return bytes.Clone(rsp), nil
}

// lock takes the command mutex and fails if the TPM was closed.
func (d *dev) lock(op string) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return fmt.Errorf("tpm %s: %s: TPM is closed", d.spec, op)
	}
	return nil
}

// AK implements TPM.
func (d *dev) AK() *ecdsa.PublicKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.akPub
}

// Extend implements TPM with the hand-built command (see extend.go).
func (d *dev) Extend(ctx context.Context, pcr int, digest [32]byte) error {
	if err := checkPCR(pcr); err != nil {
		return fmt.Errorf("tpm %s: extend: %w", d.spec, err)
	}
	if err := d.lock("extend"); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := d.extendFast(ctx, pcr, &digest); err != nil {
		return fmt.Errorf("tpm %s: extend PCR %d: %w", d.spec, pcr, err)
	}
	return nil
}

// extendGoTPM is Extend through go-tpm's reflection marshalling; kept for
// the equivalence test and the benchmark that justifies extendFast.
func (d *dev) extendGoTPM(ctx context.Context, pcr int, digest [32]byte) error {
	if err := checkPCR(pcr); err != nil {
		return err
	}
	if err := d.lock("extend"); err != nil {
		return err
	}
	defer d.mu.Unlock()
	_, err := goTPMExtend(pcr, digest).Execute(d.tr(ctx))
	if err != nil {
		return fmt.Errorf("tpm %s: extend PCR %d: %w", d.spec, pcr, err)
	}
	return nil
}

// goTPMExtend is the go-tpm form of the command extendFast builds by hand.
func goTPMExtend(pcr int, digest [32]byte) tpm2.PCRExtend {
	return tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
			{HashAlg: tpm2.TPMAlgSHA256, Digest: digest[:]},
		}},
	}
}

// ReadPCRs implements TPM. It holds the command mutex for the whole read so
// that this process's own extends cannot split it; the update-counter check
// catches anyone else (another client of the kernel resource manager).
func (d *dev) ReadPCRs(ctx context.Context, pcrs []int) ([][32]byte, error) {
	for _, p := range pcrs {
		if err := checkPCR(p); err != nil {
			return nil, fmt.Errorf("tpm %s: read PCRs: %w", d.spec, err)
		}
	}
	want := uniqueSorted(pcrs)
	if err := d.lock("read PCRs"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	var vals [NumPCRs][32]byte
	for attempt := 0; ; attempt++ {
		if attempt == maxPCRReadAttempts {
			return nil, fmt.Errorf("tpm %s: read PCRs: update counter changed during each of %d attempts", d.spec, maxPCRReadAttempts)
		}
		ok, err := d.readOnce(ctx, want, &vals)
		if err != nil {
			return nil, fmt.Errorf("tpm %s: read PCRs %v: %w", d.spec, pcrs, err)
		}
		if ok {
			break
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("tpm %s: read PCRs: %w", d.spec, err)
		}
	}
	out := make([][32]byte, len(pcrs))
	for i, p := range pcrs {
		out[i] = vals[p]
	}
	return out, nil
}

// readOnce reads the PCRs want (ascending, distinct) with as many
// TPM2_PCR_Read calls as needed into vals. It reports false if the PCR update
// counter changed between calls (the caller retries).
func (d *dev) readOnce(ctx context.Context, want []int, vals *[NumPCRs][32]byte) (bool, error) {
	remaining := slices.Clone(want)
	first := true
	var counter uint32
	for len(remaining) > 0 {
		chunk := remaining[:min(8, len(remaining))]
		rsp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(chunk)}.Execute(d.tr(ctx))
		if err != nil {
			return false, err
		}
		got, err := selectedPCRs(rsp.PCRSelectionOut)
		if err != nil {
			return false, fmt.Errorf("TPM2_PCR_Read returned selection: %w", err)
		}
		if len(got) == 0 {
			return false, fmt.Errorf("TPM2_PCR_Read returned no PCRs for %v", chunk)
		}
		for _, p := range got {
			if !slices.Contains(chunk, p) {
				return false, fmt.Errorf("TPM2_PCR_Read returned PCR %d, which was not requested (asked for %v)", p, chunk)
			}
		}
		if len(rsp.PCRValues.Digests) != len(got) {
			return false, fmt.Errorf("TPM2_PCR_Read selected %d PCRs but returned %d digests", len(got), len(rsp.PCRValues.Digests))
		}
		for i, p := range got {
			dg := rsp.PCRValues.Digests[i].Buffer
			if len(dg) != 32 {
				return false, fmt.Errorf("TPM2_PCR_Read returned a %d-byte digest for sha256 PCR %d", len(dg), p)
			}
			copy(vals[p][:], dg)
		}
		if first {
			counter, first = rsp.PCRUpdateCounter, false
		} else if rsp.PCRUpdateCounter != counter {
			return false, nil
		}
		remaining = slices.DeleteFunc(remaining, func(p int) bool { return slices.Contains(got, p) })
	}
	return true, nil
}

// Quote implements TPM.
func (d *dev) Quote(ctx context.Context, pcrs []int, extraData []byte) (Quote, error) {
	for _, p := range pcrs {
		if err := checkPCR(p); err != nil {
			return Quote{}, fmt.Errorf("tpm %s: quote: %w", d.spec, err)
		}
	}
	if err := d.lock("quote"); err != nil {
		return Quote{}, err
	}
	defer d.mu.Unlock()
	if len(extraData) > d.maxExtraData {
		return Quote{}, fmt.Errorf("tpm %s: quote: extraData is %d bytes; this TPM accepts at most %d (sizeof(TPMT_HA))", d.spec, len(extraData), d.maxExtraData)
	}
	rsp, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: d.ak, Name: d.akName, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: extraData},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      pcrSelection(uniqueSorted(pcrs)),
	}.Execute(d.tr(ctx))
	if err != nil {
		return Quote{}, fmt.Errorf("tpm %s: quote PCRs %v: %w", d.spec, pcrs, err)
	}
	return Quote{
		Attest:    bytes.Clone(rsp.Quoted.Bytes()),
		Signature: tpm2.Marshal(rsp.Signature),
	}, nil
}

// Close implements TPM. It flushes the AK (on swtpm a transient object would
// otherwise outlive the connection) and closes the connection; it is
// idempotent.
func (d *dev) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	if d.ak != 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := (tpm2.FlushContext{FlushHandle: d.ak}).Execute(d.tr(ctx)); err != nil {
			errs = append(errs, fmt.Errorf("flush AK: %w", err))
		}
		cancel()
	}
	if err := d.conn.close(); err != nil {
		errs = append(errs, fmt.Errorf("close connection: %w", err))
	}
	if d.onClose != nil {
		if err := d.onClose(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close tpm %s: %w", d.spec, err)
	}
	return nil
}

// checkPCR rejects PCR indices outside the sha256 bank.
func checkPCR(pcr int) error {
	if pcr < 0 || pcr >= NumPCRs {
		return fmt.Errorf("PCR %d out of range [0, %d)", pcr, NumPCRs)
	}
	return nil
}

// uniqueSorted returns the distinct values of pcrs in ascending order.
func uniqueSorted(pcrs []int) []int {
	s := slices.Clone(pcrs)
	slices.Sort(s)
	return slices.Compact(s)
}

// pcrSelection builds a sha256 TPML_PCR_SELECTION for pcrs (all in range).
func pcrSelection(pcrs []int) tpm2.TPMLPCRSelection {
	bits := make([]byte, pcrSelectSize)
	for _, p := range pcrs {
		bits[p/8] |= 1 << (p % 8)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: bits},
	}}
}

// selectedPCRs returns the ascending sha256 PCR indices of a selection the
// TPM returned, and fails on any other bank or on PCRs beyond NumPCRs.
func selectedPCRs(sel tpm2.TPMLPCRSelection) ([]int, error) {
	var out []int
	for _, s := range sel.PCRSelections {
		if s.Hash != tpm2.TPMAlgSHA256 {
			if slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
				return nil, fmt.Errorf("unexpected bank 0x%04x", uint16(s.Hash))
			}
			continue
		}
		for i, b := range s.PCRSelect {
			for bit := 0; bit < 8; bit++ {
				if b&(1<<bit) == 0 {
					continue
				}
				p := i*8 + bit
				if p >= NumPCRs {
					return nil, fmt.Errorf("PCR %d beyond the %d this package addresses", p, NumPCRs)
				}
				out = append(out, p)
			}
		}
	}
	slices.Sort(out)
	if len(slices.Compact(slices.Clone(out))) != len(out) {
		return nil, errors.New("sha256 bank selected twice")
	}
	return out, nil
}
