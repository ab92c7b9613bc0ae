package enroll

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// maxRecords bounds how many enrolled AKs a store directory may hold when
// it is listed.
const maxRecords = 100000

// Check re-checks an enrolled AK at verification time: its EK certificate
// still chains to one of roots (the verifier's EK CA now, which need not be
// the file it enrolled with), and its AK has the required attributes. It
// returns the AK.
func (r *Record) Check(roots *x509.CertPool, now time.Time) (*ecdsa.PublicKey, error) {
	if r.Version != Version {
		return nil, fmt.Errorf("enrolled AK record version %d, want %d", r.Version, Version)
	}
	cert, _, err := ParseEKCert([]byte(r.EKCert))
	if err != nil {
		return nil, err
	}
	if err := VerifyEKCert(cert, roots, now); err != nil {
		return nil, err
	}
	key, name, err := CheckAK(r.AKPublic)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(name, r.AKName) {
		return nil, errors.New("enrolled AK record is inconsistent: its AK name is not its AK's")
	}
	return key, nil
}

// Save stores rec in dir (created 0755 if missing) as
// ak-<sha256 of the AK's PKIX DER>.json, replacing an earlier enrollment of
// the same AK, and returns the path.
func Save(dir string, rec *Record) (string, error) {
	key, _, err := CheckAK(rec.AKPublic)
	if err != nil {
		return "", err
	}
	fp, err := AKFingerprint(key)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, "ak-"+fp+".json")
	if err := WriteJSON(path, rec, 0o644); err != nil {
		return "", err
	}
	return path, nil
}

// ReadRecord reads one enrolled AK record.
func ReadRecord(path string) (*Record, error) {
	var r Record
	if err := ReadJSON(path, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// NotEnrolledError says the store has no usable enrollment for an AK.
type NotEnrolledError struct {
	Dir, Fingerprint string
}

func (e *NotEnrolledError) Error() string {
	if e.Fingerprint == "" {
		return fmt.Sprintf("no AK is enrolled in %s", e.Dir)
	}
	return fmt.Sprintf("the evidence's AK (sha256 %s) is not enrolled in %s", e.Fingerprint[:16], e.Dir)
}

// Lookup finds the enrolled record of ak in dir and re-checks it (Check)
// against roots at now. With ak nil it takes the store's only record (and
// fails when there are several).
func Lookup(dir string, ak *ecdsa.PublicKey, roots *x509.CertPool, now time.Time) (*Record, *ecdsa.PublicKey, error) {
	var rec *Record
	if ak != nil {
		fp, err := AKFingerprint(ak)
		if err != nil {
			return nil, nil, err
		}
		r, err := ReadRecord(filepath.Join(dir, "ak-"+fp+".json"))
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, &NotEnrolledError{Dir: dir, Fingerprint: fp}
		}
		if err != nil {
			return nil, nil, err
		}
		rec = r
	} else {
		all, err := List(dir)
		if err != nil {
			return nil, nil, err
		}
		switch len(all) {
		case 0:
			return nil, nil, &NotEnrolledError{Dir: dir}
		case 1:
			rec = all[0]
		default:
			return nil, nil, fmt.Errorf("%d AKs are enrolled in %s and the evidence names none", len(all), dir)
		}
	}
	key, err := rec.Check(roots, now)
	if err != nil {
		return nil, nil, err
	}
	if ak != nil && !key.Equal(ak) {
		return nil, nil, fmt.Errorf("enrolled AK record in %s is for another AK than its file name says", dir)
	}
	return rec, key, nil
}

// List reads every enrolled AK record in dir.
func List(dir string) ([]*Record, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []*Record
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "ak-") || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		if len(out) == maxRecords {
			return nil, fmt.Errorf("more than %d enrolled AKs in %s", maxRecords, dir)
		}
		r, err := ReadRecord(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// ReadJSON reads one JSON value of at most MaxFile bytes from path into v,
// refusing unknown fields and trailing data.
func ReadJSON(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxFile+1))
	if err != nil {
		return err
	}
	if len(b) > MaxFile {
		return fmt.Errorf("%s: larger than %d bytes", path, MaxFile)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if dec.More() {
		return fmt.Errorf("%s: more than one JSON value", path)
	}
	return nil
}

// WriteJSON writes v as indented JSON to path with mode (through a
// temporary file in the same directory, so a reader never sees half).
func WriteJSON(path string, v any, mode os.FileMode) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(append(b, '\n'))
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), mode)); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}
