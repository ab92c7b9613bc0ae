package control

import (
	"context"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/enroll"
)

// The ops of AK enrollment and enforcement. A Handler serves them when it
// also implements EnrollHandler or ViolationHandler.
const (
	// OpEnrollRequest returns the host's enrollment request (EK
	// certificate, EK and AK public areas) for a verifier.
	OpEnrollRequest = "enroll-request"
	// OpEnrollAnswer has the TPM activate a verifier's credential
	// (Request.Challenge) and returns the secret.
	OpEnrollAnswer = "enroll-answer"
	// OpViolation tells the bridge that a verifier it trusts found a
	// violation on a VM (Request.VM, Reason, Detail); the bridge acts as
	// its configuration says and records each action in the VM's log.
	OpViolation = "violation"
)

// Bounds on a violation report.
const (
	MaxReason = 256
	MaxDetail = 4096
)

// EnrollHandler is the TPM side of AK enrollment.
type EnrollHandler interface {
	EnrollRequest(ctx context.Context) (*enroll.Request, error)
	EnrollAnswer(ctx context.Context, c *enroll.Challenge) (*enroll.Answer, error)
}

// ViolationHandler acts on a reported violation.
type ViolationHandler interface {
	Violation(ctx context.Context, vm, reason, detail string) (*Enforcement, error)
}

// Enforcement is what the bridge did about a violation.
type Enforcement struct {
	VM       string `json:"vm"`
	Instance string `json:"instance"` // hex
	Reason   string `json:"reason"`
	// Actions lists every configured action in order with its outcome.
	Actions []ActionResult `json:"actions"`
}

// ActionResult is one enforcement action's outcome.
type ActionResult struct {
	// Action is the configured action: log, webhook or pause.
	Action string `json:"action"`
	OK     bool   `json:"ok"`
	// Detail says what happened (or why it failed).
	Detail string `json:"detail,omitempty"`
	// Seq is the number of the action record in the VM's log (every
	// action, done or failed, is recorded); unset when recording failed.
	Seq     *uint64  `json:"record_seq,omitempty"`
	Elapsed Duration `json:"elapsed"`
}

// Duration is a time.Duration written as a Go duration string.
type Duration time.Duration

// MarshalJSON writes the duration as a string ("1.5ms").
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if len(b) < 2 || b[0] != '"' || b[len(b)-1] != '"' {
		return fmt.Errorf("duration: want a string")
	}
	v, err := time.ParseDuration(string(b[1 : len(b)-1]))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// dispatchExt serves the ops of this file.
func (s *Server) dispatchExt(ctx context.Context, req *Request, resp *Response) error {
	switch req.Op {
	case OpEnrollRequest, OpEnrollAnswer:
		h, ok := s.Handler.(EnrollHandler)
		if !ok {
			return fmt.Errorf("op %q: this bridge does not do AK enrollment", req.Op)
		}
		var err error
		if req.Op == OpEnrollRequest {
			resp.Enrollment, err = h.EnrollRequest(ctx)
		} else {
			if req.Challenge == nil {
				return fmt.Errorf("op %q: no challenge", req.Op)
			}
			resp.Answer, err = h.EnrollAnswer(ctx, req.Challenge)
		}
		return err
	case OpViolation:
		h, ok := s.Handler.(ViolationHandler)
		if !ok {
			return fmt.Errorf("op %q: this bridge does not enforce", req.Op)
		}
		if req.VM == "" || req.Reason == "" {
			return fmt.Errorf("violation: vm and reason are required")
		}
		if len(req.Reason) > MaxReason || len(req.Detail) > MaxDetail {
			return fmt.Errorf("violation: reason of %d bytes (at most %d), detail of %d bytes (at most %d)", len(req.Reason), MaxReason, len(req.Detail), MaxDetail)
		}
		var err error
		resp.Enforcement, err = h.Violation(ctx, req.VM, req.Reason, req.Detail)
		return err
	case OpMigrate:
		return s.dispatchMigrate(ctx, req, resp)
	}
	return fmt.Errorf("unknown op %q", req.Op)
}
