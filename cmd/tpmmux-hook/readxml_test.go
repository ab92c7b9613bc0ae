package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/libvirt"
)

// TestReadXML checks the hook's bounded read of the domain XML: a stdin
// that never ends is given up at the deadline, and too much, nothing or a
// good document each get their answer.
func TestReadXML(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	tests := []struct {
		name string
		in   io.Reader
		wait time.Duration // the hook's deadline
		err  string
	}{
		{name: "stdin never closes", in: pr, wait: 100 * time.Millisecond, err: "not received on stdin in time"},
		{name: "too large", in: bytes.NewReader(make([]byte, libvirt.MaxDomainXML+1)), wait: time.Minute, err: "exceeds"},
		{name: "empty", in: strings.NewReader(" \n"), wait: time.Minute, err: "no domain XML"},
		{name: "good", in: strings.NewReader("<domain/>"), wait: time.Minute},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tc.wait)
			defer cancel()
			b, err := readXML(ctx, tc.in)
			if tc.err == "" {
				if err != nil || string(b) != "<domain/>" {
					t.Fatalf("readXML = %q, %v", b, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want one containing %q", err, tc.err)
			}
		})
	}
}
