package daemon

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParsePCRList(t *testing.T) {
	for in, want := range map[string][]int{
		"0-7,10": {0, 1, 2, 3, 4, 5, 6, 7, 10},
		"none":   {},
		"":       {},
		"10, 3":  {3, 10},
		"1-1,1":  {1},
	} {
		got, err := ParsePCRList(in)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("%q: %v %v", in, got, err)
		}
	}
	for _, bad := range []string{"7-0", "x", "0-24", "-1"} {
		if _, err := ParsePCRList(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestLoopbackAddr(t *testing.T) {
	for in, want := range map[string]string{"127.0.0.1:9464": "127.0.0.1:9464", "localhost:1": "127.0.0.1:1", "[::1]:80": "[::1]:80"} {
		if got, err := LoopbackAddr(in); err != nil || got != want {
			t.Errorf("%q: %q %v", in, got, err)
		}
	}
	for _, bad := range []string{":9464", "0.0.0.0:9464", "10.0.0.1:80", "example.com:80", "127.0.0.1"} {
		if _, err := LoopbackAddr(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	cfg := DefaultConfig()
	cfg.Metrics = "0.0.0.0:9464"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Fatalf("validate: %v", err)
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bridge.json")
	os.WriteFile(p, []byte(`{"tpm": "swtpm:127.0.0.1:2321", "pcr": 16, "hook": {"mode": "opt-in"}, "stop_grace": "1s"}`), 0o644)
	cfg, err := LoadConfig(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TPM != "swtpm:127.0.0.1:2321" || cfg.PCR != 16 || cfg.Hook.Mode != ModeOptIn || time.Duration(cfg.StopGrace) != time.Second ||
		cfg.StateDir != DefaultStateDir || cfg.SerialMode != "0660" {
		t.Fatalf("cfg %+v", cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	// The real bridge.json's keys, misspelt or mistyped: the message names
	// the file, the key's full path and what to write instead.
	for in, want := range map[string]string{
		`{"tmp": "sim"}`:                             "config " + p + ": tmp: unknown key; did you mean tpm?",
		`{"hook": {"failopen": true}}`:               "config " + p + ": hook.failopen: unknown key; did you mean hook.fail_open?",
		`{"hook": {"fail_open": "yes"}}`:             `hook.fail_open: "yes" is a string, want true or false`,
		`{"stop_grace": "3 seconds"}`:                `stop_grace: "3 seconds" is not a duration: want a string such as "2s"`,
		`{"key_retention": 3600}`:                    `key_retention: 3600 is not a duration`,
		`{"pcr": "23"}`:                              `pcr: "23" is a string, want a whole number`,
		"{\n  \"tpm\": \"device\"\n  \"pcr\": 23\n}": "config " + p + ":3:3: JSON syntax",
		"": "config " + p + ": the file is empty: write {} for every default",
	} {
		os.WriteFile(p, []byte(in), 0o644)
		if _, err := LoadConfig(p, false); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: error %v\nwant %q", in, err, want)
		}
	}
	if _, err := LoadConfig(filepath.Join(dir, "missing.json"), true); err != nil {
		t.Fatalf("optional missing file: %v", err)
	}
	if _, err := LoadConfig(filepath.Join(dir, "missing.json"), false); err == nil {
		t.Fatal("missing explicit file accepted")
	}
	for _, mod := range []func(*Config){
		func(c *Config) { c.PCR = 0 },
		func(c *Config) { c.HostPCRs = "0-7,13" },
		func(c *Config) { c.SerialMode = "999" },
		func(c *Config) { c.Vsock = "maybe" },
		func(c *Config) { c.Hook.Mode = "opt-sideways" },
		func(c *Config) { c.StateDir = "relative" },
		func(c *Config) { c.SerialGroup = "no-such-group-tpmmux" },
		func(c *Config) { c.LogLevel = "loud" },
	} {
		c := DefaultConfig()
		mod(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("invalid config accepted: %+v", c)
		}
	}
}

// TestQuotaConfig: the quota block reaches the bridge, and bad values are
// refused with the key's name.
func TestQuotaConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bridge.json")
	os.WriteFile(p, []byte(`{"quota": {"records_per_second": 500, "max_entry_bytes": 65536, "max_records": -1}}`), 0o644)
	cfg, err := LoadConfig(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	q, err := cfg.Quota.Bridge()
	if err != nil || q.RecordsPerSecond != 500 || q.MaxEntryBytes != 65536 || q.MaxRecords != -1 || q.RecordBurst != 0 {
		t.Fatalf("quota %+v, %v", q, err)
	}
	for _, tt := range []struct {
		q    QuotaConfig
		want string
	}{
		{QuotaConfig{RecordBurst: -2}, "quota.record_burst"},
		{QuotaConfig{MaxEntryBytes: 4 << 20}, "quota.max_entry_bytes"},
	} {
		c := DefaultConfig()
		c.Quota = tt.q
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: %v, want an error naming %s", tt.q, err, tt.want)
		}
	}
}

// TestConcealConfig: concealment is on by default, can be tuned or turned
// off, and bad values are refused with the key's name.
func TestConcealConfig(t *testing.T) {
	for _, tt := range []struct {
		c       ConcealConfig
		pad     int
		every   time.Duration
		wantErr string
	}{
		{ConcealConfig{}, DefaultConcealPad, DefaultConcealInterval, ""},
		{ConcealConfig{Pad: 64, Interval: Duration(250 * time.Millisecond)}, 64, 250 * time.Millisecond, ""},
		{ConcealConfig{Pad: -1}, 0, 0, ""},
		{ConcealConfig{Pad: -2}, 0, 0, "conceal"},
		{ConcealConfig{Interval: Duration(time.Microsecond)}, 0, 0, "conceal.interval"},
	} {
		c := DefaultConfig()
		c.Conceal = tt.c
		err := c.Validate()
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%+v: %v, want an error naming %s", tt.c, err, tt.wantErr)
			}
			continue
		}
		cv, err := tt.c.Cover()
		if err != nil || cv.Pad != tt.pad || cv.Interval != tt.every {
			t.Errorf("%+v: %+v %v", tt.c, cv, err)
		}
	}
}
