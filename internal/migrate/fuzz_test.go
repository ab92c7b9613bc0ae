package migrate

import (
	"encoding/json"
	"testing"
)

// FuzzMessages feeds untrusted bytes to the decoders a peer reaches: the
// strict request decoder and the answer decoder, then the sealed box.
func FuzzMessages(f *testing.F) {
	f.Add([]byte(`{"uuid":"6f1a0b2c-3d4e-5f60-7182-93a4b5c6d7e8","name":"vm","dest_host":"b","nonce":"` + string(make([]byte, 0)) + `"}`))
	f.Add([]byte(`{"uuid":"x","nonce":"00"}`))
	f.Add([]byte(`{"credential":{"ek_kind":"rsa","blob":"AAE=","encrypted_secret":"AA=="},"sealed":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}`))
	secret := make([]byte, SecretSize)
	f.Fuzz(func(t *testing.T, b []byte) {
		var r ReserveRequest
		_ = decodeStrict(b, &r)
		var h HandoverRequest
		_ = decodeStrict(b, &h)
		var a Handover
		if json.Unmarshal(b, &a) == nil {
			if _, err := Open(secret, a.Sealed, &Binding{}); err == nil {
				t.Fatal("a fuzzed box opened")
			}
			_ = a.Credential.Digest()
		}
		if _, err := Open(secret, b, &Binding{}); err == nil {
			t.Fatal("fuzzed bytes opened")
		}
	})
}
