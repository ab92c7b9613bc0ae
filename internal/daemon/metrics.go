package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tpmmux/tpmmux/internal/mux"
)

// metrics are the bridge's Prometheus metrics, in their own registry
// (never the global one). Counters that the multiplexer already keeps
// are read from its Stats at scrape time; distributions come from the
// multiplexer's Observer hook.
type metrics struct {
	reg         *prometheus.Registry
	batchSize   prometheus.Histogram
	extendSecs  prometheus.Histogram
	quoteSecs   prometheus.Histogram
	controlReqs *prometheus.CounterVec
}

var _ mux.Observer = (*metrics)(nil)

func newMetrics(d *Daemon) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.batchSize = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "tpmmux_batch_size_records",
		Help:    "Records per committed batch (one TPM extend each).",
		Buckets: prometheus.ExponentialBuckets(1, 2, 14), // 1 … 8192
	})
	m.extendSecs = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "tpmmux_extend_duration_seconds",
		Help:    "Latency of TPM2_PCR_Extend of the multiplexer PCR.",
		Buckets: prometheus.ExponentialBuckets(25e-6, 2, 18), // 25µs … 3.3s
	})
	m.quoteSecs = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "tpmmux_quote_duration_seconds",
		Help:    "Latency of a quote: PCR read, TPM2_Quote and its check.",
		Buckets: prometheus.ExponentialBuckets(250e-6, 2, 16), // 250µs … 8s
	})
	m.controlReqs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tpmmux_control_requests_total",
		Help: "Lifecycle and evidence requests on the control socket, by op and result.",
	}, []string{"op", "result"})
	m.reg.MustRegister(m.batchSize, m.extendSecs, m.quoteSecs, m.controlReqs, &stateCollector{d: d},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Batch implements mux.Observer.
func (m *metrics) Batch(records int) { m.batchSize.Observe(float64(records)) }

// Extend implements mux.Observer.
func (m *metrics) Extend(d time.Duration) { m.extendSecs.Observe(d.Seconds()) }

// Quote implements mux.Observer.
func (m *metrics) Quote(d time.Duration) { m.quoteSecs.Observe(d.Seconds()) }

// stateCollector reads the multiplexer's counters and the daemon's state
// at scrape time.
type stateCollector struct{ d *Daemon }

var (
	descRecords  = prometheus.NewDesc("tpmmux_ingest_records_total", "Records made durable and extended (all VMs, all kinds).", nil, nil)
	descBatches  = prometheus.NewDesc("tpmmux_batches_total", "Batches committed.", nil, nil)
	descExtends  = prometheus.NewDesc("tpmmux_extends_total", "TPM extends of the multiplexer PCR.", nil, nil)
	descQuotes   = prometheus.NewDesc("tpmmux_quotes_total", "Quotes taken.", nil, nil)
	descQueue    = prometheus.NewDesc("tpmmux_queue_depth", "Records queued for the next batch.", nil, nil)
	descLive     = prometheus.NewDesc("tpmmux_live_vms", "VM instances with a live identity.", nil, nil)
	descVMRecs   = prometheus.NewDesc("tpmmux_vm_records", "Durable records of a live VM instance.", []string{"vm"}, nil)
	descRefused  = prometheus.NewDesc("tpmmux_refused_connections_total", "Guest connections refused by a listener's peer check (vsock peer CID).", nil, nil)
	descDropped  = prometheus.NewDesc("tpmmux_dropped_connections_total", "Guest connections closed because the VM held too many.", nil, nil)
	descSessions = prometheus.NewDesc("tpmmux_live_sessions", "Guest connections being served.", nil, nil)
	descFault    = prometheus.NewDesc("tpmmux_fault", "1 while the log and the PCR are out of step (nothing is acknowledged).", nil, nil)
	descEpoch    = prometheus.NewDesc("tpmmux_epoch", "Current epoch of the public log.", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRecords, descBatches, descExtends, descQuotes, descQueue, descLive,
		descVMRecs, descRefused, descDropped, descSessions, descFault, descEpoch} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	if d.mux == nil {
		return
	}
	st := d.mux.Status()
	counter := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, v, labels...)
	}
	gauge := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, labels...)
	}
	counter(descRecords, float64(st.Stats.Records))
	counter(descBatches, float64(st.Stats.Batches))
	counter(descExtends, float64(st.Stats.Extends))
	counter(descQuotes, float64(st.Stats.Quotes))
	gauge(descQueue, float64(st.Queued))
	gauge(descLive, float64(st.LiveVMs))
	counter(descRefused, float64(d.refusedTotal()))
	counter(descDropped, float64(d.dropped.Load()))
	gauge(descSessions, float64(d.sessions.Load()))
	fault := 0.0
	if st.Fault != "" {
		fault = 1
	}
	gauge(descFault, fault)
	gauge(descEpoch, float64(st.Epoch))
	// Per-VM series only for the live instances the daemon serves: the
	// label set stays bounded by the VMs running on this host.
	d.mu.Lock()
	entries := make([]*vmEntry, 0, len(d.vms))
	for _, e := range d.vms {
		entries = append(entries, e)
	}
	d.mu.Unlock()
	for _, e := range entries {
		if n, err := d.mux.NextSeq(e.id); err == nil {
			gauge(descVMRecs, float64(n), e.name)
		}
	}
}

// startMetrics serves /metrics on addr, a loopback address.
func (d *Daemon) startMetrics(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	h := http.NewServeMux()
	h.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{Timeout: 10 * time.Second}))
	d.metricsLn = ln
	d.metricsSrv = &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 30 * time.Second}
	go func() {
		if err := d.metricsSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics endpoint stopped", "err", err)
		}
	}()
	return nil
}
