package main

import (
	"bytes"
	"strings"
	"testing"
)

// Without --pod-cidr and without a cluster to ask, the agent refuses to
// start with a message that says what is missing.
func TestAgentNeedsPodCIDR(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	var stdout, stderr bytes.Buffer
	code := run([]string{"agent", "--metrics-addr", ""}, &stdout, &stderr)
	if code != exitConfig {
		t.Fatalf("exit %d, want %d; stderr:\n%s", code, exitConfig, stderr.String())
	}
	if !strings.Contains(stderr.String(), "no --pod-cidr given") {
		t.Errorf("stderr does not say what is missing:\n%s", stderr.String())
	}
}
