// Package migrate is the bridge-to-bridge handover of a VM's identity in a
// live migration (docs/migration.md). The destination bridge reserves the
// VM at the source when libvirt's "migrate begin" hook runs, then waits for
// the handover; the source answers once libvirt reports the VM stopped with
// reason "migrated": it wraps a fresh secret to the destination's TPM
// (TPM2_MakeCredential to the EK and AK name of the destination's enrolled
// record), seals the VM's identity with it, ends the VM's segment
// (mux MigrateOut) and sends the sealed identity with the final evidence of
// the chain. Only the destination's TPM can activate the secret, so K never
// leaves a bridge in clear. The channel is mutual TLS 1.3 in which each side
// pins the other's certificate hash from its configuration.
package migrate

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Config is the "migration" block of the bridge's configuration.
type Config struct {
	// Listen is the TCP address the bridge serves its peers on, e.g.
	// "0.0.0.0:7710"; "" serves none (this bridge can then only be a
	// destination).
	Listen string `json:"listen"`
	// Cert and Key are the bridge's migration TLS certificate and key
	// (PEM). Unset: STATE_DIR/migration/cert.pem and key.pem, made on
	// first start (tpmmux-bridge migration-cert prints the hash peers pin).
	Cert string `json:"cert"`
	Key  string `json:"key"`
	// EKCA is the PEM bundle of EK CA certificates the peers' enrolled
	// records are re-checked against (as tpmmux-verify --ek-ca).
	EKCA string `json:"ek_ca"`
	// Peers are the bridges this one migrates VMs to and from.
	Peers Peers `json:"peers"`
	// HandoverTimeout bounds how long a destination waits for the source's
	// handover after reserving (default 10m: a live migration of a large
	// VM takes minutes).
	HandoverTimeout string `json:"handover_timeout"`
}

// Peer is another bridge.
type Peer struct {
	// Name is the peer's host name, as its records name it.
	Name string `json:"name"`
	// Address is its migration listener, host:port; "" for a peer that
	// serves none (a destination only: VMs are handed to it, never
	// reserved from it).
	Address string `json:"address"`
	// TLSSHA256 is the hex sha256 of its migration certificate's DER
	// (tpmmux-bridge migration-cert on that host prints it).
	TLSSHA256 string `json:"tls_sha256"`
	// Enrolled is the path of its enrolled AK record (enroll.Record,
	// docs/trust.md): the EK a handover to it is wrapped to, and the AK its
	// evidence is checked with.
	Enrolled string `json:"enrolled"`
}

// Enabled reports whether the block is configured: a listener or peers.
// Without it the bridge takes part in no migration (an incoming attested
// VM is refused at "migrate begin").
func (c *Config) Enabled() bool { return c.Listen != "" || len(c.Peers) > 0 }

// Peers is the peer list; it decodes each peer strictly.
type Peers []Peer

// UnmarshalJSON decodes the list, naming the peer a bad key is in.
func (ps *Peers) UnmarshalJSON(b []byte) error {
	var raw []json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("want a list of peers [{\"name\", \"address\", \"tls_sha256\", \"enrolled\"}, …]")
	}
	out := make(Peers, len(raw))
	for i, r := range raw {
		if err := out[i].UnmarshalJSON(r); err != nil {
			return fmt.Errorf("[%d]: %w", i, err)
		}
	}
	*ps = out
	return nil
}

// UnmarshalJSON decodes a peer strictly: a misspelt key is an error, not a
// peer without its pin.
func (p *Peer) UnmarshalJSON(b []byte) error {
	type plain Peer
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	var v plain
	if err := d.Decode(&v); err != nil {
		return fmt.Errorf("migration peer: %w (keys: name, address, tls_sha256, enrolled)", err)
	}
	*p = Peer(v)
	return nil
}

// DefaultHandoverTimeout is Config.HandoverTimeout's default.
const DefaultHandoverTimeout = 10 * time.Minute

// Validate checks the block's shape (not the files it names) and says what
// to fix.
func (c *Config) Validate() error {
	if c.HandoverTimeout != "" {
		if d, err := time.ParseDuration(c.HandoverTimeout); err != nil || d <= 0 {
			return fmt.Errorf("migration.handover_timeout %q: want a duration such as \"10m\"", c.HandoverTimeout)
		}
	}
	if (c.Cert == "") != (c.Key == "") {
		return errors.New("migration: set both cert and key, or neither (the bridge then makes its own under state_dir)")
	}
	if len(c.Peers) > 0 && c.EKCA == "" {
		return errors.New("migration.ek_ca is required with peers: the PEM bundle of EK CAs the peers' enrolled records chain to")
	}
	seen := map[string]bool{}
	for i, p := range c.Peers {
		if p.Name == "" || p.Enrolled == "" {
			return fmt.Errorf("migration.peers[%d]: name, tls_sha256 and enrolled are required (address too, unless the peer has no migration listener: a destination only)", i)
		}
		if _, err := parsePin(p.TLSSHA256); err != nil {
			return fmt.Errorf("migration.peers[%d] (%s): tls_sha256: %w", i, p.Name, err)
		}
		if seen[p.Name] {
			return fmt.Errorf("migration.peers: %q listed twice", p.Name)
		}
		seen[p.Name] = true
	}
	return nil
}

func (c *Config) handoverTimeout() time.Duration {
	if d, err := time.ParseDuration(c.HandoverTimeout); err == nil && d > 0 {
		return d
	}
	return DefaultHandoverTimeout
}

func parsePin(s string) ([32]byte, error) {
	var pin [32]byte
	b, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(s), ":", ""))
	if err != nil || len(b) != 32 {
		return pin, fmt.Errorf("%q is not 64 hex digits (the sha256 tpmmux-bridge migration-cert prints on the peer)", s)
	}
	copy(pin[:], b)
	return pin, nil
}

// CertPaths returns the certificate and key files: the configured ones, or
// the generated ones under stateDir.
func (c *Config) CertPaths(stateDir string) (cert, key string) {
	if c.Cert != "" {
		return c.Cert, c.Key
	}
	d := filepath.Join(stateDir, "migration")
	return filepath.Join(d, "cert.pem"), filepath.Join(d, "key.pem")
}

// LoadCert loads the migration certificate, making a self-signed ECDSA
// P-256 one (key mode 0600) under stateDir when none is configured and none
// was made yet. It returns the certificate and the hex sha256 of its DER,
// which peers pin.
func (c *Config) LoadCert(stateDir, host string) (tls.Certificate, string, error) {
	certPath, keyPath := c.CertPaths(stateDir)
	if c.Cert == "" {
		if _, err := os.Stat(certPath); errors.Is(err, os.ErrNotExist) {
			if err := makeCert(certPath, keyPath, host); err != nil {
				return tls.Certificate{}, "", err
			}
		}
	}
	crt, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("migration certificate %s / key %s: %w", certPath, keyPath, err)
	}
	sum := sha256.Sum256(crt.Certificate[0])
	return crt, hex.EncodeToString(sum[:]), nil
}

// CertSHA256 returns the hex sha256 of the migration certificate's DER,
// making the certificate first if needed (tpmmux-bridge migration-cert).
func (c *Config) CertSHA256(stateDir, host string) (string, error) {
	_, pin, err := c.LoadCert(stateDir, host)
	return pin, err
}

func makeCert(certPath, keyPath, host string) error {
	if err := os.MkdirAll(filepath.Dir(certPath), 0o700); err != nil {
		return fmt.Errorf("migration certificate directory: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "tpmmux-bridge migration " + host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(20, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return fmt.Errorf("write migration key: %w", err)
	}
	if err := writeFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("write migration certificate: %w", err)
	}
	return nil
}

// writeFile writes b to path atomically and durably (temporary file,
// fsync, rename, fsync of the directory).
func writeFile(path string, b []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(b)
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr, os.Chmod(tmp.Name(), mode)); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
