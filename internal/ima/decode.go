package ima

import "fmt"

// DecodeTemplate decodes the template data of one entry of template name,
// as a guest agent forwarded it. Callers that hold only (name, data), like
// the verifier appraising a measurement record, use it instead of parsing
// a whole binary list. An unknown template yields zero Fields and an error.
func DecodeTemplate(name string, data []byte) (Fields, error) {
	if !KnownTemplate(name) {
		return Fields{}, fmt.Errorf("unknown IMA template %q", name)
	}
	f, err := decodeTemplate(name, data)
	if err != nil {
		return Fields{}, fmt.Errorf("decode %s template data: %w", name, err)
	}
	return f, nil
}
