// Package kube is nfmasq's Kubernetes side: the EgressNATPolicy controller
// that writes the agent's ConfigMap (and keeps the managed gke-<hash>-1
// policy and, as GKE does, a generated `default` policy that the operator
// owns), the node-local pod index that names the pods behind addresses in
// flow records, the MasqueradePolicy watcher that turns policies,
// namespace labels and the node's pods into the per-pod decisions the
// queue reads (and writes each policy's verdict in its status),
// pod-CIDR discovery from the agent's Node, and the client configuration
// they share.
//
// Concurrency and ownership:
//   - PodIndex.Lookup is safe for concurrent use and never blocks or calls
//     the API server: it reads an immutable map behind an atomic pointer,
//     which the informer's event handler replaces on each change.
//   - MasqueradeWatcher.Workloads is an atomic load of an immutable
//     nat.Workloads, replaced on each change; Changed announces it.
//     Status writes run on their own goroutine and never delay a publish.
//   - EgressController.Run owns its informers and its work queue; one
//     worker reconciles the whole cluster's policies into one ConfigMap, so
//     reconciliations never race each other. Run the controller once per
//     process; RunLeading makes it once per cluster.
//   - Functions taking a context stop when it is done; none keep
//     goroutines running after they return.
//   - Values passed in (clients, prefixes) are not modified; returned
//     slices belong to the caller.
package kube
