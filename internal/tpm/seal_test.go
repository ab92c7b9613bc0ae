package tpm

import (
	"bytes"
	"context"
	"testing"
)

func TestSealUnseal(t *testing.T) {
	ctx := context.Background()
	tp, err := Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	s, ok := tp.(Sealer)
	if !ok {
		t.Fatal("sim backend is not a Sealer")
	}
	secret := bytes.Repeat([]byte{0x5a}, 32)
	blob, err := s.Seal(ctx, secret)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(blob, secret) {
		t.Fatal("the blob holds the secret in clear")
	}
	got, err := s.Unseal(ctx, blob)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("unseal: %x %v", got, err)
	}
	// A damaged blob does not open.
	bad := append([]byte(nil), blob...)
	bad[len(bad)-5] ^= 1
	if _, err := s.Unseal(ctx, bad); err == nil {
		t.Fatal("a damaged blob unsealed")
	}
	if _, err := s.Unseal(ctx, []byte{0, 9}); err == nil {
		t.Fatal("a malformed blob unsealed")
	}
	if _, err := s.Seal(ctx, make([]byte, 129)); err == nil {
		t.Fatal("sealed 129 bytes")
	}
}
