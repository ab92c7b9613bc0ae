package vtpm

import (
	"context"
	"net"
	"testing"
	"time"
)

// connFD returns c's fd number.
func connFD(t *testing.T, c *net.UnixConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(fd uintptr) { n = int(fd) })
	return n
}

// TestParkerClosedAndReused: a parked socket that its owner closes (a
// daemon closes a VM's listener, then cancels the VM's context) must not,
// when its cancellation wakes it, take out of the Parker another socket
// parked under the same fd number since: that one is still woken by its
// bytes. (Taking it out by the stored fd number would leave it parked for
// ever.)
func TestParkerClosedAndReused(t *testing.T) {
	p, err := NewParker()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for attempt := 0; ; attempt++ {
		_, oldServer := idlePair(t)
		ctx1, cancel1 := context.WithCancel(context.Background())
		oldWoken := make(chan struct{})
		if !p.park(ctx1, oldServer, func() { close(oldWoken) }) {
			t.Fatal("not parked")
		}
		oldFD := connFD(t, oldServer)
		oldServer.Close() // against the rule: closed while parked

		peer, server := idlePair(t)
		if connFD(t, server) != oldFD {
			cancel1()
			if attempt == 10 {
				t.Skip("the fd number was not reused")
			}
			continue
		}
		woken := make(chan struct{})
		if !p.park(context.Background(), server, func() { close(woken) }) {
			t.Fatal("not parked")
		}
		cancel1() // wakes the closed one
		select {
		case <-oldWoken:
		case <-time.After(5 * time.Second):
			t.Fatal("the closed socket's cancellation did not wake it")
		}
		peer.Write([]byte("x"))
		select {
		case <-woken:
		case <-time.After(5 * time.Second):
			t.Fatal("a socket parked under a closed one's fd number is not woken by its bytes")
		}
		return
	}
}
