package mux

import (
	"reflect"
	"testing"

	"github.com/tpmmux/tpmmux/internal/evidence"
)

// TestEvidenceFieldSplit: the structs that streamed evidence is encoded
// from (evHead, the log, evTail; evTail as evVM, the audit path, evAfter)
// hold exactly evidence.Evidence's fields with the same keys and types, so
// a field added to Evidence cannot go missing from streamed evidence.
func TestEvidenceFieldSplit(t *testing.T) {
	type field struct {
		tag string
		typ reflect.Type
	}
	fields := func(v any) map[string]field {
		out := map[string]field{}
		rt := reflect.TypeOf(v)
		for i := range rt.NumField() {
			f := rt.Field(i)
			out[f.Name] = field{f.Tag.Get("cbor"), f.Type}
		}
		return out
	}
	union := func(ms ...map[string]field) map[string]field {
		out := map[string]field{}
		for _, m := range ms {
			for k, v := range m {
				if _, dup := out[k]; dup {
					t.Fatalf("field %s in two parts", k)
				}
				out[k] = v
			}
		}
		return out
	}
	want := fields(evidence.Evidence{})
	logF := map[string]field{"Log": want["Log"]}
	if got := union(fields(evHead{}), logF, fields(evTail{})); !reflect.DeepEqual(got, want) {
		t.Fatalf("evHead, Log and evTail:\n%v\nwant Evidence's:\n%v", got, want)
	}
	tail := fields(evTail{})
	batched := map[string]field{"Batched": tail["Batched"]}
	if got := union(fields(evVM{}), batched, fields(evAfter{})); !reflect.DeepEqual(got, tail) {
		t.Fatalf("evVM, Batched and evAfter:\n%v\nwant evTail's:\n%v", got, tail)
	}
	if want["Log"].tag != "8,keyasint" || tail["Batched"].tag != "11,keyasint,omitempty" {
		t.Fatalf("the log's or the audit path's key changed: %q, %q", want["Log"].tag, tail["Batched"].tag)
	}
}
