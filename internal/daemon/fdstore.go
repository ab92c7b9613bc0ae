package daemon

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// fdStore keeps file descriptors in systemd's file descriptor store
// (sd_notify(3) FDSTORE=1; the unit sets FileDescriptorStoreMax=), and
// takes back those a previous process stored (sd_listen_fds(3):
// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, fds from 3 on). QEMU's TPM
// emulator never reconnects, so a vTPM's control connection, its data
// socket and its in-flight record must outlive a bridge crash: systemd
// holds a copy of each and gives them to the restarted bridge.
//
// Outside systemd (no NOTIFY_SOCKET) the store is off: nothing is kept.
type fdStore struct {
	sock string // $NOTIFY_SOCKET
	log  *slog.Logger

	mu        sync.Mutex
	inherited map[string]*os.File
}

// newFDStore reads the environment systemd sets and takes the inherited
// fds (closing on exec), then clears those variables so children do not
// see them.
func newFDStore(log *slog.Logger) *fdStore {
	s := &fdStore{sock: os.Getenv("NOTIFY_SOCKET"), log: log, inherited: map[string]*os.File{}}
	defer func() {
		for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
			os.Unsetenv(k)
		}
	}()
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return s
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return s
	}
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < n; i++ {
		fd := 3 + i
		unix.CloseOnExec(fd)
		name := "unknown"
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
		f := os.NewFile(uintptr(fd), name)
		if old, dup := s.inherited[name]; dup {
			old.Close()
		}
		s.inherited[name] = f
	}
	log.Info("file descriptors handed back by systemd", "count", n)
	return s
}

// on says whether fds are kept (the bridge runs under systemd).
func (s *fdStore) on() bool { return s.sock != "" }

// notify sends one sd_notify datagram with state and fds.
func (s *fdStore) notify(state string, fds ...int) error {
	if s.sock == "" {
		return nil
	}
	name := s.sock
	if strings.HasPrefix(name, "@") {
		name = "\x00" + name[1:]
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer unix.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(fd, []byte(state), oob, &unix.SockaddrUnix{Name: name}, 0); err != nil {
		return fmt.Errorf("sd_notify %s: %w", s.sock, err)
	}
	return nil
}

// put stores f under name (one fd per name, so the order of names and fds
// cannot get mixed up); a stored fd of the same name is replaced.
func (s *fdStore) put(name string, f *os.File) error {
	if !s.on() {
		return nil
	}
	if err := s.notify("FDSTOREREMOVE=1\nFDNAME=" + name); err != nil {
		return err
	}
	return s.notify("FDSTORE=1\nFDNAME="+name, int(f.Fd()))
}

// remove drops the fds stored under name.
func (s *fdStore) remove(names ...string) {
	for _, n := range names {
		if err := s.notify("FDSTOREREMOVE=1\nFDNAME=" + n); err != nil {
			s.log.Warn("fd store", "name", n, "err", err)
		}
	}
}

// take returns (and forgets) the inherited fd stored under name, or nil.
func (s *fdStore) take(name string) *os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.inherited[name]
	delete(s.inherited, name)
	return f
}

// leftovers closes the inherited fds no one took (VMs that ended while the
// bridge was away) and drops them from systemd's store.
func (s *fdStore) leftovers() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, f := range s.inherited {
		f.Close()
		s.remove(name)
		s.log.Info("dropped a kept file descriptor no live VM claims", "name", name)
	}
	s.inherited = map[string]*os.File{}
}
