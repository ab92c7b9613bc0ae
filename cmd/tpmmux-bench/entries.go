package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// pool is a set of real ima-ng entries: files of this machine, hashed as
// the guest kernel would (SHA-256 file digest, path), in the binary form
// IMA logs them, with the SHA-1 template hash.
type pool struct {
	entries []ima.Entry
	wire    []wire.Entry
}

// maxPoolFile bounds the size of a file hashed into the pool, to keep the
// benchmark's start-up quick.
const maxPoolFile = 1 << 20

func newPool(n int) (*pool, error) {
	var paths []string
	for _, dir := range []string{"/usr/bin", "/usr/sbin", "/usr/lib"} {
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if len(paths) >= n {
				return fs.SkipAll
			}
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if info, err := d.Info(); err != nil || info.Size() > maxPoolFile {
				return nil
			}
			paths = append(paths, p)
			return nil
		})
		if len(paths) >= n {
			break
		}
	}
	sort.Strings(paths)
	p := &pool{}
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			continue
		}
		e := ima.NewIMANG(10, "sha256", h.Sum(nil), path)
		p.entries = append(p.entries, e)
		p.wire = append(p.wire, wire.Entry{PCR: e.PCR, HashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, Data: e.TemplateData})
	}
	if len(p.entries) < 16 {
		return nil, fmt.Errorf("found only %d readable files under /usr to measure", len(p.entries))
	}
	return p, nil
}

// record returns the measurement record the bridge makes of entry i at
// guest log index idx (for building logs without the wire).
func (p *pool) record(i int, idx uint64, boot string) *record.Record {
	e := &p.entries[i%len(p.entries)]
	return &record.Record{Kind: record.KindMeasurement, Time: int64(idx), Measurement: &record.Measurement{
		PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
		TemplateData: e.TemplateData, LogIndex: idx, BootID: boot,
	}}
}

// frames pre-encodes Measurements frame bodies, so that the benchmark's
// guests spend next to no CPU (they share the machine with the bridge): a
// body is the CBOR array of a run of pool entries, and a frame is the CBOR
// map {1: seq, 2: first, 3: body}, exactly as wire.Encode writes it.
type frames struct {
	size   int // entries per frame (the largest, when they vary)
	bodies []frameBody
}

type frameBody struct {
	b []byte
	n int // entries in it
}

// frames cuts the pool into frames of size entries; size 0 packs frames
// as the guest agent does when it has a backlog: as many entries as fit in
// wire.PreferredPayload, at most wire.MaxEntries.
func (p *pool) frames(size int) (*frames, error) {
	if size < 0 || size > wire.MaxEntries {
		return nil, fmt.Errorf("frame of %d entries, want 0 (as the agent packs them) or 1..%d", size, wire.MaxEntries)
	}
	enc := canon.Enc()
	fr := &frames{}
	add := func(es []wire.Entry) error {
		b, err := enc.Marshal(es)
		if err != nil {
			return err
		}
		fr.bodies = append(fr.bodies, frameBody{b: b, n: len(es)})
		fr.size = max(fr.size, len(es))
		return nil
	}
	if size > 0 {
		for k := 0; (k+1)*size <= len(p.wire); k++ {
			if err := add(p.wire[k*size : (k+1)*size]); err != nil {
				return nil, err
			}
		}
	} else {
		// Leave room for the map header, seq and first (at most 20 bytes).
		const room = wire.PreferredPayload - 32
		start, bytes := 0, 5
		for i := range p.wire {
			b, err := enc.Marshal(&p.wire[i])
			if err != nil {
				return nil, err
			}
			if i > start && (bytes+len(b) > room || i-start == wire.MaxEntries) {
				if err := add(p.wire[start:i]); err != nil {
					return nil, err
				}
				start, bytes = i, 5
			}
			bytes += len(b)
		}
		if len(fr.bodies) == 0 {
			if err := add(p.wire[start:]); err != nil {
				return nil, err
			}
		}
	}
	if len(fr.bodies) == 0 {
		return nil, fmt.Errorf("pool of %d entries is smaller than a frame of %d", len(p.wire), size)
	}
	// The hand-assembled frame must be byte for byte what the wire package
	// encodes, or the benchmark would not measure the real protocol.
	m := &wire.Measurements{Seq: 300, First: 1 << 40, Entries: p.wire[:fr.bodies[0].n]}
	want, err := wire.Encode(wire.TypeMeasurements, m)
	if err != nil {
		return nil, err
	}
	if got, _ := fr.frame(nil, 0, 300, 1<<40); !bytes.Equal(got, want) {
		return nil, fmt.Errorf("pre-encoded measurement frame differs from wire.Encode's")
	}
	return fr, nil
}

// frame appends the frame for body k with seq and first to b, and says
// how many entries it holds.
func (fr *frames) frame(b []byte, k int, seq, first uint64) ([]byte, int) {
	body := fr.bodies[k%len(fr.bodies)]
	p := make([]byte, 0, len(body.b)+24)
	p = append(p, 0xa3, 0x01)
	p = cborUint(p, seq)
	p = append(p, 0x02)
	p = cborUint(p, first)
	p = append(p, 0x03)
	p = append(p, body.b...)
	out, _ := wire.AppendFrame(b, wire.TypeMeasurements, p)
	return out, body.n
}

// cborUint appends v as a CBOR unsigned integer in its shortest form.
func cborUint(b []byte, v uint64) []byte {
	switch {
	case v < 24:
		return append(b, byte(v))
	case v <= 0xff:
		return append(b, 0x18, byte(v))
	case v <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, 0x19), uint16(v))
	case v <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, 0x1a), uint32(v))
	default:
		return binary.BigEndian.AppendUint64(append(b, 0x1b), v)
	}
}
