package mux

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Secrets at rest: each VM's key K is stored encrypted (AES-256-GCM, the VM
// id as associated data) under one data key, and the data key is stored
// only sealed to the TPM. A copy of the state directory alone therefore
// reveals no K, and a store moved to another TPM does not open.

// ErrForgotten reports a VM whose key the retention policy destroyed.
var ErrForgotten = errors.New("vm key destroyed after its retention period")

// openDataKey unseals the store's data key, or makes and seals one for a
// new store. Without a sealer the keys stay in clear (tests, and the
// simulator demo); Status says so.
func (m *Mux) openDataKey(ctx context.Context) error {
	s := m.cfg.Sealer
	if s == nil {
		s, _ = m.tpm.(tpm.Sealer)
	}
	if s == nil {
		m.log.Warn("TPM cannot seal: VM keys are stored in clear")
		return nil
	}
	blob, err := m.store.SealedDataKey()
	if err != nil {
		return err
	}
	var key []byte
	if blob == nil {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return fmt.Errorf("draw data key: %w", err)
		}
		if blob, err = s.Seal(ctx, key); err != nil {
			return fmt.Errorf("seal data key: %w", err)
		}
		if err := m.store.PutSealedDataKey(blob); err != nil {
			return err
		}
	} else if key, err = s.Unseal(ctx, blob); err != nil {
		return fmt.Errorf("unseal the store's data key (was this state directory made with another TPM?): %w", err)
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		return fmt.Errorf("data key: %w", err)
	}
	m.aead, err = cipher.NewGCM(blk)
	return err
}

// wrapKey stores K in vm: encrypted when a data key exists.
func (m *Mux) wrapKey(vm *logstore.VM, k conceal.Key) error {
	if m.aead == nil {
		vm.Key = k
		return nil
	}
	nonce := make([]byte, m.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return fmt.Errorf("wrap key: %w", err)
	}
	vm.WrappedKey = m.aead.Seal(nonce, nonce, k[:], vm.ID[:])
	vm.Key = [32]byte{}
	return nil
}

// unwrapKey returns vm's K.
func (m *Mux) unwrapKey(vm *logstore.VM) (conceal.Key, error) {
	var k conceal.Key
	switch {
	case vm.Forgotten:
		return k, fmt.Errorf("vm %s: %w", vm.Name, ErrForgotten)
	case vm.WrappedKey == nil:
		if m.aead != nil && vm.Key == ([32]byte{}) {
			return k, fmt.Errorf("vm %s has no key", vm.Name)
		}
		return conceal.Key(vm.Key), nil
	case m.aead == nil:
		return k, fmt.Errorf("vm %s: its key is sealed, and this TPM cannot unseal", vm.Name)
	}
	ns := m.aead.NonceSize()
	if len(vm.WrappedKey) < ns {
		return k, fmt.Errorf("vm %s: wrapped key too short", vm.Name)
	}
	plain, err := m.aead.Open(nil, vm.WrappedKey[:ns], vm.WrappedKey[ns:], vm.ID[:])
	if err != nil || len(plain) != 32 {
		return k, fmt.Errorf("vm %s: unwrap key: corrupted or not this store's", vm.Name)
	}
	copy(k[:], plain)
	return k, nil
}

// KeysSealed reports whether VM keys are stored sealed to the TPM.
func (m *Mux) KeysSealed() bool { return m.aead != nil }

// ForgetExpired destroys the keys and records of VMs that ended more than
// the configured retention ago, compacts the store so the file keeps no
// copy of them, and returns how many it forgot. The daemon
// calls it periodically; with no retention configured it does nothing.
func (m *Mux) ForgetExpired(now time.Time) (int, error) {
	if m.cfg.KeyRetention <= 0 {
		return 0, nil
	}
	var expired [][32]byte
	err := m.store.View(func(sn *logstore.Snapshot) error {
		return sn.VMs(func(vm *logstore.VM) error {
			if vm.Ended && !vm.Forgotten && vm.EndedAt != 0 && now.Sub(time.Unix(0, vm.EndedAt)) >= m.cfg.KeyRetention {
				expired = append(expired, vm.ID)
			}
			return nil
		})
	})
	if err != nil {
		return 0, err
	}
	for _, id := range expired {
		if err := m.store.Forget(id); err != nil {
			return 0, err
		}
		m.log.Info("vm key destroyed after retention", "id", fmt.Sprintf("%x", id[:6]))
	}
	if len(expired) > 0 {
		// bbolt reuses freed pages but does not wipe them: only a rewrite
		// of the file leaves no copy of the forgotten VMs' keys and records.
		start := time.Now()
		if err := m.store.Compact(); err != nil {
			return len(expired), fmt.Errorf("compact after forgetting %d vm(s): %w", len(expired), err)
		}
		m.log.Info("log store compacted: no copy of the forgotten VMs remains", "count", len(expired), "elapsed", time.Since(start).Round(time.Millisecond))
	}
	return len(expired), nil
}
