package netnstest

import (
	"context"
	"net"
	"net/http"
	"time"
)

// HTTPClient returns a client whose connections are opened inside ns, for
// talking to a server that listens on the namespace's loopback (the
// agent's metrics and health endpoints).
func (n *NS) HTTPClient() *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := n.Do(func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
	}
}

// WaitHTTP polls url through c until it answers 200 or ctx ends.
func WaitHTTP(ctx context.Context, c *http.Client, url string) error {
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = ctx.Err()
			}
			return err
		case <-time.After(50 * time.Millisecond): // polling an endpoint under a deadline
		}
	}
}
