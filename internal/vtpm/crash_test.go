package vtpm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// crashJournal is a test journal that can stop forever inside Append,
// before or after recording: the bridge dying there.
type crashJournal struct {
	vtpmtest.Journal
	mode    atomic.Int32 // 0 normal, 1 record then hang, 2 hang before recording
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (c *crashJournal) Append(ctx context.Context, e vpcr.Event) error {
	switch c.mode.Load() {
	case 1:
		c.Journal.Append(ctx, e)
		c.once.Do(func() { close(c.entered) })
		<-c.release
		return errors.New("the process is dead")
	case 2:
		c.once.Do(func() { close(c.entered) })
		<-c.release
		return errors.New("the process is dead")
	}
	return c.Journal.Append(ctx, e)
}

func openInflight(t *testing.T, path string) *vtpm.FileInflight {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := vtpm.NewFileInflight(f)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// TestCrashMidCommand: the bridge dies (kill -9) while a guest's PCR_Extend
// waits for the journal, once after the record became durable and once
// before. The next process, restored from the journal and the in-flight
// record, answers that command exactly once: one journal record, the vPCR
// extended once, the guest's answer success, the locality kept, and the
// data channel in step for the next command.
func TestCrashMidCommand(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode int32
	}{{"after the record is durable", 1}, {"before the record is durable", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			j := &crashJournal{entered: make(chan struct{}), release: make(chan struct{})}
			defer close(j.release)
			path := filepath.Join(t.TempDir(), "inflight")
			v1, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Inflight: openInflight(t, path)}, nil)
			if err != nil {
				t.Fatal(err)
			}
			qemuData, bridgeData := socketPair(t)
			ctx1, stop1 := context.WithCancel(context.Background())
			defer stop1()
			go v1.ServeData(ctx1, bridgeData)
			v1.Init(ctx1)
			if rc := respRC(t, qemuData, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}); rc != 0 {
				t.Fatal(rc)
			}
			v1.SetLocality(3)
			d1, d2, d3 := sha256.Sum256([]byte("1")), sha256.Sum256([]byte("2")), sha256.Sum256([]byte("3"))
			if rc := respRC(t, qemuData, rawExtendWithSession(0x40000009, 10, d1[:])); rc != 0 {
				t.Fatal(rc)
			}
			j.mode.Store(tc.mode)
			if _, err := qemuData.Write(rawExtendWithSession(0x40000009, 10, d2[:])); err != nil {
				t.Fatal(err)
			}
			select {
			case <-j.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the extend never reached the journal")
			}
			// kill -9: the process is gone with the command it had read;
			// the fds live on (FDSTORE) and go to the next process.
			data2 := fdHandover(t, bridgeData)
			j.mode.Store(0)

			v2, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Inflight: openInflight(t, path)}, j.Events())
			if err != nil {
				t.Fatal(err)
			}
			if v2.Locality() != 3 {
				t.Fatalf("locality after the crash %d, want 3", v2.Locality())
			}
			ctx2, stop2 := context.WithCancel(context.Background())
			defer stop2()
			go v2.ServeData(ctx2, data2)
			if rc := respRC(t, qemuData, nil); rc != 0 {
				t.Fatalf("the in-flight extend's answer: rc %#x", rc)
			}
			var extends int
			for _, e := range j.Events() {
				if e.Kind == vpcr.KindExtend {
					extends++
					if e.Locality != 3 {
						t.Fatalf("extend journaled at locality %d", e.Locality)
					}
				}
			}
			if extends != 2 {
				t.Fatalf("%d extends journaled, want 2 (the in-flight one exactly once)", extends)
			}
			want := extendOf(extendOf(make([]byte, 32), d1[:]), d2[:])
			if got := v2.PCRs().Read(vpcr.SHA256, 10); !bytes.Equal(got, want) {
				t.Fatalf("PCR 10 %x, want %x", got, want)
			}
			// In step: the next command gets its own answer.
			if rc := respRC(t, qemuData, rawExtendWithSession(0x40000009, 10, d3[:])); rc != 0 {
				t.Fatal(rc)
			}
			if got := v2.PCRs().Read(vpcr.SHA256, 10); !bytes.Equal(got, extendOf(want, d3[:])) {
				t.Fatal("PCR 10 after the next extend")
			}
			replayed, err := vpcr.Replay(vtpm.DefaultBanks(), j.Events())
			if err != nil || !replayed.Equal(v2.PCRs()) {
				t.Fatalf("replay: %v", err)
			}
		})
	}
}

// TestIsolation: one VM's vTPM stuck (its journal never returns, its guest
// sends half a command and garbage) does not slow another VM's vTPM.
func TestIsolation(t *testing.T) {
	stuck := &crashJournal{entered: make(chan struct{}), release: make(chan struct{})}
	defer close(stuck.release)
	stuck.mode.Store(2)
	va, err := vtpm.New(vtpm.Config{Journal: stuck, Logger: quietLog()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	aClient, aServer := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go va.ServeData(ctx, aServer)
	// INIT is journaled too, so A is stuck from its very first command.
	go va.Init(ctx)
	<-stuck.entered
	aClient.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0}) // half a command
	aClient.Write(bytes.Repeat([]byte{0xAB}, 4096))      // and garbage

	b := newRig(t, nil, nil)
	b.powerOn(t)
	d := sha256.Sum256([]byte("b"))
	start := time.Now()
	for range 100 {
		if rc := respRC(t, b.raw, rawExtendWithSession(0x40000009, 10, d[:])); rc != 0 {
			t.Fatalf("B's extend: rc %#x", rc)
		}
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("100 extends on B took %v while A was stuck", el)
	}
	if n := len(b.j.Events()); n != 102 {
		t.Fatalf("B journaled %d events, want 102", n)
	}
}
