// Package sandbox builds the throw-away topology the demo, the live
// benchmark and the kernel tests run in: a pod, a node that forwards, and
// a remote network answering on addresses on each side of the default
// policy, joined by veth pairs. None of the namespaces has a link to the
// host's interfaces, so no traffic leaves the sandbox.
//
// A Sink records the source address each remote address saw; SendUDP and
// SendTCP send from inside a namespace. Build and Close are the caller's
// to pair; everything Build made is removed by Close.
package sandbox
