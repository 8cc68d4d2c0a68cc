package sandbox

import (
	"context"
	"net/http"
	"time"
)

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
