package control

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/evidence"
)

// streamHandler serves evidence through EvidenceWriter: pieces from body,
// or an error before any piece.
type streamHandler struct {
	fakeHandler
	pieces [][]byte
	fail   error
	since  *evidence.Since
}

func (h *streamHandler) WriteEvidence(ctx context.Context, vm string, nonce []byte, since *evidence.Since, write func(*Evidence, func(emit func([]byte) error) error) error) error {
	h.since = since
	return write(&Evidence{VM: vm, AKPEM: "pem \"quoted\" <x>"}, func(emit func([]byte) error) error {
		if h.fail != nil {
			return h.fail
		}
		for _, p := range h.pieces {
			if err := emit(p); err != nil {
				return err
			}
		}
		return nil
	})
}

// TestStreamedEvidenceJSON: the streamed response is byte for byte what
// encoding the whole response gives; the checkpoint position reaches the
// handler; an error before the first piece is answered as an error; a
// handler without EvidenceWriter refuses incremental requests.
func TestStreamedEvidenceJSON(t *testing.T) {
	raw := bytes.Repeat([]byte{0, 1, 2, 0xff, 'e', '"'}, 50001)
	var pieces [][]byte
	for i := 0; i < len(raw); i += 7777 {
		pieces = append(pieces, raw[i:min(i+7777, len(raw))])
	}
	e := &Evidence{VM: "vm-\"evidence\":null", AKPEM: "pem \"quoted\" <x>"}
	var got bytes.Buffer
	started := false
	if err := writeEvidenceJSON(&got, e, func(emit func([]byte) error) error {
		for _, p := range pieces {
			emit(p)
		}
		return nil
	}, &started); err != nil {
		t.Fatal(err)
	}
	whole := *e
	whole.Evidence = raw
	want, err := encodeJSON(&Response{Evidence: &whole})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("streamed JSON differs from the encoded response (%d vs %d bytes)", got.Len(), len(want))
	}

	h := &streamHandler{pieces: pieces}
	path, _ := serve(t, h, nil)
	c := &Client{Path: path}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	since := &evidence.Since{Batch: 7, Records: 3}
	resp, err := c.Call(ctx, &Request{Op: OpEvidence, VM: "vm-a", Nonce: []byte{1}, Since: since})
	if err != nil || resp.Evidence == nil || !bytes.Equal(resp.Evidence.Evidence, raw) || resp.Evidence.AKPEM != "pem \"quoted\" <x>" {
		t.Fatalf("evidence: %v", err)
	}
	if h.since == nil || *h.since != *since {
		t.Fatalf("handler got since %+v, want %+v", h.since, since)
	}
	h.fail = errors.New("quote failed")
	_, err = c.Call(ctx, &Request{Op: OpEvidence, VM: "vm-a", Nonce: []byte{1}})
	var re *RemoteError
	if !errors.As(err, &re) || re.Msg != "quote failed" {
		t.Fatalf("err %v, want the handler's error", err)
	}

	path, _ = serve(t, &fakeHandler{}, nil)
	_, err = (&Client{Path: path}).Call(ctx, &Request{Op: OpEvidence, VM: "vm-a", Nonce: []byte{1}, Since: since})
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "incremental") {
		t.Fatalf("err %v, want a refusal of incremental evidence", err)
	}
}
