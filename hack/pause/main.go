// Command pause is the sandbox process of the pods on the local node that
// hack/kube-node.sh runs: it holds the pod's namespaces, reaps the zombies
// it inherits as the pod's init, and exits on SIGINT or SIGTERM, as
// Kubernetes' own pause does. It is built into a local image so that the
// node needs no registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
