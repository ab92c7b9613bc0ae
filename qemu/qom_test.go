package qemu

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// TestVsockCIDReplay reads the vsock CID from recorded (and, for vhost-vsock
// devices, derived) QMP exchanges; see each testdata file's "source".
func TestVsockCIDReplay(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		cidJSON string // when set, replaces the recorded guest-cid reply
		want    uint32
		wantErr string
		noVsock bool
	}{
		{name: "libvirt vsock0", file: "testdata/vsock-pci.json", want: 42},
		{name: "anonymous vhost-vsock-device", file: "testdata/vsock-anon-device.json", want: 3},
		{name: "no vsock (real QEMU 7.2)", file: "testdata/qemu-7.2-rng.json", noVsock: true, wantErr: "no vhost-vsock device"},
		{name: "vhost-user only", file: "testdata/vsock-user.json", noVsock: true, wantErr: "vhost-user backend"},
		{name: "two devices", file: "testdata/vsock-two.json", wantErr: "2 vhost-vsock devices"},
		{name: "largest guest CID", file: "testdata/vsock-pci.json", cidJSON: "4294967294", want: 0xfffffffe},
		{name: "host CID", file: "testdata/vsock-pci.json", cidJSON: "2", wantErr: "not a guest CID"},
		{name: "any CID", file: "testdata/vsock-pci.json", cidJSON: "4294967295", wantErr: "not a guest CID"},
		{name: "beyond 32 bits", file: "testdata/vsock-pci.json", cidJSON: "4294967296", wantErr: "not a guest CID"},
		{name: "beyond 64 bits", file: "testdata/vsock-pci.json", cidJSON: "18446744073709551616", wantErr: "not a uint64"},
		{name: "negative", file: "testdata/vsock-pci.json", cidJSON: "-5", wantErr: "not an unsigned integer"},
		{name: "float", file: "testdata/vsock-pci.json", cidJSON: "4.2e1", wantErr: "not a uint64"},
		{name: "string", file: "testdata/vsock-pci.json", cidJSON: `"42"`, wantErr: "not an unsigned integer"},
		{name: "null", file: "testdata/vsock-pci.json", cidJSON: "null", wantErr: "not an unsigned integer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mon := loadReplay(t, tt.file)
			if tt.cidJSON != "" {
				k, _ := canonical([]byte(`{"execute":"qom-get","arguments":{"path":"/machine/peripheral/vsock0","property":"guest-cid"}}`))
				if _, ok := mon.replies[k]; !ok {
					t.Fatal("fixture has no guest-cid exchange")
				}
				mon.replies[k] = []byte(`{"return": ` + tt.cidJSON + `}`)
			}
			got, err := VsockCID(context.Background(), mon)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				if errors.Is(err, ErrNoVsock) != tt.noVsock {
					t.Fatalf("errors.Is(%v, ErrNoVsock) = %v", err, !tt.noVsock)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("cid %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

func TestCheckCID(t *testing.T) {
	tests := []struct {
		name     string
		file     string
		want     uint32
		mismatch *CIDMismatchError
		wantErr  string
	}{
		{name: "match", file: "testdata/vsock-pci.json", want: 42},
		{name: "other cid", file: "testdata/vsock-pci.json", want: 43, mismatch: &CIDMismatchError{Want: 43, Got: 42}},
		{name: "XML names none, VM has one", file: "testdata/vsock-pci.json", want: 0, mismatch: &CIDMismatchError{Want: 0, Got: 42}},
		{name: "neither has one", file: "testdata/qemu-7.2-rng.json", want: 0},
		{name: "XML names one, VM has none", file: "testdata/qemu-7.2-rng.json", want: 42, mismatch: &CIDMismatchError{Want: 42, Got: 0}},
		{name: "ambiguous", file: "testdata/vsock-two.json", want: 42, wantErr: "2 vhost-vsock devices"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckCID(context.Background(), loadReplay(t, tt.file), tt.want)
			var mm *CIDMismatchError
			switch {
			case tt.mismatch != nil:
				if !errors.As(err, &mm) || *mm != *tt.mismatch {
					t.Fatalf("err %v, want mismatch %+v", err, tt.mismatch)
				}
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || errors.As(err, &mm) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
			case err != nil:
				t.Fatal(err)
			}
		})
	}
}

// TestExecuteReplies covers the reply shapes Execute accepts and refuses,
// including an error reply as libvirt passes it through verbatim.
func TestExecuteReplies(t *testing.T) {
	tests := []struct {
		name, reply, wantErr string
	}{
		{"status", `{"return":{"status":"paused","singlestep":false,"running":false},"id":"libvirt-423"}`, ""},
		{"qmp error", `{"id":"libvirt-9","error":{"class":"CommandNotFound","desc":"The command nope has not been found"}}`, "CommandNotFound: The command nope has not been found"},
		{"no return", `{"id":"libvirt-9"}`, "no return member"},
		{"not json", `{"return":`, "decode reply"},
		{"wrong shape", `{"return":[1,2]}`, "decode return"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mon := &replayMonitor{replies: map[string][]byte{}}
			k, _ := canonical([]byte(`{"execute":"query-status"}`))
			mon.replies[k] = []byte(tt.reply)
			var st StatusInfo
			err := Execute(context.Background(), mon, "query-status", nil, &st)
			if tt.wantErr == "" {
				if err != nil || st.Status != "paused" || st.Running {
					t.Fatalf("%+v, %v", st, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// The commands VsockCID sends must be the ones the fixtures recorded.
func TestCommandEncoding(t *testing.T) {
	var got []string
	mon := monitorFunc(func(cmd []byte) ([]byte, error) {
		got = append(got, string(cmd))
		return []byte(`{"return":[]}`), nil
	})
	if _, err := VsockCID(context.Background(), mon); !errors.Is(err, ErrNoVsock) {
		t.Fatal(err)
	}
	want := []string{`{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}`, `{"execute":"qom-list","arguments":{"path":"/machine/peripheral-anon"}}`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("sent %q, want %q", got, want)
	}
}

type monitorFunc func(cmd []byte) ([]byte, error)

func (f monitorFunc) Run(_ context.Context, cmd []byte) ([]byte, error) { return f(cmd) }
func (f monitorFunc) Close() error                                      { return nil }
