//! Prometheus metrics: counted where things happen, encoded as text on `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

/// A stream's coverage series: one per report level, for the first and the last calibrated
/// step (every step is in `GET /v1/streams/{name}`; here, a bounded number per stream).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoverageLabels {
    pub stream: String,
    pub level: String,
    pub step: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 µs .. ~16 s.
    Histogram::new(exponential_buckets(1e-6, 2.0, 25))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub observations: Family<StreamLabel, Counter>,
    pub duplicates: Family<StreamLabel, Counter>,
    pub update_seconds: Histogram,
    pub batch_seconds: Histogram,
    pub mse: Family<StreamLabel, FloatGauge>,
    pub mse_scaled: Family<StreamLabel, FloatGauge>,
    pub spread: Family<StreamLabel, FloatGauge>,
    pub last_seq: Family<StreamLabel, Gauge>,
    pub failed: Family<StreamLabel, Gauge>,
    pub coverage: Family<CoverageLabels, FloatGauge>,
    pub streams: Gauge,
    pub request_memory: Gauge,
    pub storage_errors: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_seconds: HistogramFamily<RouteLabel>,
    /// Cluster mode only (registered by [`Metrics::clustered`]).
    pub cluster_append_seconds: Histogram,
    pub cluster_refused_records: Counter,
    pub cluster_forwards: Counter,
    pub cluster_partitions: Gauge,
    pub cluster_acquired: Gauge,
    pub cluster_lost: Gauge,
    pub cluster_released: Gauge,
    pub cluster_connected: Gauge,
    pub cluster_notices: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            observations: Family::default(),
            duplicates: Family::default(),
            update_seconds: latency_histogram(),
            batch_seconds: latency_histogram(),
            mse: Family::default(),
            mse_scaled: Family::default(),
            spread: Family::default(),
            last_seq: Family::default(),
            failed: Family::default(),
            coverage: Family::default(),
            streams: Gauge::default(),
            request_memory: Gauge::default(),
            storage_errors: Counter::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            cluster_append_seconds: latency_histogram(),
            cluster_refused_records: Counter::default(),
            cluster_forwards: Counter::default(),
            cluster_partitions: Gauge::default(),
            cluster_acquired: Gauge::default(),
            cluster_lost: Gauge::default(),
            cluster_released: Gauge::default(),
            cluster_connected: Gauge::default(),
            cluster_notices: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ekid_observations",
            "Observations applied",
            m.observations.clone(),
        );
        registry.register(
            "ekid_duplicates",
            "Observations skipped as already applied (idempotent retries)",
            m.duplicates.clone(),
        );
        registry.register(
            "ekid_update_seconds",
            "Time to learn one observation (predict + EKI update), averaged over each group of batches applied together; the log and snapshots are in ekid_batch_seconds",
            m.update_seconds.clone(),
        );
        registry.register(
            "ekid_batch_seconds",
            "Time to apply one group of queued batches: log append (and fsync by policy), learning, and a snapshot when due",
            m.batch_seconds.clone(),
        );
        registry.register(
            "ekid_stream_prequential_mse",
            "Prequential mean squared error, original units",
            m.mse.clone(),
        );
        registry.register(
            "ekid_stream_prequential_mse_scaled",
            "Prequential mean squared error, model units",
            m.mse_scaled.clone(),
        );
        registry.register(
            "ekid_stream_spread",
            "Standard deviation of the particles' last predictions, original units",
            m.spread.clone(),
        );
        registry.register(
            "ekid_stream_last_seq",
            "Last applied sequence number",
            m.last_seq.clone(),
        );
        registry.register(
            "ekid_stream_failed",
            "1 if the stream's owner failed",
            m.failed.clone(),
        );
        registry.register(
            "ekid_stream_coverage",
            "Running share of observations inside the interval served for them at `level`, `step` steps ahead (the first and the last calibrated step)",
            m.coverage.clone(),
        );
        registry.register("ekid_streams", "Streams open", m.streams.clone());
        registry.register(
            "ekid_request_memory_bytes",
            "What the requests in flight are charged of the memory budget while they read and decode their bodies",
            m.request_memory.clone(),
        );
        registry.register(
            "ekid_storage_errors",
            "Failed log appends, fsyncs and snapshots",
            m.storage_errors.clone(),
        );
        registry.register(
            "ekid_http_requests",
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "ekid_http_request_seconds",
            "HTTP request latency by route",
            m.http_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

pub fn coverage_labels(stream: &str, level: f64, step: usize) -> CoverageLabels {
    CoverageLabels {
        stream: stream.to_owned(),
        level: level.to_string(),
        step: step as u32,
    }
}

impl Metrics {
    /// The metrics of a node in a cluster: the usual ones and the cluster's.
    pub fn clustered() -> Self {
        let mut m = Metrics::default();
        let r = &mut m.registry;
        r.register(
            "ekid_cluster_append_seconds",
            "Time to append one record to a stream's replicated log, until JetStream confirms it is stored on a quorum",
            m.cluster_append_seconds.clone(),
        );
        r.register(
            "ekid_cluster_refused_records",
            "Log records (published directly by producers) that their stream refused",
            m.cluster_refused_records.clone(),
        );
        r.register(
            "ekid_cluster_forwards",
            "Requests forwarded to the node that owns their stream",
            m.cluster_forwards.clone(),
        );
        r.register(
            "ekid_cluster_partitions_owned",
            "Partitions of streams this node owns and serves",
            m.cluster_partitions.clone(),
        );
        r.register(
            "ekid_cluster_partitions_acquired",
            "Partition leases this node acquired since it started (takeovers included)",
            m.cluster_acquired.clone(),
        );
        r.register(
            "ekid_cluster_partitions_lost",
            "Partition leases this node lost (not renewed in time, or taken)",
            m.cluster_lost.clone(),
        );
        r.register(
            "ekid_cluster_partitions_released",
            "Partition leases this node handed over to another node",
            m.cluster_released.clone(),
        );
        r.register(
            "ekid_cluster_connected",
            "1 while this node is connected to NATS",
            m.cluster_connected.clone(),
        );
        r.register(
            "ekid_cluster_log_notices",
            "Notices of log records this node received: the records of the partitions it owns only",
            m.cluster_notices.clone(),
        );
        m
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Drops a deleted stream's series (`horizon`: its calibrated steps).
    pub fn forget(&self, stream: &str, horizon: usize) {
        let l = StreamLabel {
            stream: stream.to_owned(),
        };
        self.observations.remove(&l);
        self.duplicates.remove(&l);
        self.mse.remove(&l);
        self.mse_scaled.remove(&l);
        self.spread.remove(&l);
        self.last_seq.remove(&l);
        self.failed.remove(&l);
        for level in crate::engine::REPORT_LEVELS {
            for step in [1, horizon] {
                self.coverage.remove(&coverage_labels(stream, level, step));
            }
        }
    }
}
