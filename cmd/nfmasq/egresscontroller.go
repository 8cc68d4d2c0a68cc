package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/nfmasq/nfmasq/internal/kube"
)

// egressControllerFlags are the flags of `nfmasq egress-controller`.
type egressControllerFlags struct {
	clusterCIDRs    []string
	generateDefault bool
	configMap       string
	configMapKey    string
	leaderElect     bool
	leaseName       string
	kubeconfig      string
	resync          time.Duration
	metricsAddr     string
	logFormat       string
	logLevel        string
}

func newEgressControllerCmd() *cobra.Command {
	return egressControllerCmd(new(egressControllerFlags))
}

// egressControllerCmd is the command, parsing its flags into f.
func egressControllerCmd(f *egressControllerFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "egress-controller --cluster-cidr CIDR... [flags]",
		Short: "Write the agent's ConfigMap from the cluster's EgressNATPolicy objects",
		Long: `Run the EgressNATPolicy controller (one Deployment per cluster). It watches
EgressNATPolicy objects (networking.gke.io/v1) and writes the union of the
NoSNAT destinations of the valid ones into the agent's ConfigMap, as
nonMasqueradeCIDRs; the other fields of the agent's config (masqLinkLocal,
resyncInterval, ...) are left as they are. The --cluster-cidr ranges form
the managed policy gke-<hash>-1, which the controller creates and restores
if it is edited or deleted. A policy with an invalid CIDR or action gets a
Valid=False condition and a Warning event and is skipped; the others still
apply. The ConfigMap is written only when its content changes.

With --generate-default-policy (on by default) the controller also keeps a
policy named "default" with GKE's default ranges, as GKE generates one: it
creates it whenever it is missing, at start or after a deletion, and never
changes an existing one. The operator owns its spec: edit its destinations
to change the defaults, empty them to drop the defaults. Deleting it
restores GKE's ranges at once, rather than at the controller's next
restart, so that NAT never changes because a pod was rescheduled.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runEgressController(cmd.Context(), f, cmd.ErrOrStderr())
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&f.clusterCIDRs, "cluster-cidr", nil,
		"the cluster's pod, service and node ranges (repeatable or comma-separated); they form the managed policy")
	fs.BoolVar(&f.generateDefault, "generate-default-policy", true,
		`create the "default" policy with GKE's default ranges whenever it is missing; an existing one is never changed`)
	fs.StringVar(&f.configMap, "configmap", "kube-system/ip-masq-agent", "the agent's ConfigMap, as NAMESPACE/NAME")
	fs.StringVar(&f.configMapKey, "configmap-key", kube.AgentConfigKey,
		"the ConfigMap data key that the agent's DaemonSet mounts as /etc/config/ip-masq-agent")
	fs.BoolVar(&f.leaderElect, "leader-elect", false,
		"hold a Lease in the ConfigMap's namespace while writing, so only one replica acts")
	fs.StringVar(&f.leaseName, "leader-elect-lease", "nfmasq-egress-controller", "name of the leader-election Lease")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file; empty means the in-cluster service account")
	fs.DurationVar(&f.resync, "resync", 5*time.Minute, "how often everything is checked again without events")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "",
		"serve /metrics and /healthz on this address for a cluster's Prometheus (e.g. :9742; empty: listen on nothing)")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

// options checks the flags and turns them into the controller's options;
// every error is a startup error (exit 2, nothing done).
func (f *egressControllerFlags) options() (kube.EgressOptions, error) {
	var opts kube.EgressOptions
	if len(f.clusterCIDRs) == 0 {
		return opts, errors.New("--cluster-cidr is required: the cluster's pod, service and node ranges, which must never be masqueraded")
	}
	for _, s := range f.clusterCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return opts, fmt.Errorf("--cluster-cidr %q: %w", s, err)
		}
		if p.Masked() != p {
			return opts, fmt.Errorf("--cluster-cidr %q has host bits set; did you mean %s?", s, p.Masked())
		}
		opts.ClusterCIDRs = append(opts.ClusterCIDRs, p)
	}
	ns, name, ok := strings.Cut(f.configMap, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return opts, fmt.Errorf("--configmap %q: want NAMESPACE/NAME", f.configMap)
	}
	if f.configMapKey == "" {
		return opts, errors.New("--configmap-key is empty")
	}
	if f.resync <= 0 {
		return opts, fmt.Errorf("--resync %s: must be positive", f.resync)
	}
	opts.GenerateDefaultPolicy = f.generateDefault
	opts.ConfigMap = types.NamespacedName{Namespace: ns, Name: name}
	opts.ConfigMapKey = f.configMapKey
	opts.Resync = f.resync
	return opts, nil
}

func runEgressController(ctx context.Context, f *egressControllerFlags, stderr io.Writer) error {
	log, err := newLogger(stderr, f.logFormat, f.logLevel)
	if err != nil {
		return startupError(err)
	}
	opts, err := f.options()
	if err != nil {
		return startupError(err)
	}
	opts.Logger = log
	// client-go's own messages (leader election, reflector retries) go to
	// the same log in the same format.
	klog.SetSlogLogger(log)

	cfg, err := kube.Config(f.kubeconfig)
	if err != nil {
		return startupError(err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return startupError(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return startupError(err)
	}
	controller, err := kube.NewEgressController(client, dyn, opts)
	if err != nil {
		return startupError(err)
	}
	if f.metricsAddr != "" {
		ln, err := net.Listen("tcp", f.metricsAddr)
		if err != nil {
			return startupError(fmt.Errorf("--metrics-addr: %w", err))
		}
		reg := prometheus.NewRegistry()
		reg.MustRegister(controller, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()
	if !f.leaderElect {
		return controller.Run(ctx)
	}
	le := kube.LeaderElection{Namespace: opts.ConfigMap.Namespace, Name: f.leaseName}
	log.Info("waiting for the leader lease", "lease", le.Namespace+"/"+le.Name)
	err = kube.RunLeading(ctx, client, le, controller.Run)
	if errors.Is(err, kube.ErrLostLeadership) {
		// Exit so the Deployment restarts the pod as a follower; acting on
		// after losing the lease could race the new leader.
		return &exitError{code: exitFailure, err: err}
	}
	return err
}
