package daemon

import (
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
)

// minPrefix is the shortest instance or id prefix resolve accepts, so that
// a mistyped name is not taken for the prefix of some instance.
const minPrefix = 4

// resolveHint says what an operator may name a VM by, in resolve's errors.
const resolveHint = "name it by its name, uuid, instance or id, or a unique prefix (at least 4 hex digits) of the instance or id; tpmmux-bridge vms --all lists them"

// resolve finds the VM instance q names, and whether it is live. q is, in
// this order of precedence: a name (its live instance, else its only ended
// one), a uuid (likewise), or a unique prefix of an instance or an id in
// hex (the full value is a prefix of itself; `vms` shows both).
func (d *Daemon) resolve(q string) (conceal.Digest, bool, error) {
	if id, ok := d.mux.Lookup(q); ok {
		return id, true, nil
	}
	infos, err := d.mux.VMs()
	if err != nil {
		return conceal.Digest{}, false, err
	}
	lq := strings.ToLower(strings.TrimSpace(q))
	var byName, byUUID, byPrefix []mux.VMInfo
	for _, v := range infos {
		switch {
		case v.Name == q:
			byName = append(byName, v)
		case conceal.FormatUUID(v.UUID) == lq:
			byUUID = append(byUUID, v)
		case isHexPrefix(lq) && (strings.HasPrefix(hex.EncodeToString(v.ID[:]), lq) || strings.HasPrefix(hex.EncodeToString(v.Instance[:]), lq)):
			byPrefix = append(byPrefix, v)
		}
	}
	for _, c := range []struct {
		what string
		vms  []mux.VMInfo
	}{{"named", byName}, {"with uuid", byUUID}, {"whose instance or id starts with", byPrefix}} {
		if len(c.vms) == 0 {
			continue
		}
		if v, ok := pick(c.vms); ok {
			return v.ID, v.Live, nil
		}
		return conceal.Digest{}, false, fmt.Errorf("%d vm instances %s %s, none live (%s): %s", len(c.vms), c.what, q, describe(c.vms), resolveHint)
	}
	if lq != "" && !isHexPrefix(lq) && isHex(lq) {
		return conceal.Digest{}, false, fmt.Errorf("no vm %s: an instance or id prefix needs at least %d hex digits; %s", q, minPrefix, resolveHint)
	}
	return conceal.Digest{}, false, fmt.Errorf("no vm %s: %s", q, resolveHint)
}

// pick returns the one instance of vms to serve: the live one, else the
// only one.
func pick(vms []mux.VMInfo) (mux.VMInfo, bool) {
	for _, v := range vms {
		if v.Live {
			return v, true
		}
	}
	if len(vms) == 1 {
		return vms[0], true
	}
	return mux.VMInfo{}, false
}

// describe lists instances for an ambiguity error: name and instance.
func describe(vms []mux.VMInfo) string {
	parts := make([]string, 0, len(vms))
	for _, v := range vms {
		parts = append(parts, fmt.Sprintf("%s instance %x", v.Name, v.Instance[:6]))
	}
	return strings.Join(parts, ", ")
}

func isHex(s string) bool {
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return s != ""
}

func isHexPrefix(s string) bool { return len(s) >= minPrefix && isHex(s) }
