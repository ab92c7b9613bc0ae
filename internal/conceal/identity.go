package conceal

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
)

// Identity is a VM instance's concealment identity: the libvirt domain UUID,
// the random instance number of this start, and the secret K. The first two
// are public; K is given only to the VM and its owner.
type Identity struct {
	UUID     [16]byte
	Instance [16]byte
	Key      Key
}

// NewIdentity draws a fresh instance number and key for the domain uuid.
func NewIdentity(uuid [16]byte) (*Identity, error) {
	id := &Identity{UUID: uuid}
	if _, err := rand.Read(id.Instance[:]); err != nil {
		return nil, fmt.Errorf("draw instance: %w", err)
	}
	if _, err := rand.Read(id.Key[:]); err != nil {
		return nil, fmt.Errorf("draw key: %w", err)
	}
	return id, nil
}

// ID returns the public instance identifier id.
func (i *Identity) ID() Digest { return ID(i.UUID, i.Instance) }

// Keys derives the identity's K_tag and K_mac.
func (i *Identity) Keys() *Keys { return Derive(i.Key) }

// identityJSON is the identity.json form: uuid in its canonical text form,
// instance and key as hex.
type identityJSON struct {
	UUID     string `json:"uuid"`
	Instance string `json:"instance"`
	Key      string `json:"key,omitempty"`
	ID       string `json:"id,omitempty"`
}

// MarshalJSON writes {"uuid","instance","key","id"}; id is informational.
func (i Identity) MarshalJSON() ([]byte, error) {
	id := i.ID()
	return json.Marshal(identityJSON{
		UUID:     FormatUUID(i.UUID),
		Instance: hex.EncodeToString(i.Instance[:]),
		Key:      hex.EncodeToString(i.Key[:]),
		ID:       hex.EncodeToString(id[:]),
	})
}

// UnmarshalJSON reads the identity.json form. The id field, if present, must
// match the one derived from uuid and instance.
func (i *Identity) UnmarshalJSON(b []byte) error {
	var j identityJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	u, err := ParseUUID(j.UUID)
	if err != nil {
		return fmt.Errorf("identity uuid: %w", err)
	}
	var out Identity
	out.UUID = u
	if err := decodeFixed(out.Instance[:], j.Instance); err != nil {
		return fmt.Errorf("identity instance: %w", err)
	}
	if err := decodeFixed(out.Key[:], j.Key); err != nil {
		return fmt.Errorf("identity key: %w", err)
	}
	if j.ID != "" {
		want := out.ID()
		if !strings.EqualFold(j.ID, hex.EncodeToString(want[:])) {
			return fmt.Errorf("identity id %s does not match uuid and instance", j.ID)
		}
	}
	*i = out
	return nil
}

func decodeFixed(dst []byte, s string) error {
	b, err := hex.DecodeString(s)
	if err != nil {
		return err
	}
	if len(b) != len(dst) {
		return fmt.Errorf("%d bytes, want %d", len(b), len(dst))
	}
	copy(dst, b)
	return nil
}

// ParseUUID parses a UUID in its 8-4-4-4-12 text form (as libvirt prints
// it) or as 32 hex digits.
func ParseUUID(s string) ([16]byte, error) {
	var u [16]byte
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 || (len(s) != 32 && len(s) != 36) {
		return u, fmt.Errorf("uuid %q is not 32 hex digits", s)
	}
	if len(s) == 36 && (s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') {
		return u, fmt.Errorf("uuid %q is not in 8-4-4-4-12 form", s)
	}
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, fmt.Errorf("uuid %q: %w", s, err)
	}
	return u, nil
}

// FormatUUID prints a UUID in its 8-4-4-4-12 text form.
func FormatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
