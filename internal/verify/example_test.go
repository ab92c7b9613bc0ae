package verify_test

import (
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// A tenant verifies its VM's evidence against a Keylime runtime policy.
// The inputs are what a tenant holds: the evidence the bridge returned
// (tpmmux-bridge evidence, or the guest agent), the nonce it sent for it,
// the VM's identity with its key (from the VM's owner), and the host's
// attestation key, which it trusts (tpmmux-verify enroll).
func ExampleVerify() {
	ev, nonce, ident, ak := tenantInputs()

	// The policy allows tools 1 to 11 whatever their digest (excludes), and
	// tool 12 only with a digest the VM did not measure.
	rt, err := policy.Parse([]byte(`{
		"digests": {"/opt/vm-b/bin/tool-012": ["` + zeros + `"]},
		"excludes": ["^/opt/vm-b/bin/tool-0(0[1-9]|1[01])$"]
	}`))
	if err != nil {
		fmt.Println(err)
		return
	}
	rep, err := verify.Verify(ev, verify.Options{
		Nonce:     nonce,
		Identity:  ident,
		AK:        ak,
		PCR:       13, // the host's anchor PCR (the default)
		Appraiser: policy.New(rt, nil),
	})
	var rj *verify.Rejection
	switch {
	case err == nil:
		fmt.Println("trusted")
	case errors.As(err, &rj):
		fmt.Println("rejected at step", rj.Step)
	default:
		fmt.Println("cannot verify:", err) // bad input, not a verdict
		return
	}
	fmt.Printf("%s: %d records, %d measurements, fresh %v\n", rep.VM.Name, rep.Records, rep.Counts.Measurements, rep.Fresh)
	for _, v := range rep.Violations {
		fmt.Printf("record %d: %s: %s\n", v.Seq, v.Path, v.Reason)
	}
	// Output:
	// rejected at step 5
	// vm-b: 13 records, 12 measurements, fresh true
	// record 12: /opt/vm-b/bin/tool-012: digest not allowed for this path
}

// zeros is a SHA-256 digest no file has.
const zeros = "0000000000000000000000000000000000000000000000000000000000000000"
