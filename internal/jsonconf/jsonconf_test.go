package jsonconf

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

type dur time.Duration

func (d *dur) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%s is not a duration: want a string such as \"2s\"", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration: want a string such as \"2s\"", s)
	}
	*d = dur(v)
	return nil
}

type hook struct {
	Mode     string `json:"mode"`
	FailOpen bool   `json:"fail_open"`
}

type conf struct {
	TPM       string   `json:"tpm"`
	PCR       int      `json:"pcr"`
	StopGrace dur      `json:"stop_grace"`
	Enforce   []string `json:"enforce"`
	Hook      hook     `json:"hook"`
	hidden    int
}

// Every operator mistake gets a message with where it is and what to
// write instead, in JSON's words; a good file decodes over the defaults.
func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string // substrings of the error; nil: no error
	}{
		{"good", `{"tpm": "swtpm:unix:/x", "hook": {"fail_open": true}, "stop_grace": "5s", "enforce": ["log"]}`, nil},
		{"empty", "", []string{"f.json: the file is empty: write {} for every default"}},
		{"blank", " \n\t\n", []string{"the file is empty"}},
		{"syntax line and column", "{\n  \"tpm\": \"device\",\n  \"pcr\": 23,,\n}", []string{"f.json:3:13: JSON syntax: invalid character ','"}},
		{"truncated", "{\n  \"tpm\": \"dev", []string{"f.json:2:14: JSON syntax: the file ends inside a value"}},
		{"two values", `{} {}`, []string{"f.json:1:4: more than one JSON value"}},
		{"not an object", `[1]`, []string{"f.json: the file: [1] is a list, want an object"}},
		{"nested unknown key", `{"hook": {"failopen": true}}`, []string{"f.json: hook.failopen: unknown key; did you mean hook.fail_open?"}},
		{"top unknown key, typo", `{"tmp": "device"}`, []string{"tmp: unknown key; did you mean tpm?"}},
		{"unknown key, nothing close", `{"colour": 1}`, []string{"colour: unknown key (known keys here: enforce, hook, pcr, stop_grace, tpm)"}},
		{"unexported field is not a key", `{"hidden": 1}`, []string{"hidden: unknown key"}},
		{"bool as string", `{"hook": {"fail_open": "yes"}}`, []string{`hook.fail_open: "yes" is a string, want true or false`}},
		{"number as string", `{"pcr": "23"}`, []string{`pcr: "23" is a string, want a whole number`}},
		{"string as number", `{"tpm": 5}`, []string{`tpm: 5 is a number, want a string in double quotes`}},
		{"list of the wrong kind", `{"enforce": "log"}`, []string{`enforce: "log" is a string, want a list [a string in double quotes, …]`}},
		{"object wanted", `{"hook": "opt-in"}`, []string{`hook: "opt-in" is a string, want an object`}},
		{"duration named by its key", `{"stop_grace": "3 seconds"}`, []string{`stop_grace: "3 seconds" is not a duration: want a string such as "2s"`}},
		{"duration as number", `{"stop_grace": 3}`, []string{`stop_grace: 3 is not a duration`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := conf{TPM: "device", PCR: 23}
			err := Decode("f.json", []byte(tc.in), &c)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if c.TPM != "swtpm:unix:/x" || !c.Hook.FailOpen || c.PCR != 23 || time.Duration(c.StopGrace) != 5*time.Second || len(c.Enforce) != 1 {
					t.Fatalf("decoded %+v", c)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error for %q", tc.in)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q\nwant it to contain %q", err, w)
				}
			}
			for _, goName := range []string{"main.", "jsonconf.", "struct {", "int64", "Go value"} {
				if strings.Contains(err.Error(), goName) {
					t.Fatalf("error %q speaks Go (%q)", err, goName)
				}
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{}`, `{"hook": {"fail_open": true}}`, `{"pcr": "x"}`, "{\n", `[1]`, `{"stop_grace": "1s"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var c conf
		_ = Decode("f.json", b, &c)
	})
}
