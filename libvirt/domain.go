// Package libvirt adapts tpmmux to libvirt. It reads the domain XML that
// libvirt hands its hooks (ParseDomain, with libvirt.org/go/libvirtxml),
// never trusting the XML to be small or well-formed: every failure is an
// error naming what was wrong. And, for the bridge daemon only (never the
// hook: libvirt forbids API calls from hooks), it talks to libvirtd over
// github.com/digitalocean/go-libvirt (Client): it lists the running domains,
// reconciles them with the bridge's live identities (Reconcile, Plan.Apply)
// and follows lifecycle and reset events (Client.Events, Watcher, Follow),
// reconnecting when libvirtd restarts.
package libvirt

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// MaxDomainXML bounds the domain XML the bridge accepts from a hook.
const MaxDomainXML = 1 << 20

// MetadataNS is the XML namespace of tpmmux's domain <metadata> element:
// <tpmmux:attest xmlns:tpmmux="https://tpmmux.dev/xmlns/domain/1" enabled="no"/>
// opts a domain out (or in, on an opt-in host).
const MetadataNS = "https://tpmmux.dev/xmlns/domain/1"

// SerialPortName is the virtio-serial port name the guest agent looks for.
const SerialPortName = "org.tpmmux.0"

// Domain is what tpmmux needs from a domain XML.
type Domain struct {
	Name  string
	UUID  [16]byte
	CID   uint32 // vsock guest CID; 0 when there is no <vsock> or it is auto-assigned and not yet known
	Files []LaunchFile
	// SerialSocket is the host path of the <channel type='unix'> whose
	// target is the org.tpmmux.0 virtio-serial port, if any.
	SerialSocket string
	SerialMode   string // "connect" or "bind"
	// TPMSockets are the unix socket paths of <tpm> devices with an
	// external backend (a vTPM served by another process, e.g. the
	// bridge's vTPM mode): QEMU does not start while one is not listening.
	TPMSockets []string
	// Attest is the domain's own choice from its tpmmux metadata: "" (none
	// given), "yes" or "no".
	Attest string
}

// LaunchFile is a file the domain boots from.
type LaunchFile struct {
	Role string // kernel, initrd, loader, nvram
	Path string
}

// ParseDomain parses a libvirt domain XML document.
func ParseDomain(doc []byte) (*Domain, error) {
	if len(doc) > MaxDomainXML {
		return nil, fmt.Errorf("domain XML of %d bytes exceeds %d", len(doc), MaxDomainXML)
	}
	var dx libvirtxml.Domain
	if err := dx.Unmarshal(string(doc)); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	d := &Domain{Name: dx.Name}
	if d.Name == "" {
		return nil, fmt.Errorf("domain XML has no <name>")
	}
	u, err := conceal.ParseUUID(strings.TrimSpace(dx.UUID))
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", d.Name, err)
	}
	d.UUID = u
	if dx.Devices != nil {
		if vs := dx.Devices.VSock; vs != nil && vs.CID != nil && vs.CID.Address != "" {
			cid, err := strconv.ParseUint(vs.CID.Address, 10, 32)
			if err != nil || cid < 3 || cid == 0xffffffff {
				return nil, fmt.Errorf("domain %s: vsock cid %q is not a guest CID", d.Name, vs.CID.Address)
			}
			d.CID = uint32(cid)
		}
		for _, t := range dx.Devices.TPMs {
			if b := t.Backend; b != nil && b.External != nil && b.External.Source != nil && b.External.Source.UNIX != nil {
				d.TPMSockets = append(d.TPMSockets, b.External.Source.UNIX.Path)
			}
		}
		for _, ch := range dx.Devices.Channels {
			if ch.Target == nil || ch.Target.VirtIO == nil || ch.Target.VirtIO.Name != SerialPortName {
				continue
			}
			if ch.Source == nil || ch.Source.UNIX == nil || ch.Source.UNIX.Path == "" {
				return nil, fmt.Errorf("domain %s: channel %s is not a unix socket channel", d.Name, SerialPortName)
			}
			d.SerialSocket, d.SerialMode = ch.Source.UNIX.Path, ch.Source.UNIX.Mode
		}
	}
	if os := dx.OS; os != nil {
		add := func(role, path string) {
			if p := strings.TrimSpace(path); p != "" {
				d.Files = append(d.Files, LaunchFile{Role: role, Path: p})
			}
		}
		add("kernel", os.Kernel)
		add("initrd", os.Initrd)
		add("dtb", os.DTB)
		if os.Loader != nil {
			add("loader", os.Loader.Path)
		}
		if os.NVRam != nil {
			add("nvram", os.NVRam.NVRam)
		}
	}
	if dx.Metadata != nil {
		a, err := attestChoice(dx.Metadata.XML)
		if err != nil {
			return nil, fmt.Errorf("domain %s metadata: %w", d.Name, err)
		}
		d.Attest = a
	}
	return d, nil
}

// attestChoice finds <attest enabled="yes|no"/> in the tpmmux namespace.
func attestChoice(inner string) (string, error) {
	dec := xml.NewDecoder(strings.NewReader("<m>" + inner + "</m>"))
	for {
		tok, err := dec.Token()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return "", nil
			}
			return "", err
		}
		se, ok := tok.(xml.StartElement)
		if !ok || se.Name.Space != MetadataNS || se.Name.Local != "attest" {
			continue
		}
		for _, a := range se.Attr {
			if a.Name.Local == "enabled" {
				switch a.Value {
				case "yes", "no":
					return a.Value, nil
				}
				return "", fmt.Errorf("tpmmux attest enabled=%q, want yes or no", a.Value)
			}
		}
		return "yes", nil
	}
}
