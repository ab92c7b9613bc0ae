package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// deviceContainers are the QOM containers that hold user-created devices:
// those with an id (-device ...,id=X, which libvirt always gives, e.g.
// "vsock0") and those without one ("device[N]").
func deviceContainers() []string {
	return []string{"/machine/peripheral", "/machine/peripheral-anon"}
}

// vsockTypes are QEMU's vhost-vsock device types: their guest-cid
// property is the guest's CID.
func vsockTypes() []string {
	return []string{"vhost-vsock-pci", "vhost-vsock-pci-non-transitional", "vhost-vsock-device", "vhost-vsock-ccw"}
}

// vhostUserVsockTypes are vsock devices whose CID the vhost-user backend
// process sets; QEMU does not know it.
func vhostUserVsockTypes() []string {
	return []string{"vhost-user-vsock-pci", "vhost-user-vsock-pci-non-transitional", "vhost-user-vsock-device"}
}

// GuestCIDProperty is the QOM property of a vhost-vsock device that holds
// the guest's CID.
const GuestCIDProperty = "guest-cid"

// ErrNoVsock is returned by VsockCID when the VM has no vhost-vsock device.
var ErrNoVsock = errors.New("no vhost-vsock device")

// QOMProperty is one entry of a qom-list reply: a property of a QOM
// object. Children have the type "child<TYPE>", links "link<TYPE>".
type QOMProperty struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// QOMList lists the properties of the QOM object at path.
func QOMList(ctx context.Context, mon Monitor, path string) ([]QOMProperty, error) {
	var props []QOMProperty
	if err := Execute(ctx, mon, "qom-list", map[string]string{"path": path}, &props); err != nil {
		return nil, err
	}
	return props, nil
}

// QOMGet reads the property prop of the QOM object at path, as JSON.
func QOMGet(ctx context.Context, mon Monitor, path, prop string) (json.RawMessage, error) {
	var v json.RawMessage
	if err := Execute(ctx, mon, "qom-get", map[string]string{"path": path, "property": prop}, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// Device is a user-created device found in the QOM tree.
type Device struct {
	Path string // e.g. /machine/peripheral/vsock0
	Type string // e.g. vhost-vsock-pci
}

// FindDevices lists the user-created devices (with or without an id) whose
// QOM type is one of types, in QOM listing order.
func FindDevices(ctx context.Context, mon Monitor, types ...string) ([]Device, error) {
	var out []Device
	for _, dir := range deviceContainers() {
		props, err := QOMList(ctx, mon, dir)
		if err != nil {
			return nil, fmt.Errorf("list devices in %s: %w", dir, err)
		}
		for _, p := range props {
			t, ok := childType(p.Type)
			if !ok || !slices.Contains(types, t) {
				continue
			}
			out = append(out, Device{Path: dir + "/" + p.Name, Type: t})
		}
	}
	return out, nil
}

// childType returns TYPE of "child<TYPE>".
func childType(s string) (string, bool) {
	if !strings.HasPrefix(s, "child<") || !strings.HasSuffix(s, ">") {
		return "", false
	}
	return s[len("child<") : len(s)-1], true
}

// QOMUint reads an unsigned integer property (uint8 … uint64; guest-cid
// is a uint64 in QEMU 7.2).
func QOMUint(ctx context.Context, mon Monitor, path, prop string) (uint64, error) {
	raw, err := QOMGet(ctx, mon, path, prop)
	if err != nil {
		return 0, err
	}
	v, err := parseUint(raw)
	if err != nil {
		return 0, fmt.Errorf("qom %s.%s: %w", path, prop, err)
	}
	return v, nil
}

// parseUint accepts exactly a JSON integer in [0, 2^64).
func parseUint(raw json.RawMessage) (uint64, error) {
	s := string(bytes.TrimSpace(raw))
	if s == "" || s[0] < '0' || s[0] > '9' {
		return 0, fmt.Errorf("value %.40q is not an unsigned integer", s)
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("value %.40q is not a uint64", s)
	}
	return v, nil
}

// VsockCID returns the guest CID of the VM's vhost-vsock device, read from
// the running QEMU (qom-get of its guest-cid). It returns an error wrapping
// ErrNoVsock when the VM has none, and an error when it has more than one
// or only a vhost-user vsock device (whose CID QEMU does not know).
func VsockCID(ctx context.Context, mon Monitor) (uint32, error) {
	devs, err := FindDevices(ctx, mon, append(vsockTypes(), vhostUserVsockTypes()...)...)
	if err != nil {
		return 0, fmt.Errorf("vsock cid: %w", err)
	}
	var vhost []Device
	for _, d := range devs {
		if slices.Contains(vsockTypes(), d.Type) {
			vhost = append(vhost, d)
		}
	}
	switch {
	case len(vhost) == 0 && len(devs) > 0:
		return 0, fmt.Errorf("vsock cid: %s is a %s: its CID is set by the vhost-user backend, not QEMU: %w", devs[0].Path, devs[0].Type, ErrNoVsock)
	case len(vhost) == 0:
		return 0, fmt.Errorf("vsock cid: %w", ErrNoVsock)
	case len(vhost) > 1:
		return 0, fmt.Errorf("vsock cid: %d vhost-vsock devices (%s, %s, ...), want one", len(vhost), vhost[0].Path, vhost[1].Path)
	}
	cid, err := QOMUint(ctx, mon, vhost[0].Path, GuestCIDProperty)
	if err != nil {
		return 0, fmt.Errorf("vsock cid: %w", err)
	}
	// QEMU keeps guest-cid as a uint64 but vsock addresses are 32-bit, and
	// 0-2 and 2^32-1 are reserved (hypervisor, local, host, any).
	if cid < 3 || cid >= 0xffffffff {
		return 0, fmt.Errorf("vsock cid: %s has %s %d, not a guest CID", vhost[0].Path, GuestCIDProperty, cid)
	}
	return uint32(cid), nil
}

// CIDMismatchError says that the running VM's vsock CID is not the one the
// domain XML gave.
type CIDMismatchError struct {
	Want uint32 // from the domain XML; 0 when it names none
	Got  uint32 // from the running QEMU; 0 when it has no vsock device
}

// Error implements error.
func (e *CIDMismatchError) Error() string {
	switch {
	case e.Want == 0:
		return fmt.Sprintf("running VM has vsock CID %d but its domain XML names none", e.Got)
	case e.Got == 0:
		return fmt.Sprintf("domain XML names vsock CID %d but the running VM has no vhost-vsock device", e.Want)
	}
	return fmt.Sprintf("running VM has vsock CID %d, domain XML names %d", e.Got, e.Want)
}

// CheckCID checks that the running VM's vsock CID is want, the CID of its
// domain XML; want 0 means the XML names none, and then the VM must have
// no vhost-vsock device either. A mismatch is a *CIDMismatchError.
func CheckCID(ctx context.Context, mon Monitor, want uint32) error {
	got, err := VsockCID(ctx, mon)
	if errors.Is(err, ErrNoVsock) {
		if want == 0 {
			return nil
		}
		return fmt.Errorf("check cid: %w (%w)", &CIDMismatchError{Want: want}, err)
	}
	if err != nil {
		return fmt.Errorf("check cid: %w", err)
	}
	if got != want {
		return fmt.Errorf("check cid: %w", &CIDMismatchError{Want: want, Got: got})
	}
	return nil
}
