package evidence_test

import (
	"fmt"

	"github.com/tpmmux/tpmmux/internal/evidence"
)

// Decode reads evidence as the bridge writes it, in either form (JSON here;
// the canonical CBOR form decodes the same way). It checks the form, the
// version and the size limits, not the content: only verify.Verify decides
// whether evidence is true.
func ExampleDecode() {
	doc := []byte(`{
	 "version": 1, "kind": "quote", "pcr": 23,
	 "quote": {"attest": "ff54434780180022", "signature": "00180000"},
	 "pcr_values": [{"index": 23, "sha256": "` + d1 + `"}],
	 "epoch": {"number": 1, "record": "a0"},
	 "log": [{"g0": 0, "entries": ["` + d2 + d3 + `"]}, {"g0": 2, "entries": ["` + d3 + d2 + `"]}],
	 "vm": {"uuid": "68ba0609-8b9f-9ea1-86a1-3ac9e934f923", "instance": "aac446b8b4843a14b466809466bccd4b", "name": "vm-01"},
	 "records": [{"g": 1, "r": "a30101"}]
	}`)
	ev, err := evidence.Decode(doc)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s evidence for %s, PCR %d, epoch %d\n", ev.Kind, ev.VM.Name, ev.PCR, ev.Epoch.Number)
	for _, b := range ev.Log {
		for i := range b.Entries.Len() {
			tag, commit := b.Entries.At(i)
			g := b.G0 + uint64(i)
			if b.G0 == 0 {
				g++ // global index 0 is the epoch record
			}
			fmt.Printf("global index %d: tag %x…, commitment %x…\n", g, tag[:2], commit[:2])
		}
	}
	fmt.Printf("%d record(s) of this VM; the first at global index %d\n", len(ev.Records), ev.Records[0].G)

	// The binary form round-trips.
	bin, err := ev.MarshalBinary()
	if err != nil {
		fmt.Println(err)
		return
	}
	again, err := evidence.Decode(bin)
	fmt.Println(again.VM.UUID == ev.VM.UUID, err)

	// Anything else is an error that says what was expected.
	_, err = evidence.Decode([]byte(`{"version": 2}`))
	fmt.Println(err)
	// Output:
	// quote evidence for vm-01, PCR 23, epoch 1
	// global index 1: tag 8a1f…, commitment 5b2c…
	// global index 2: tag 5b2c…, commitment 8a1f…
	// 1 record(s) of this VM; the first at global index 1
	// true <nil>
	// evidence version 2, this verifier reads version 1
}

const (
	d1 = "03cf84aa00000000000000000000000000000000000000000000000000000000"
	d2 = "8a1f000000000000000000000000000000000000000000000000000000000000"
	d3 = "5b2c000000000000000000000000000000000000000000000000000000000000"
)
