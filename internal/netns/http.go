package netns

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
