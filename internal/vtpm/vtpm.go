// Package vtpm is the bridge-served virtual TPM 2.0 of one VM: a small TPM
// command processor that implements what firmware measured boot (SeaBIOS,
// OVMF) and the Linux TPM driver and IMA use (startup, capabilities, PCR
// read/extend/event/reset/allocate, random, hierarchy housekeeping) and
// answers every other command with TPM_RC_COMMAND_CODE, served to QEMU's TPM
// emulator backend over the swtpm control-channel protocol (see Serve).
//
// It holds no keys and no secrets worth stealing: there is no endorsement
// key, no quote, no NV, no object or session. Attestation of the VM goes
// through tpmmux evidence. Its PCRs are the replay of its journal
// (vpcr.Event records): every state change is first handed to the Journal
// (the multiplexer, which makes it durable or anchors it in the host TPM),
// and only when that returns is it applied and the guest answered.
package vtpm

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Journal receives every event that changes the vTPM's PCRs, before the
// vTPM applies it and answers the guest. The multiplexer implements it: a
// record in the VM's concealed log through the group commit.
type Journal interface {
	// Append records e and returns once it is durable (mode durable) or
	// durable and extended into the host TPM (mode anchored). It may block
	// for as long as the bridge needs (the guest's command waits, as on a
	// slow TPM). A non-nil error must mean e was NOT recorded: the vTPM then
	// leaves its PCRs unchanged and answers the guest TPM_RC_RETRY, which
	// the Linux driver retries. A journal that cannot tell whether a failed
	// write landed must not return (or must end the process), because the
	// next restart replays whatever it holds.
	Append(ctx context.Context, e vpcr.Event) error
}

// Config configures a VTPM.
type Config struct {
	// Banks are the PCR banks the vTPM offers (the guest may narrow them
	// with PCR_Allocate, effective at its next reboot). Default: sha1 and
	// sha256, as a PC-client TPM ships.
	Banks []vpcr.Alg
	// Journal receives every PCR-changing event. Required.
	Journal Journal
	// Logger receives one line per refused control command or malformed
	// request (default: slog.Default()).
	Logger *slog.Logger
	// Rand is GetRandom's source (default crypto/rand).
	Rand io.Reader
	// Now is the clock for ReadClock (default time.Now).
	Now func() time.Time
	// Inflight, if set, keeps the command being executed and the locality
	// where they survive the process, so that a process that takes over
	// the connections after a crash answers the command the dead one had
	// read, exactly once (see FileInflight). Without it a command in
	// flight at a kill -9 is lost and QEMU waits for its answer forever.
	Inflight Inflight
	// Start, if set, is the vPCR state the VM arrived with by live
	// migration (its migrated-in record's snapshot); past then holds only
	// the events since. Nil for a VM that started on this host.
	Start *vpcr.Snapshot
	// Incoming makes a vTPM for a VM that is migrating in and has no
	// state here yet: it answers QEMU's control commands (including the
	// state blobs and the resume) without journaling, and guest commands
	// wait until Adopt installs the state the bridges handed over.
	Incoming bool
	// Trace, if set, is called after every control command (Control true,
	// code a CMD_* number, rc its result) and every TPM command (code the
	// command code, rc the response code; code 0 for bytes too short to
	// hold one), for metrics and tests. It must not block.
	Trace func(control bool, code, rc uint32)
	// Parker, if set, holds the vTPM's channels while they are idle, so
	// that an idle VM costs no goroutine (one Parker serves all the vTPMs
	// of a process). Without it each served channel keeps a goroutine.
	Parker *Parker
}

// defaultBanks are the banks of a VTPM whose Config.Banks is empty.
var defaultBanks = []vpcr.Alg{vpcr.SHA1, vpcr.SHA256}

// DefaultBanks returns the default PCR banks (sha1, sha256).
func DefaultBanks() []vpcr.Alg { return slices.Clone(defaultBanks) }

// Buffer sizes for CMD_SET_BUFFERSIZE: the largest command and response
// the vTPM accepts and sends. QEMU's CRB asks for 3968, its TIS for 4096.
const (
	MinBufferSize     = 1024
	MaxBufferSize     = 4096
	DefaultBufferSize = 4096
)

// maxDigest is the largest digest of an implemented hash (sha512): the most
// GetRandom returns per call and the largest hierarchy authValue.
const maxDigest = 64

// VTPM is one VM's virtual TPM. Its methods are safe for concurrent use;
// TPM commands and control commands are serialized, as one TPM executes
// one command at a time.
type VTPM struct {
	journal Journal
	log     *slog.Logger
	rand    io.Reader
	now     func() time.Time
	trace   func(control bool, code, rc uint32)
	inf     Inflight
	parker  *Parker

	mu       sync.Mutex
	st       *vpcr.State
	last     vpcr.Event // the last applied event
	replay   bool       // finishing a dead process's command whose event is journaled
	locality uint8
	stopped  bool // CMD_STOP or CMD_SHUTDOWN until the next CMD_INIT
	bufSize  uint32
	data     net.Conn      // the data connection being served, if any
	ctrl     *net.UnixConn // the control connection being served, if any
	created  time.Time     // origin of TPMS_CLOCK_INFO.clock
	started  time.Time     // origin of TPMS_TIME_INFO.time
	// Hierarchy state. The enables and platformAuth are reset by every
	// Startup(CLEAR), as on hardware. ownerAuth, endorsementAuth and
	// lockoutAuth would be persistent on hardware; here they live as long
	// as the bridge process (they protect nothing the vTPM implements).
	phEnable, shEnable, ehEnable, phEnableNV bool
	auth                                     map[uint32][]byte
	// Live migration (migrate.go).
	incoming    bool          // waiting for Adopt
	adopted     chan struct{} // closed when not incoming
	resumeArmed bool          // a volatile state blob arrived: the next CMD_INIT resumes
	blobSeq     uint64        // the seq the state blob named
	// incomingInit: QEMU sent INIT to the incoming vTPM; guest commands
	// from then on wait for Adopt.
	incomingInit bool
	// awaitResume: created for a VM migrating in, and QEMU has not yet
	// resumed it (state blobs are accepted until then).
	awaitResume bool
}

// New returns the vTPM whose PCRs are the replay of past, the VM's journal
// so far (nil for a new VM). A bridge that restarts while the guest runs
// passes the VM's events here and then hands the kept QEMU connections to
// ServeControl and ServeData: the guest sees the same PCRs and the same
// power phase (running, or waiting for Startup).
func New(cfg Config, past []vpcr.Event) (*VTPM, error) {
	if cfg.Journal == nil {
		return nil, errors.New("vtpm: no journal configured")
	}
	banks := cfg.Banks
	if len(banks) == 0 {
		banks = defaultBanks
	}
	st, err := vpcr.ReplayFrom(banks, cfg.Start, past)
	if err != nil {
		return nil, fmt.Errorf("vtpm: restore from %d journal events: %w", len(past), err)
	}
	v := &VTPM{
		journal:     cfg.Journal,
		log:         cfg.Logger,
		rand:        cfg.Rand,
		now:         cfg.Now,
		trace:       cfg.Trace,
		inf:         cfg.Inflight,
		parker:      cfg.Parker,
		st:          st,
		bufSize:     DefaultBufferSize,
		auth:        map[uint32][]byte{},
		incoming:    cfg.Incoming,
		awaitResume: cfg.Incoming,
		adopted:     make(chan struct{}),
	}
	if !v.incoming {
		close(v.adopted)
	}
	if v.log == nil {
		v.log = slog.Default()
	}
	if len(past) > 0 {
		v.last = past[len(past)-1]
	}
	if v.inf != nil {
		if v.locality, err = v.inf.Locality(); err != nil {
			return nil, err
		}
	}
	if v.rand == nil {
		v.rand = rand.Reader
	}
	if v.now == nil {
		v.now = time.Now
	}
	v.started = v.now()
	v.resetHierarchies()
	return v, nil
}

func (v *VTPM) resetHierarchies() {
	v.phEnable, v.shEnable, v.ehEnable, v.phEnableNV = true, true, true, true
	delete(v.auth, rhPlatform)
}

// PCRs returns a copy of the vTPM's PCR state (banks, values, phase, the
// last event's Seq).
func (v *VTPM) PCRs() *vpcr.State {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.st.Clone()
}

// Locality returns the locality of the next TPM command (CMD_SET_LOCALITY).
func (v *VTPM) Locality() uint8 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.locality
}

// record journals e (with the next Seq) and applies it. Called with v.mu
// held. On error nothing changed.
func (v *VTPM) record(ctx context.Context, e vpcr.Event) error {
	if v.replay {
		// The dead process journaled (and the restore applied) this
		// command's event: only its answer is missing.
		return nil
	}
	e.Seq = v.st.Seq() + 1
	if err := v.st.Check(e); err != nil {
		// The processor checked the rules before; this is a bug, not a
		// guest error. Do not journal something replay would refuse.
		return fmt.Errorf("vtpm: refusing to journal %v: %w", e, err)
	}
	if err := v.journal.Append(ctx, e); err != nil {
		return fmt.Errorf("vtpm: journal %v: %w", e, err)
	}
	if err := v.st.Apply(e); err != nil {
		panic(fmt.Sprintf("vtpm: checked event %v no longer applies: %v", e, err)) // unreachable: v.mu is held
	}
	v.last = e
	return nil
}

// Init is TPM_Init (control channel CMD_INIT): the VM powered on or was
// reset. It is journaled, so a restarted bridge knows the TPM waits for
// Startup. It returns a swtpm-ioctls result code.
func (v *VTPM) Init(ctx context.Context) uint32 {
	return v.init(ctx, 0)
}

// init is CMD_INIT with its flags. A VM migrating in gets QEMU's INITs
// (at its start, and the resume after the state blobs) without a journal
// event: it has no identity here yet and its TPM is not rebooting. After
// the state blobs, an INIT with DELETE_VOLATILE resumes the migrated TPM
// (no Startup follows) even if the state was adopted in between.
func (v *VTPM) init(ctx context.Context, flags uint32) uint32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.resumeArmed && flags&initDeleteVolatile != 0 {
		v.resumeArmed = false
		v.awaitResume = false
		v.stopped = false
		v.incomingInit = true
		v.log.Info("vtpm: resumed after live migration", "incoming", v.incoming)
		return ptmSuccess
	}
	if v.incoming {
		v.stopped = false
		v.incomingInit = true
		return ptmSuccess
	}
	if err := v.record(ctx, vpcr.Event{Kind: vpcr.KindInit, Locality: v.locality}); err != nil {
		v.log.Error("vtpm: CMD_INIT not journaled; the TPM stays as it was", "err", err)
		return ptmFail
	}
	v.stopped = false
	return ptmSuccess
}

// Stop is CMD_STOP (and CMD_SHUTDOWN): TPM commands fail until the next Init.
func (v *VTPM) Stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stopped = true
}

// SetLocality is CMD_SET_LOCALITY.
func (v *VTPM) SetLocality(l uint8) uint32 {
	if l > vpcr.MaxLocality {
		return ptmBadLocality
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.locality = l
	if v.inf != nil {
		if err := v.inf.SetLocality(l); err != nil {
			v.log.Error("vtpm: locality not recorded; a takeover after a crash would use the old one", "err", err)
		}
	}
	return ptmSuccess
}

// running reports whether TPM commands run (after CMD_INIT, not stopped).
func (v *VTPM) running() bool { return !v.stopped && v.st.Phase() != vpcr.PhaseOff }

// SetBufferSize is CMD_SET_BUFFERSIZE: 0 queries, anything else is clamped
// to [MinBufferSize, MaxBufferSize]. It returns the size in use.
func (v *VTPM) SetBufferSize(n uint32) uint32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if n != 0 {
		v.bufSize = min(max(n, MinBufferSize), MaxBufferSize)
	}
	return v.bufSize
}

// BufferSize returns the negotiated buffer size.
func (v *VTPM) BufferSize() uint32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.bufSize
}

// Execute runs one TPM 2.0 command from the guest at the current locality
// and returns the response. It never panics and always returns a
// well-formed response of at most the negotiated buffer size. It blocks
// while the journal records a PCR change; ctx bounds that wait (on
// cancellation the guest gets TPM_RC_RETRY and nothing changed).
func (v *VTPM) Execute(ctx context.Context, cmd []byte) []byte {
	if err := v.waitAdopted(ctx); err != nil {
		return errorResponse(rcRetry)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.inf != nil {
		if err := v.inf.Begin(v.st.Seq(), cmd); err != nil {
			v.log.Error("vtpm: in-flight command not recorded; a crash now would lose it", "err", err)
		}
	}
	return v.executeLocked(ctx, cmd)
}

// executeLocked is Execute with v.mu held.
func (v *VTPM) executeLocked(ctx context.Context, cmd []byte) []byte {
	resp := v.execute(ctx, cmd)
	if len(resp) > int(v.bufSize) {
		v.log.Error("vtpm: response larger than the buffer; answering TPM_RC_FAILURE", "size", len(resp), "buffer", v.bufSize)
		resp = errorResponse(rcFailure)
	}
	if v.trace != nil {
		var cc uint32
		if len(cmd) >= headerSize {
			cc = uint32(cmd[6])<<24 | uint32(cmd[7])<<16 | uint32(cmd[8])<<8 | uint32(cmd[9])
		}
		v.trace(false, cc, uint32(resp[6])<<24|uint32(resp[7])<<16|uint32(resp[8])<<8|uint32(resp[9]))
	}
	return resp
}

// session is one parsed command authorization.
type session struct {
	handle uint32
	nonce  []byte
	attrs  uint8
	hmac   []byte
}

// request is a parsed command.
type request struct {
	cc       uint32
	handles  []uint32
	sessions []session
	params   reader
	locality uint8
}

type handler func(v *VTPM, ctx context.Context, req *request) (params []byte, rc uint32)

// command describes an implemented command.
type command struct {
	cc      uint32
	handles int // handles in the handle area
	auths   int // of those, how many need an authorization
	nv      bool
}

// commandTable lists the implemented commands in command-code order; every
// other command is TPM_RC_COMMAND_CODE. GetCapability(TPM_CAP_COMMANDS)
// reports exactly this table.
var commandTable = [...]command{
	{cc: ccHierarchyControl, handles: 1, auths: 1, nv: true},
	{cc: ccHierarchyChangeAuth, handles: 1, auths: 1, nv: true},
	{cc: ccPCRAllocate, handles: 1, auths: 1, nv: true},
	{cc: ccPCREvent, handles: 1, auths: 1},
	{cc: ccPCRReset, handles: 1, auths: 1},
	{cc: ccIncrementalSelfTest},
	{cc: ccSelfTest},
	{cc: ccStartup},
	{cc: ccShutdown, nv: true},
	{cc: ccStirRandom},
	{cc: ccGetCapability},
	{cc: ccGetRandom},
	{cc: ccGetTestResult},
	{cc: ccPCRRead},
	{cc: ccReadClock},
	{cc: ccPCRExtend, handles: 1, auths: 1},
}

// lookup returns the command's description and handler.
func lookup(cc uint32) (command, handler, bool) {
	var fn handler
	switch cc {
	case ccHierarchyControl:
		fn = (*VTPM).hierarchyControl
	case ccHierarchyChangeAuth:
		fn = (*VTPM).hierarchyChangeAuth
	case ccPCRAllocate:
		fn = (*VTPM).pcrAllocate
	case ccPCREvent:
		fn = (*VTPM).pcrEvent
	case ccPCRReset:
		fn = (*VTPM).pcrReset
	case ccIncrementalSelfTest:
		fn = (*VTPM).incrementalSelfTest
	case ccSelfTest:
		fn = (*VTPM).selfTest
	case ccStartup:
		fn = (*VTPM).startup
	case ccShutdown:
		fn = (*VTPM).shutdown
	case ccStirRandom:
		fn = (*VTPM).stirRandom
	case ccGetCapability:
		fn = (*VTPM).getCapability
	case ccGetRandom:
		fn = (*VTPM).getRandom
	case ccGetTestResult:
		fn = (*VTPM).getTestResult
	case ccPCRRead:
		fn = (*VTPM).pcrRead
	case ccReadClock:
		fn = (*VTPM).readClock
	case ccPCRExtend:
		fn = (*VTPM).pcrExtend
	default:
		return command{}, nil, false
	}
	for _, c := range commandTable {
		if c.cc == cc {
			return c, fn, true
		}
	}
	return command{}, nil, false
}

// maxSessions is the most authorization sessions a command may carry.
const maxSessions = 3

func (v *VTPM) execute(ctx context.Context, cmd []byte) []byte {
	if len(cmd) < headerSize {
		return errorResponse(rcCommandSize)
	}
	r := reader{b: cmd}
	tag, size, cc := r.u16(), r.u32(), r.u32()
	switch tag {
	case stNoSessions, stSessions:
	default: // including TPM 1.2's tpm12TagRquCommand (see there)
		return errorResponse(rcBadTag)
	}
	if int64(size) != int64(len(cmd)) {
		return errorResponse(rcCommandSize)
	}
	if !v.running() {
		// Like swtpm before CMD_INIT or after CMD_STOP. QEMU probes the
		// TPM version with a ReadClock here and only looks at the tag.
		return errorResponse(rcFailure)
	}
	switch phase := v.st.Phase(); {
	case v.replay:
		// The restored phase is the one after this command.
	case phase == vpcr.PhaseInit:
		if cc != ccStartup {
			return errorResponse(rcInitialize)
		}
	case phase == vpcr.PhaseRunning:
		if cc == ccStartup {
			// Startup is accepted once after TPM_Init; a Startup from the
			// guest's user space later resets nothing.
			return errorResponse(rcInitialize)
		}
	}
	c, fn, ok := lookup(cc)
	if !ok {
		return errorResponse(rcCommandCode)
	}
	req := &request{cc: cc, locality: v.locality}
	for range c.handles {
		req.handles = append(req.handles, r.u32())
	}
	if !r.ok() {
		return errorResponse(rcCommandSize)
	}
	if tag == stSessions {
		authSize := r.u32()
		area := r.take(int(authSize))
		if !r.ok() || authSize < 9 {
			return errorResponse(rcAuthsize)
		}
		ar := reader{b: area}
		for !ar.empty() {
			var s session
			s.handle = ar.u32()
			s.nonce, _ = ar.tpm2b(maxDigest)
			s.attrs = ar.u8()
			s.hmac, _ = ar.tpm2b(maxDigest)
			if !ar.ok() || len(req.sessions) == maxSessions {
				return errorResponse(rcAuthsize)
			}
			req.sessions = append(req.sessions, s)
		}
	}
	if len(req.sessions) < c.auths {
		return errorResponse(rcAuthMissing)
	}
	for i, s := range req.sessions {
		n := i + 1
		if s.handle != rsPW {
			// No HMAC or policy session can exist: StartAuthSession is
			// not implemented.
			return errorResponse(rcReferenceS0 + uint32(i))
		}
		if len(s.nonce) != 0 {
			return errorResponse(rcSession(rcNonce, n))
		}
		if s.attrs&^0x01 != 0 { // only continueSession
			return errorResponse(rcSession(rcAttributes, n))
		}
		if i >= c.auths {
			return errorResponse(rcAuthContext)
		}
	}
	req.params = r
	// Authorize: each auth handle against its password session.
	for i := 0; i < c.auths; i++ {
		want, rc := v.authValue(cc, req.handles[i], i+1)
		if rc != rcSuccess {
			return errorResponse(rc)
		}
		if !passwordEqual(req.sessions[i].hmac, want) {
			return errorResponse(rcSession(rcAuthFail, i+1))
		}
	}
	params, rc := fn(v, ctx, req)
	if rc != rcSuccess {
		return errorResponse(rc)
	}
	var w writer
	if tag == stSessions {
		w.u16(stSessions)
		w.u32(0) // size, patched below
		w.u32(rcSuccess)
		w.u32(uint32(len(params)))
		w.bytes(params)
		for range req.sessions {
			w.u16(0)   // nonceTPM
			w.u8(0x01) // continueSession
			w.u16(0)   // hmac
		}
	} else {
		w.u16(stNoSessions)
		w.u32(0)
		w.u32(rcSuccess)
		w.bytes(params)
	}
	putSize(w.b)
	return w.b
}

func putSize(b []byte) {
	n := uint32(len(b))
	b[2], b[3], b[4], b[5] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
}

// authValue returns the authValue of handle (the n-th handle of command cc),
// or the rc for a handle that is not valid there.
func (v *VTPM) authValue(cc, h uint32, n int) ([]byte, uint32) {
	switch cc {
	case ccPCRExtend, ccPCREvent:
		if h == rhNull || h < vpcr.NumPCRs {
			return nil, rcSuccess // PCRs have an empty authValue
		}
		return nil, rcHandleN(rcValue, n)
	case ccPCRReset:
		if h < vpcr.NumPCRs {
			return nil, rcSuccess
		}
		return nil, rcHandleN(rcValue, n)
	case ccPCRAllocate:
		if h != rhPlatform {
			return nil, rcHandleN(rcValue, n)
		}
	case ccHierarchyControl:
		if h != rhPlatform && h != rhOwner {
			return nil, rcHandleN(rcValue, n)
		}
	case ccHierarchyChangeAuth:
		if h != rhPlatform && h != rhOwner && h != rhEndorsement && h != rhLockout {
			return nil, rcHandleN(rcValue, n)
		}
	}
	if !v.hierarchyEnabled(h) {
		return nil, rcHandleN(rcHierarchy, n)
	}
	return v.auth[h], rcSuccess
}

func (v *VTPM) hierarchyEnabled(h uint32) bool {
	switch h {
	case rhPlatform:
		return v.phEnable
	case rhOwner:
		return v.shEnable
	case rhEndorsement:
		return v.ehEnable
	}
	return true
}

// passwordEqual compares a password with an authValue as a TPM does:
// trailing zero bytes do not count.
func passwordEqual(got, want []byte) bool {
	got, want = trimZeros(got), trimZeros(want)
	return subtle.ConstantTimeCompare(got, want) == 1
}

func trimZeros(b []byte) []byte {
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return b
}
