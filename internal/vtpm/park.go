package vtpm

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Parker holds the idle connections of many vTPMs with one goroutine for
// all of them, so that an idle VM costs no goroutine stack (docs/vtpm.md,
// Memory): a channel with no command for bufIdle gives up its goroutine
// and its socket waits in the Parker's epoll instance; when the socket
// becomes readable, its peer hangs up, or the serving context ends, a new
// goroutine goes on serving it. The epoll instance waits in the Go
// runtime's poller (it is itself pollable), so the Parker holds no thread.
//
// A parked connection must not be closed by anyone but its server: a
// closed socket leaves the epoll set without an event. The servers end a
// parked data channel by shutting its read side (which wakes it) instead.
type Parker struct {
	f    *os.File // the epoll instance
	rc   syscall.RawConn
	done chan struct{}

	mu     sync.Mutex
	next   uint64
	parked map[uint64]*parked
	closed bool
}

// parked is one waiting connection.
type parked struct {
	rc     syscall.RawConn // the connection's, to take it out of the set
	resume func()
	stop   func() bool // the context's AfterFunc
}

// NewParker starts a Parker. Close ends it.
func NewParker() (*Parker, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("vtpm: parker: epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vtpm: parker: %w", err)
	}
	f := os.NewFile(uintptr(fd), "vtpm-parker")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("vtpm: parker: %w", err)
	}
	p := &Parker{f: f, rc: rc, done: make(chan struct{}), parked: map[uint64]*parked{}}
	go p.run()
	return p, nil
}

// Close stops the Parker. The connections it holds are handed back to
// their servers, which from then on wait with a goroutine each.
func (p *Parker) Close() error {
	err := p.f.Close()
	<-p.done
	return err
}

// Parked returns how many connections wait in p (for tests and metrics).
func (p *Parker) Parked() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.parked)
}

// run collects the epoll events until p closes, then resumes every
// connection still parked.
func (p *Parker) run() {
	defer close(p.done)
	evs := make([]unix.EpollEvent, 64)
	// Read ends when p.f closes (or epoll_wait fails, which it does not
	// on a valid instance); either way the connections go back to their
	// servers below.
	p.rc.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), evs, 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return true
			}
			for _, ev := range evs[:n] {
				p.wake(uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32)
			}
			if n < len(evs) {
				return false // wait for the next event
			}
		}
	})
	p.mu.Lock()
	p.closed = true
	ids := make([]uint64, 0, len(p.parked))
	for id := range p.parked {
		ids = append(ids, id)
	}
	p.mu.Unlock()
	for _, id := range ids {
		p.wake(id)
	}
}

// park registers c: resume runs in a new goroutine once c is readable, its
// peer hung up or ctx ended. It returns false if c cannot be parked (not a
// pollable socket, or p closed); the caller then waits itself.
func (p *Parker) park(ctx context.Context, c syscall.Conn, resume func()) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	e := &parked{rc: rc, resume: resume}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false
	}
	p.next++
	id := p.next
	var addErr error
	cerr := rc.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
		addErr = p.ctl(unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if cerr != nil || addErr != nil {
		p.mu.Unlock()
		return false
	}
	p.parked[id] = e
	p.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { p.wake(id) })
	p.mu.Lock()
	if e, ok := p.parked[id]; ok {
		e.stop = stop
		p.mu.Unlock()
	} else {
		p.mu.Unlock()
		stop() // woken already
	}
	return true
}

// ctl is epoll_ctl on p's instance (an error once it is closed).
func (p *Parker) ctl(op, fd int, ev *unix.EpollEvent) error {
	var err error
	if cerr := p.rc.Control(func(epfd uintptr) { err = unix.EpollCtl(int(epfd), op, fd, ev) }); cerr != nil {
		return cerr
	}
	return err
}

// wake resumes the connection parked as id, if it still is.
func (p *Parker) wake(id uint64) {
	p.mu.Lock()
	e, ok := p.parked[id]
	delete(p.parked, id)
	p.mu.Unlock()
	if !ok {
		return
	}
	// Out of the set before the server can close the socket. Through
	// the connection's Control: if someone closed it meanwhile (against
	// the rule above), its fd number may name another socket by now, one
	// that may be parked too, and must not be taken out; Control then
	// fails and nothing is done (the kernel dropped the closed socket
	// from the set, or, if a dup keeps it open, it stays without an
	// entry: an event for it finds none and is ignored).
	e.rc.Control(func(fd uintptr) { p.ctl(unix.EPOLL_CTL_DEL, int(fd), nil) })
	if e.stop != nil {
		e.stop()
	}
	go e.resume()
}

// park parks c in v's Parker (see Parker.park); false without one.
func (v *VTPM) park(ctx context.Context, c any, resume func()) bool {
	if v.parker == nil {
		return false
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	return v.parker.park(ctx, sc, resume)
}
