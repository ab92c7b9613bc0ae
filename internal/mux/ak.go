package mux

import (
	"crypto/x509"

	"github.com/tpmmux/tpmmux/internal/tpm"
)

// akEncoded returns the AK's PKIX DER and its PEM block, encoded once for
// the multiplexer's life (its TPM, and so its AK, never changes): every
// evidence carries the DER and every bridge evidence response the PEM, and
// encoding them per request was a fifth of the CPU of a 1000-verifier
// quote round. Either is nil if the key cannot be encoded.
func (m *Mux) akEncoded() (der, pem []byte) {
	m.akOnce.Do(func() {
		if d, err := x509.MarshalPKIXPublicKey(m.tpm.AK()); err == nil {
			m.akDER = d
		}
		if p, err := tpm.AKPEM(m.tpm.AK()); err == nil {
			m.akPEM = p
		}
	})
	return m.akDER, m.akPEM
}

// AKPEM returns the AK as a PKIX "PUBLIC KEY" PEM block (tpm.AKPEM),
// encoded once; the bytes are shared, callers must not change them. It is
// nil if the key cannot be encoded.
func (m *Mux) AKPEM() []byte {
	_, p := m.akEncoded()
	return p
}
