package kube

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// egressStats are the controller's counters, read at scrape time.
type egressStats struct {
	ok, failed atomic.Uint64
	lastOK     atomic.Int64 // unix nanoseconds of the last successful reconcile
	running    atomic.Bool  // Run is active (with leader election: leading)
}

var (
	descReconciles = prometheus.NewDesc("nfmasq_egress_controller_reconciles_total",
		"Reconciliations of EgressNATPolicies into the agents' ConfigMap, by result (success, error; errors are retried with back-off).", []string{"result"}, nil)
	descLastOK = prometheus.NewDesc("nfmasq_egress_controller_last_success_timestamp_seconds",
		"When the ConfigMap last agreed with the policies (0: not yet).", nil, nil)
	descRunning = prometheus.NewDesc("nfmasq_egress_controller_leading",
		"1 while this replica reconciles (holds the leader lease, or runs without leader election).", nil, nil)
)

// Describe implements prometheus.Collector.
func (c *EgressController) Describe(ch chan<- *prometheus.Desc) {
	ch <- descReconciles
	ch <- descLastOK
	ch <- descRunning
}

// Collect implements prometheus.Collector.
func (c *EgressController) Collect(ch chan<- prometheus.Metric) {
	s := &c.stats
	ch <- prometheus.MustNewConstMetric(descReconciles, prometheus.CounterValue, float64(s.ok.Load()), "success")
	ch <- prometheus.MustNewConstMetric(descReconciles, prometheus.CounterValue, float64(s.failed.Load()), "error")
	last := 0.0
	if ns := s.lastOK.Load(); ns > 0 {
		last = float64(ns) / float64(time.Second)
	}
	ch <- prometheus.MustNewConstMetric(descLastOK, prometheus.GaugeValue, last)
	running := 0.0
	if s.running.Load() {
		running = 1
	}
	ch <- prometheus.MustNewConstMetric(descRunning, prometheus.GaugeValue, running)
}
