// Package control is the bridge's local control protocol: the libvirt hook
// (tpmmux-hook) and the admin commands (tpmmux-bridge status, vms,
// evidence) talk to the running bridge over one unix socket, by default
// /run/tpmmux/control.sock, mode 0600, owned by root.
//
// One connection carries one JSON request and one JSON response, each a
// single JSON value, then the bridge closes it. Both sides bound the
// exchange in time: the client with its context's deadline (which it also
// sends, so the bridge does not work on past it), the server with its own
// timeout. The server accepts only peers running as root (SO_PEERCRED), in
// addition to the socket's file mode.
//
// Ops and their fields:
//
//	prepare   {xml}            → vm: identity created, listeners open
//	started   {name, xml}      → vm (the live XML may carry an auto-assigned vsock CID)
//	stopped   {name, reason}   → nothing (teardown follows, see the daemon)
//	release   {name, reason}   → nothing (teardown with reason)
//	reconnect {xml}            → vm: a running VM re-adopted after a libvirtd restart
//	status    {}               → status
//	vms       {all}            → vms
//	evidence  {vm, nonce, since} → evidence (binary CBOR, base64 in JSON), identity, AK PEM;
//	                             with since, only what follows that verifier checkpoint
//	enroll-request {}          → enrollment: EK certificate, EK and AK public areas (ext.go)
//	enroll-answer  {challenge} → answer: the secret the TPM released
//	violation {vm, reason, detail} → enforcement: the actions taken
//	migrate   {name, xml}      → vm: an incoming domain reserved at its source (migrate.go)
package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/evidence"
)

// DefaultSocket is where the bridge listens for control requests.
const DefaultSocket = "/run/tpmmux/control.sock"

// The ops.
const (
	OpPrepare   = "prepare"
	OpStarted   = "started"
	OpStopped   = "stopped"
	OpRelease   = "release"
	OpReconnect = "reconnect"
	OpStatus    = "status"
	OpVMs       = "vms"
	OpEvidence  = "evidence"
)

// Size limits of one exchange. A request carries at most a domain XML
// (libvirt.MaxDomainXML, 1 MiB; JSON escaping can grow it); a response can
// carry evidence with the whole public log of an epoch.
const (
	MaxRequest  = 8 << 20
	MaxResponse = 1 << 30
)

// Request is one control request.
type Request struct {
	Op string `json:"op"`
	// XML is the domain XML (prepare, started, reconnect).
	XML string `json:"xml,omitempty"`
	// Name is the domain name (started, stopped, release).
	Name string `json:"name,omitempty"`
	// Reason is why a domain stopped (stopped, release): libvirt's shutoff
	// reason when it gives one.
	Reason string `json:"reason,omitempty"`
	// VM names the VM (evidence).
	VM string `json:"vm,omitempty"`
	// Nonce is the verifier's nonce (evidence), 1 to 64 bytes.
	Nonce []byte `json:"nonce,omitempty"`
	// Since asks for evidence after a verifier's checkpoint
	// (verify.Checkpoint.Since) instead of full evidence (evidence).
	Since *evidence.Since `json:"since,omitempty"`
	// All lists ended VM instances too (vms).
	All bool `json:"all,omitempty"`
	// FailOpen says the client starts the domain even without an answer
	// (the hook's policy), so the bridge keeps an identity it created
	// after the client stopped waiting; otherwise it undoes it.
	FailOpen bool `json:"fail_open,omitempty"`
	// Deadline is when the client stops waiting (set by Client.Call).
	Deadline time.Time `json:"deadline,omitzero"`
	// Detail describes a violation (violation).
	Detail string `json:"detail,omitempty"`
	// Challenge is a verifier's enrollment challenge (enroll-answer).
	Challenge *enroll.Challenge `json:"challenge,omitempty"`
}

// Response is the answer to one request. Error is set when the request
// failed; the result fields are set by op.
type Response struct {
	Error    string    `json:"error,omitempty"`
	VM       *VM       `json:"vm,omitempty"`
	Status   *Status   `json:"status,omitempty"`
	VMs      []VM      `json:"vms,omitempty"`
	Evidence *Evidence `json:"evidence,omitempty"`
	// Enrollment, Answer and Enforcement are the results of
	// enroll-request, enroll-answer and violation (ext.go).
	Enrollment  *enroll.Request `json:"enrollment,omitempty"`
	Answer      *enroll.Answer  `json:"answer,omitempty"`
	Enforcement *Enforcement    `json:"enforcement,omitempty"`
}

// Listener is one of a VM's guest channels on the host.
type Listener struct {
	Kind string `json:"kind"` // vsock, virtio-serial, unix
	Addr string `json:"addr"`
}

// VM describes a VM instance.
type VM struct {
	Name      string     `json:"name"`
	UUID      string     `json:"uuid"`
	Instance  string     `json:"instance,omitempty"` // hex
	ID        string     `json:"id,omitempty"`       // hex of the public instance id
	CID       uint32     `json:"cid,omitempty"`
	Epoch     uint64     `json:"epoch,omitempty"`
	Records   uint64     `json:"records"`
	Live      bool       `json:"live"`
	EndedBy   string     `json:"ended_by,omitempty"`
	Listeners []Listener `json:"listeners,omitempty"`
	Sessions  int        `json:"sessions,omitempty"`
	// Skipped is set when the bridge did not give the domain an identity
	// (opted out by the bridge's policy, or a failure under fail_open);
	// Note says why.
	Skipped bool   `json:"skipped,omitempty"`
	Note    string `json:"note,omitempty"`
	// Warning is set on a live instance that no guest transport reaches
	// (no virtio-serial channel and no usable vsock): its log can hold no
	// measurements, only what the host records.
	Warning string `json:"warning,omitempty"`
}

// Status is the bridge's state.
type Status struct {
	Version       string    `json:"version"`
	Host          string    `json:"host"`
	TPM           string    `json:"tpm"`
	Started       time.Time `json:"started"`
	Epoch         uint64    `json:"epoch"`
	Batches       uint64    `json:"batches"`
	Entries       uint64    `json:"entries"`
	PCR           int       `json:"pcr"`
	PCRValue      string    `json:"pcr_value"` // hex
	HostPCRs      []int     `json:"host_pcrs"`
	LiveVMs       int       `json:"live_vms"`
	Queued        int       `json:"queued"`
	Fault         string    `json:"fault,omitempty"`
	Records       uint64    `json:"records"`
	Extends       uint64    `json:"extends"`
	Quotes        uint64    `json:"quotes"`
	MaxBatch      int       `json:"max_batch"`
	Listeners     int       `json:"listeners"`
	Sessions      int64     `json:"sessions"`
	Refused       uint64    `json:"refused"`
	Vsock         bool      `json:"vsock"`
	VsockNote     string    `json:"vsock_note,omitempty"`
	ControlSocket string    `json:"control_socket"`
	SerialDir     string    `json:"serial_dir"`
	Metrics       string    `json:"metrics,omitempty"`
	Mode          string    `json:"mode"`
	// Migration is the live-migration listener and the sha256 of the
	// bridge's migration certificate, which peers pin (docs/migration.md).
	Migration *MigrationStatus `json:"migration,omitempty"`
}

// MigrationStatus is the bridge's live-migration side.
type MigrationStatus struct {
	Listen     string   `json:"listen,omitempty"`
	CertSHA256 string   `json:"cert_sha256"`
	Peers      []string `json:"peers"`
	Reserved   int      `json:"reserved"` // VMs reserved here by a destination
	Incoming   int      `json:"incoming"` // incoming VMs waiting for their handover
}

// Evidence is a VM's evidence with what a verifier needs besides it.
type Evidence struct {
	VM string `json:"vm"`
	// Evidence is the evidence in its binary (CBOR) form.
	Evidence []byte `json:"evidence"`
	// Identity is the VM instance's concealment identity, secret included:
	// only root on the host (the VM owner's authority) gets it.
	Identity conceal.Identity `json:"identity"`
	// AKPEM is the attestation key, a PKIX PEM block.
	AKPEM string `json:"ak_pem"`
	// PostMortem is set when the VM has ended and the evidence is the final
	// quote the bridge kept at its teardown (verify with --post-mortem).
	PostMortem bool `json:"post_mortem,omitempty"`
}

// RemoteError is an error the bridge answered with.
type RemoteError struct {
	Op  string
	Msg string
}

func (e *RemoteError) Error() string { return e.Msg }

// UnreachableError is a failure to get any answer from the bridge: no
// socket, nobody listening, or no answer in time.
type UnreachableError struct {
	Path string
	Err  error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("bridge not answering on %s: %v", e.Path, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// IsUnreachable reports whether err says the bridge gave no answer.
func IsUnreachable(err error) bool {
	var u *UnreachableError
	return errors.As(err, &u)
}

// encodeJSON encodes v as one line of JSON without HTML escaping (a domain
// XML would otherwise grow sixfold).
func encodeJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
