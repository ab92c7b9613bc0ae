// Package jsonconf decodes tpmmux's JSON configuration files (the bridge's
// bridge.json, the hook's hook.json) strictly, with errors an operator can
// act on: the line and column of a syntax error, the full key path of an
// unknown key (with the known key it most likely meant) or of a value of
// the wrong kind, said in JSON's words ("a string", "true or false"), not
// Go's, and an empty file named as such.
package jsonconf

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"sort"
	"strings"
)

// Decode decodes the JSON object data (read from path, which errors name)
// into the struct v points to. Keys are matched exactly against the json
// tags of v's fields, nested structs included; unknown keys are an error.
func Decode(path string, data []byte, v any) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("%s: the file is empty: write {} for every default, or remove the file", path)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return syntaxError(path, data, err)
	}
	end := dec.InputOffset()
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		next := end + int64(len(data[end:])-len(bytes.TrimLeft(data[end:], " \t\r\n")))
		line, col := position(data, next)
		return fmt.Errorf("%s:%d:%d: more than one JSON value: the file must hold one object {…}", path, line, col)
	}
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("jsonconf: Decode wants a pointer to a struct, not %T", v)
	}
	if err := decodeStruct(raw, rv.Elem(), ""); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// syntaxError names the line and column of a JSON syntax error.
func syntaxError(path string, data []byte, err error) error {
	var se *json.SyntaxError
	switch {
	case errors.As(err, &se):
		// Offset counts the bytes read, the offending one included.
		line, col := position(data, max(se.Offset-1, 0))
		return fmt.Errorf("%s:%d:%d: JSON syntax: %v", path, line, col, se)
	case errors.Is(err, io.ErrUnexpectedEOF):
		line, col := position(data, int64(len(data)))
		return fmt.Errorf("%s:%d:%d: JSON syntax: the file ends inside a value (a missing }, ] or \")", path, line, col)
	}
	return fmt.Errorf("%s: %w", path, err)
}

// position turns a byte offset into a 1-based line and column.
func position(data []byte, off int64) (line, col int) {
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(off) - bytes.LastIndexByte(before, '\n')
	return line, col
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()
var textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()

// decodeStruct decodes the object raw into the struct sv, key by key, so
// that every error names its key path (prefix + key).
func decodeStruct(raw json.RawMessage, sv reflect.Value, prefix string) error {
	var obj map[string]json.RawMessage
	if kind(raw) != "an object" {
		where := "the file"
		if prefix != "" {
			where = strings.TrimSuffix(prefix, ".")
		}
		return fmt.Errorf("%s: %s is %s, want an object {…}", where, short(raw), kind(raw))
	}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return fmt.Errorf("%s: %w", strings.TrimSuffix(prefix, "."), err)
	}
	fields := map[string]reflect.Value{}
	st := sv.Type()
	for i := 0; i < st.NumField(); i++ {
		f := st.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "-" || name == "" {
			continue
		}
		fields[name] = sv.Field(i)
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fv, ok := fields[k]
		if !ok {
			msg := fmt.Sprintf("%s%s: unknown key", prefix, k)
			if m := closest(k, fields); m != "" {
				msg += fmt.Sprintf("; did you mean %s%s?", prefix, m)
			} else {
				msg += fmt.Sprintf(" (known keys here: %s)", strings.Join(sortedKeys(fields), ", "))
			}
			return errors.New(msg)
		}
		if err := decodeValue(obj[k], fv, prefix+k); err != nil {
			return err
		}
	}
	return nil
}

// decodeValue decodes one value into fv; key is its full path.
func decodeValue(raw json.RawMessage, fv reflect.Value, key string) error {
	t := fv.Type()
	custom := reflect.PointerTo(t).Implements(unmarshalerType) || reflect.PointerTo(t).Implements(textUnmarshalerType)
	if t.Kind() == reflect.Struct && !custom {
		if kind(raw) == "null" {
			return nil
		}
		return decodeStruct(raw, fv, key+".")
	}
	if err := json.Unmarshal(raw, fv.Addr().Interface()); err != nil {
		if custom {
			// The type's own message says what it wants (a duration).
			return fmt.Errorf("%s: %v", key, err)
		}
		return fmt.Errorf("%s: %s is %s, want %s", key, short(raw), kind(raw), words(t))
	}
	return nil
}

// kind names a JSON value's kind as the JSON text shows it.
func kind(raw json.RawMessage) string {
	b := bytes.TrimSpace(raw)
	if len(b) == 0 {
		return "nothing"
	}
	switch b[0] {
	case '"':
		return "a string"
	case 't', 'f':
		return "true or false"
	case 'n':
		return "null"
	case '{':
		return "an object"
	case '[':
		return "a list"
	}
	return "a number"
}

// words says what a Go type wants, in JSON's terms.
func words(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "a whole number"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number, 0 or more"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return `a string in double quotes`
	case reflect.Slice, reflect.Array:
		return "a list [" + words(t.Elem()) + ", …]"
	case reflect.Map, reflect.Struct:
		return "an object {…}"
	case reflect.Pointer:
		return words(t.Elem())
	}
	return "a value of another kind"
}

// short quotes a value for a message, cut to a readable length.
func short(raw json.RawMessage) string {
	s := string(bytes.TrimSpace(raw))
	if len(s) > 40 {
		s = s[:37] + "..."
	}
	return s
}

func sortedKeys(m map[string]reflect.Value) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// closest returns the known key k most likely meant: the same letters
// without separators or case, else one within two edits; "" if none.
func closest(k string, fields map[string]reflect.Value) string {
	norm := func(s string) string {
		return strings.Map(func(r rune) rune {
			if r == '_' || r == '-' || r == ' ' {
				return -1
			}
			return r
		}, strings.ToLower(s))
	}
	best, bestD := "", 3
	for _, name := range sortedKeys(fields) {
		if norm(name) == norm(k) {
			return name
		}
		if d := distance(norm(name), norm(k)); d < bestD {
			best, bestD = name, d
		}
	}
	return best
}

// distance is the Levenshtein distance of a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
