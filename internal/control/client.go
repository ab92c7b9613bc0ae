package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// Client calls the bridge's control socket.
type Client struct {
	// Path is the control socket (default DefaultSocket).
	Path string
	// RetryDial keeps dialing, until the context ends, while the socket
	// is missing or nobody listens on it: a bridge that is starting (or
	// restarting) gets the whole time budget to come up.
	RetryDial bool
}

// retryEvery is how often a retrying Client dials again.
const retryEvery = 50 * time.Millisecond

func (c *Client) path() string {
	if c.Path == "" {
		return DefaultSocket
	}
	return c.Path
}

// Call sends req and returns the bridge's answer. It returns a
// *RemoteError when the bridge answered with an error and an
// *UnreachableError when no answer came: no socket, nobody listening, or
// no answer before ctx ended. Call never takes longer than ctx allows.
func (c *Client) Call(ctx context.Context, req *Request) (*Response, error) {
	path := c.path()
	conn, err := c.dial(ctx, path)
	if err != nil {
		return nil, &UnreachableError{Path: path, Err: err}
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		req.Deadline = dl
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	b, err := encodeJSON(req)
	if err != nil {
		return nil, fmt.Errorf("control %s: %w", req.Op, err)
	}
	_, werr := conn.Write(b)
	if uc, ok := conn.(*net.UnixConn); ok && werr == nil {
		uc.CloseWrite()
	}
	// Read the answer even when the request could not be sent whole: the
	// bridge answers a refused peer without reading its request.
	var resp Response
	if err := json.NewDecoder(io.LimitReader(conn, MaxResponse)).Decode(&resp); err != nil {
		if werr != nil {
			return nil, &UnreachableError{Path: path, Err: c.ioErr(ctx, "send request", werr)}
		}
		return nil, &UnreachableError{Path: path, Err: c.ioErr(ctx, "read answer", err)}
	}
	if resp.Error != "" {
		return &resp, &RemoteError{Op: req.Op, Msg: resp.Error}
	}
	return &resp, nil
}

// timeoutError is a step that did not finish before the deadline; it is
// context.DeadlineExceeded.
type timeoutError struct{ what string }

func (e *timeoutError) Error() string { return e.what + ": no answer in time" }
func (e *timeoutError) Unwrap() error { return context.DeadlineExceeded }

func (c *Client) ioErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ETIMEDOUT) {
		return &timeoutError{what}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return &timeoutError{what}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%s: the bridge closed the connection without answering", what)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (c *Client) dial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return conn, nil
		}
		if ctx.Err() != nil {
			return nil, &timeoutError{"connect"}
		}
		retryable := errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
		if !c.RetryDial || !retryable {
			return nil, fmt.Errorf("connect: %w", unwrapOp(err))
		}
		t := time.NewTimer(retryEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("connect: %w, retried until the deadline", unwrapOp(err))
		case <-t.C:
		}
	}
}

// unwrapOp drops net.OpError's "dial unix PATH:" prefix: callers name the
// path themselves.
func unwrapOp(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		err = oe.Err
	}
	var se *os.SyscallError
	if errors.As(err, &se) && se.Err != nil {
		err = se.Err
	}
	return err
}
