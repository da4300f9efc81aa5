//! What every handler shares ([`AppState`]): the registry of stream handles, the memory
//! budget, the core permits, metrics and limits; creation, deletion and recovery of streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use super::error::ApiError;
use super::history::History;
use super::metrics::Metrics;
use super::openapi;
use super::owner::{self, Command, Replicated, Sizes, Start, StreamHandle, StreamView};
use super::{Config, Limits};
use crate::cluster::{Cluster, StreamLog};
use crate::engine::{Options, Stream};
use crate::storage::{Recovered, Store};

/// Faults a test can ask the daemon to produce, from the `EKID_FAILPOINTS` environment
/// variable (comma-separated); test-only, empty in production:
/// - `panic-in-update:<stream>` makes every update of that stream panic, to test that a panic
///   fails one stream and nothing else;
/// - `fail-after-options-rename:<stream>` makes creating that stream fail right after its
///   directory (options included) was renamed into place, to test that a failed creation
///   leaves nothing behind;
/// - `delete-after-move:<stream>` (cluster mode) makes a DELETE of that stream, once it has
///   the stream's owner, wait until that owner stops (its partition moved to another node; at
///   most 30 s) before asking it to delete, to test a delete that races a partition move.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    pub panic_in_update: Option<String>,
    pub fail_after_options_rename: Option<String>,
    pub delete_after_move: Option<String>,
}

impl Failpoints {
    fn from_env() -> Self {
        let mut f = Failpoints::default();
        for item in std::env::var("EKID_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
        {
            if let Some(stream) = item.trim().strip_prefix("panic-in-update:") {
                tracing::warn!(stream, "failpoint set: updates of this stream will panic");
                f.panic_in_update = Some(stream.to_owned());
            }
            if let Some(stream) = item.trim().strip_prefix("fail-after-options-rename:") {
                tracing::warn!(stream, "failpoint set: creating this stream will fail");
                f.fail_after_options_rename = Some(stream.to_owned());
            }
            if let Some(stream) = item.trim().strip_prefix("delete-after-move:") {
                tracing::warn!(
                    stream,
                    "failpoint set: deleting this stream waits for a move"
                );
                f.delete_after_move = Some(stream.to_owned());
            }
        }
        f
    }
}

/// Everything handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

pub struct Shared {
    pub config: Config,
    /// Validated stream defaults from the config.
    pub defaults: Options,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    streams: RwLock<Registry>,
    /// Serialises creations and deletions (they do file IO between registry checks). Each
    /// runs in a task of its own holding this lock, so that it finishes even when the request
    /// that started it is dropped (a timeout, a client gone).
    lifecycle: Arc<tokio::sync::Mutex<()>>,
    owners: Mutex<Vec<JoinHandle<()>>>,
    /// One permit per core: a batch update holds as many as its steps use threads, a forecast
    /// roll-out one (handing it on between slices, see `api::roll_out`).
    cores: Arc<Semaphore>,
    /// As many as `cores`: a forecast takes a turn here before it queues for a core, so at
    /// most this many forecasts stand in the core queue ahead of an update.
    forecast_turns: Arc<Semaphore>,
    /// Threads a stream's step may use (`engine.step_threads`, at most the cores).
    step_threads: usize,
    /// Requests in flight (`limits.concurrent_requests`).
    pub requests: Arc<Semaphore>,
    /// Event subscribers connected, all streams together (`limits.subscribers`).
    pub subscribers: Arc<Semaphore>,
    /// Fault injection for tests (`EKID_FAILPOINTS`), read once at start.
    pub failpoints: Failpoints,
    /// Flips to true when shutdown starts (ends SSE streams).
    pub shutdown: watch::Receiver<bool>,
    /// `/openapi.json`, built for this config at start.
    pub openapi: axum::body::Bytes,
    /// Cluster mode: this node's membership (`None`: the node runs alone on its data dir).
    pub cluster: Option<Cluster>,
    /// Cluster mode: the client that forwards requests to other nodes.
    pub forwarder: reqwest::Client,
}

#[derive(Default)]
struct Registry {
    handles: HashMap<String, StreamHandle>,
    /// The memory each open stream was charged ([`Stream::memory_bytes`]; 0 for one that could
    /// not be recovered), given back when it is deleted.
    charged: HashMap<String, u64>,
    /// What the open streams hold of the memory budget: the sum of `charged`.
    streams_bytes: u64,
    /// What requests hold of it while they read and decode their bodies ([`Charge`]).
    transient_bytes: u64,
}

impl Registry {
    fn charge_stream(&mut self, name: &str, bytes: u64) {
        if let Some(old) = self.charged.insert(name.to_owned(), bytes) {
            self.streams_bytes -= old;
        }
        self.streams_bytes += bytes;
    }

    fn release_stream(&mut self, name: &str) {
        if let Some(old) = self.charged.remove(name) {
            self.streams_bytes -= old;
        }
    }
}

/// Memory a request holds of the budget while it reads and decodes its body and waits for its
/// batch to be applied: taken by [`AppState::charge`], given back on drop, when the request
/// ends (a decode on the blocking pool carries the charge along, so a request abandoned
/// meanwhile keeps it until the decode is done).
pub struct Charge {
    app: AppState,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut reg = write(&self.app.inner.streams);
        reg.transient_bytes -= self.bytes;
        let metric = &self.app.inner.metrics.request_memory;
        metric.set(reg.transient_bytes as i64);
    }
}

/// What a stream is charged against `[limits] memory_bytes`: what its learning state holds
/// ([`Stream::memory_bytes`]) and its history ring of `[limits] history` observations.
pub fn stream_memory(options: &Options, limits: &Limits) -> u64 {
    Stream::memory_bytes(options) + History::bytes_for(limits.history, options.outputs)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated (single inserts and
    // removes), so a poisoned lock is still consistent.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl AppState {
    pub fn new(
        config: Config,
        mut store: Store,
        shutdown: watch::Receiver<bool>,
        cluster: Option<Cluster>,
    ) -> anyhow::Result<Self> {
        let defaults = config.stream_defaults()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let failpoints = Failpoints::from_env();
        if let Some(stream) = &failpoints.fail_after_options_rename {
            store.fail_after_options_rename(stream);
        }
        Ok(AppState {
            inner: Arc::new(Shared {
                defaults,
                metrics: Arc::new(if cluster.is_some() {
                    Metrics::clustered()
                } else {
                    Metrics::default()
                }),
                store,
                streams: RwLock::new(Registry::default()),
                lifecycle: Arc::new(tokio::sync::Mutex::new(())),
                owners: Mutex::new(Vec::new()),
                cores: Arc::new(Semaphore::new(cores)),
                forecast_turns: Arc::new(Semaphore::new(cores)),
                step_threads: config.engine.step_threads.clamp(1, cores),
                requests: Arc::new(Semaphore::new(config.limits.concurrent_requests)),
                subscribers: Arc::new(Semaphore::new(config.limits.subscribers)),
                failpoints,
                shutdown,
                openapi: openapi::document(&config),
                forwarder: reqwest::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(1))
                    .pool_idle_timeout(std::time::Duration::from_secs(30))
                    .build()?,
                cluster,
                config,
            }),
        })
    }

    /// The core permits (batch updates and forecast roll-outs hold one per thread they run),
    /// and the forecasts' turns at them.
    pub fn cores(&self) -> (Arc<Semaphore>, Arc<Semaphore>) {
        (self.inner.cores.clone(), self.inner.forecast_turns.clone())
    }

    pub fn stream_count(&self) -> usize {
        read(&self.inner.streams).handles.len()
    }

    pub fn handles(&self) -> Vec<(String, StreamHandle)> {
        read(&self.inner.streams)
            .handles
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn handle(&self, name: &str) -> Result<StreamHandle, ApiError> {
        read(&self.inner.streams)
            .handles
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NoSuchStream(name.to_owned()))
    }

    /// Charges `bytes` a request is about to hold to the memory budget, or refuses (503 +
    /// Retry-After) when the streams and the other requests in flight leave too little. A
    /// request is taken when no other holds a charge, so streams that fill the budget never
    /// shut writes out: at most one request's charge goes over it.
    pub fn charge(&self, bytes: u64) -> Result<Charge, ApiError> {
        let budget = self.inner.config.limits.memory_bytes;
        let mut reg = write(&self.inner.streams);
        let used = reg.streams_bytes + reg.transient_bytes;
        if reg.transient_bytes > 0 && used.saturating_add(bytes) > budget {
            return Err(ApiError::Busy(format!(
                "this request may hold {bytes} bytes while it is decoded; streams and requests in flight hold {used} of the {budget}-byte memory budget"
            )));
        }
        reg.transient_bytes += bytes;
        let metric = &self.inner.metrics.request_memory;
        metric.set(reg.transient_bytes as i64);
        Ok(Charge {
            app: self.clone(),
            bytes,
        })
    }

    /// Creates a stream (durably: its folder and options are on disk before this returns), or
    /// finds the same one. Returns whether it was created. All or nothing, even if the request
    /// is dropped on the way: a stream whose files were made is registered too.
    pub async fn create_stream(
        &self,
        name: &str,
        options: Options,
    ) -> Result<(bool, Arc<StreamView>), ApiError> {
        let guard = self.inner.lifecycle.clone().lock_owned().await;
        let (app, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move {
            let _guard = guard;
            app.create_locked(&name, options).await
        })
        .await
        .map_err(|e| ApiError::Internal(format!("creating the stream failed: {e}")))?
    }

    async fn create_locked(
        &self,
        name: &str,
        options: Options,
    ) -> Result<(bool, Arc<StreamView>), ApiError> {
        if *self.inner.shutdown.borrow() {
            return Err(ApiError::ShuttingDown);
        }
        let limits = &self.inner.config.limits;
        let bytes = stream_memory(&options, limits);
        {
            let reg = read(&self.inner.streams);
            if let Some(h) = reg.handles.get(name) {
                let view = h.view();
                return if view.options == options {
                    Ok((false, view))
                } else {
                    Err(ApiError::OptionsConflict(name.to_owned()))
                };
            }
            if reg.handles.len() >= limits.streams {
                return Err(ApiError::Limit {
                    field: None,
                    detail: format!("the server holds its limit of {} streams", limits.streams),
                });
            }
            let left = limits.memory_bytes.saturating_sub(reg.streams_bytes);
            if bytes <= left && bytes > left.saturating_sub(reg.transient_bytes) {
                return Err(ApiError::Busy(format!(
                    "request bodies being decoded hold {} bytes of the memory budget the stream needs",
                    reg.transient_bytes
                )));
            }
            if bytes > left {
                return Err(ApiError::Limit {
                    field: None,
                    detail: format!(
                        "the stream needs {bytes} bytes (its ensemble J·d·{} = {}·{}·{} = {}, plus work buffers, a snapshot's copy, forecast states and its history of recent observations) but only {left} of the {}-byte budget are left",
                        options.precision.bytes(),
                        options.ensemble,
                        options.layout().dim(),
                        options.precision.bytes(),
                        options.ensemble_bytes(),
                        limits.memory_bytes
                    ),
                });
            }
        }
        if let Some(cluster) = &self.inner.cluster {
            return self.create_replicated(cluster, name, options, bytes).await;
        }
        let (store, n, threads) = (
            self.inner.store.clone(),
            name.to_owned(),
            self.inner.step_threads,
        );
        // Drawing the ensemble (and, for a split one, laying it out as panels) is CPU work of
        // the size of the ensemble: on the blocking pool with the files. The files come last,
        // so that nothing is left on disk if the drawing fails.
        let (stream, files) = tokio::task::spawn_blocking(move || {
            let mut stream = Stream::new(options.clone());
            stream.set_step_threads(threads);
            let files = store.create_stream(&n, &options)?;
            Ok::<_, crate::storage::StoreError>((stream, files))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("creating the stream failed: {e}")))?
        .map_err(|e| {
            tracing::error!(stream = name, error = %e, "could not create the stream");
            self.inner.metrics.storage_errors.inc();
            ApiError::Storage(format!(
                "could not create stream `{name}`, nothing was created: {}",
                e.public()
            ))
        })?;
        let view = self.insert(name, Start::Live(Box::new(stream), Box::new(files)), bytes);
        Ok((true, view))
    }

    /// Cluster mode: records the options in JetStream (the stream's log starts empty), then
    /// starts the owner. Called on the node that owns the name's partition.
    async fn create_replicated(
        &self,
        cluster: &Cluster,
        name: &str,
        options: Options,
        bytes: u64,
    ) -> Result<(bool, Arc<StreamView>), ApiError> {
        let lease = match cluster.lease_of(name) {
            Some(l) => l,
            None => {
                return Err(ApiError::Cluster(format!(
                    "this node no longer owns stream `{name}`; retry"
                )));
            }
        };
        let json = serde_json::to_vec(&options)
            .map_err(|e| ApiError::Internal(format!("encoding options: {e}")))?;
        let incarnation = match cluster.create_stream(name, json).await {
            Ok(Some(rev)) => rev,
            Ok(None) => {
                return Err(ApiError::Cluster(format!(
                    "stream `{name}` is being created or moved by another node; retry"
                )));
            }
            Err(e) => {
                return Err(ApiError::Cluster(format!(
                    "could not create stream `{name}`, nothing was created: {e}"
                )));
            }
        };
        let threads = self.inner.step_threads;
        let stream = tokio::task::spawn_blocking(move || {
            let mut stream = Stream::new(options);
            stream.set_step_threads(threads);
            stream
        })
        .await
        .map_err(|e| ApiError::Internal(format!("creating the stream failed: {e}")))?;
        let log = StreamLog::new(
            name,
            cluster.subject(name),
            cluster.handles(),
            lease,
            incarnation,
            0,
            [0; 2],
        );
        let view = self.insert(
            name,
            Start::Replicated(Box::new(stream), Box::new(self.replicated(cluster, log))),
            bytes,
        );
        Ok((true, view))
    }

    /// What an owner of a replicated stream holds besides the stream.
    pub fn replicated(&self, cluster: &Cluster, log: StreamLog) -> Replicated {
        let storage = &self.inner.config.storage;
        Replicated {
            log,
            cluster: cluster.clone(),
            snapshot_every: storage.snapshot_every,
            snapshot_interval: std::time::Duration::from_secs(storage.snapshot_interval_s),
            since_snapshot: 0,
            snapshot_time: Instant::now(),
            budget: Arc::downgrade(&self.inner),
        }
    }

    /// Threads a stream's step may use.
    pub fn step_threads(&self) -> usize {
        self.inner.step_threads
    }

    /// Cluster mode: registers a stream loaded from JetStream (a takeover).
    pub fn insert_loaded(&self, name: &str, start: Start) {
        let bytes = match &start {
            Start::Replicated(stream, _) | Start::Live(stream, _) => {
                stream_memory(stream.options(), &self.inner.config.limits)
            }
            Start::Failed(..) => 0,
        };
        self.insert(name, start, bytes);
    }

    /// Cluster mode: takes a stream out of the registry (its partition moved), returning its
    /// handle so that the caller can close it.
    pub fn take_handle(&self, name: &str) -> Option<StreamHandle> {
        let h = {
            let mut reg = write(&self.inner.streams);
            let h = reg.handles.remove(name);
            reg.release_stream(name);
            self.inner.metrics.streams.set(reg.handles.len() as i64);
            h
        };
        if let Some(h) = &h {
            self.inner.metrics.forget(name, h.view().options.horizon);
        }
        if let Some(c) = &self.inner.cluster {
            c.set_stream_count(self.stream_count());
        }
        h
    }

    /// Starts an owner and registers its handle.
    fn insert(&self, name: &str, start: Start, bytes: u64) -> Arc<StreamView> {
        let (handle, task) = owner::spawn(
            name.to_owned(),
            start,
            Sizes {
                queue_depth: self.inner.config.limits.queue_depth,
                subscribers: self.inner.config.limits.subscribers_per_stream,
                history: self.inner.config.limits.history,
            },
            self.inner.metrics.clone(),
            self.inner.cores.clone(),
            self.inner.failpoints.panic_in_update.as_deref() == Some(name),
        );
        let view = handle.view();
        {
            let mut reg = write(&self.inner.streams);
            reg.handles.insert(name.to_owned(), handle);
            reg.charge_stream(name, bytes);
            self.inner.metrics.streams.set(reg.handles.len() as i64);
        }
        if let Some(c) = &self.inner.cluster {
            c.set_stream_count(self.stream_count());
        }
        let mut owners = self.inner.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.retain(|t| !t.is_finished());
        owners.push(task);
        view
    }

    /// Removes a stream: the owner finishes what was queued first, then moves its files to the
    /// trash (durably), and only then is the stream taken out of the registry (later requests
    /// see 404). If the files cannot be moved, the stream stays as it was, serving. The delete
    /// runs in a task of its own, so a request dropped on the way (a timeout) still leaves the
    /// stream either deleted or untouched.
    pub async fn delete_stream(&self, name: &str) -> Result<(), ApiError> {
        let guard = self.inner.lifecycle.clone().lock_owned().await;
        let handle = self.handle(name)?;
        let handle_horizon = handle.view().options.horizon;
        let (app, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move {
            let _guard = guard;
            let (reply, rx) = oneshot::channel();
            let delete = Command::Delete {
                store: app.inner.store.clone(),
                reply,
            };
            // The owner stopped before it took the delete: shutdown, or in cluster mode the
            // stream's partition moved to another node meanwhile (retry there); either way
            // nothing of the stream was deleted.
            let stopped = || {
                if *app.inner.shutdown.borrow() {
                    ApiError::ShuttingDown
                } else if app.inner.cluster.is_some() {
                    super::cluster::owner_gone(&app, &name)
                } else {
                    ApiError::Internal(format!("the owner of stream `{name}` stopped"))
                }
            };
            if app.inner.failpoints.delete_after_move.as_deref() == Some(name.as_str()) {
                let moved = handle.tx.closed();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), moved).await;
            }
            handle.tx.send(delete).await.map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())??;
            {
                let mut reg = write(&app.inner.streams);
                reg.handles.remove(&name);
                reg.release_stream(&name);
                app.inner.metrics.streams.set(reg.handles.len() as i64);
            }
            app.inner.metrics.forget(&name, handle_horizon);
            if let Some(c) = &app.inner.cluster {
                c.set_stream_count(app.stream_count());
            }
            Ok(())
        })
        .await
        .map_err(|e| ApiError::Internal(format!("deleting the stream failed: {e}")))?
    }

    /// Recovers every stream in the data directory and starts its owner.
    pub async fn recover(&self) -> anyhow::Result<()> {
        if self.inner.cluster.is_some() {
            // Streams come with the partitions this node acquires.
            return Ok(());
        }
        let started = Instant::now();
        let (store, threads) = (self.inner.store.clone(), self.inner.step_threads);
        let recovered =
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, Recovered)>> {
                let mut out = Vec::new();
                for name in store.stream_names()? {
                    if let Some(mut r) = store.recover_stream(&name) {
                        if let Recovered::Ok(stream, ..) = &mut r {
                            stream.set_step_threads(threads);
                        }
                        out.push((name, r));
                    }
                }
                Ok(out)
            })
            .await??;
        let (mut ok, mut failed, mut replayed) = (0usize, 0usize, 0u64);
        for (name, r) in recovered {
            match r {
                Recovered::Ok(stream, files, report) => {
                    tracing::info!(
                        stream = %name,
                        last_seq = report.last_seq,
                        snapshot = ?report.snapshot_seq,
                        replayed = report.replayed,
                        torn_bytes = report.torn_bytes,
                        bad_snapshots = report.bad_snapshots,
                        damaged_unneeded_segments = report.damaged_unneeded.len(),
                        "recovered stream"
                    );
                    ok += 1;
                    replayed += report.replayed;
                    let bytes = stream_memory(stream.options(), &self.inner.config.limits);
                    self.insert(&name, Start::Live(stream, files), bytes);
                }
                Recovered::Failed(options, reason) => {
                    tracing::error!(stream = %name, %reason, "stream could not be recovered; it answers with the reason until deleted");
                    failed += 1;
                    self.insert(&name, Start::Failed(options, reason), 0);
                }
            }
        }
        tracing::info!(
            streams = ok,
            failed,
            replayed,
            seconds = started.elapsed().as_secs_f64(),
            "recovery done"
        );
        Ok(())
    }

    /// Closes every stream after the HTTP server has drained, and waits for the owners.
    pub async fn close_all(&self) {
        let handles: Vec<StreamHandle> = {
            let mut reg = write(&self.inner.streams);
            reg.charged.clear();
            reg.streams_bytes = 0;
            reg.handles.drain().map(|(_, h)| h).collect()
        };
        for h in handles {
            let (reply, rx) = oneshot::channel();
            if h.tx
                .send(Command::Close {
                    snapshot: true,
                    reply,
                })
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        let owners =
            std::mem::take(&mut *self.inner.owners.lock().unwrap_or_else(|e| e.into_inner()));
        for t in owners {
            let _ = t.await;
        }
    }
}
