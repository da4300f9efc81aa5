//! One owner task per stream: the only place a stream's state (and its files) is mutated.
//! Handlers talk to it through a bounded queue of [`Command`]s and read the immutable
//! [`StreamView`] it publishes after every batch, so reads never queue behind writes.
//!
//! For each group of queued batches: plan (validate) each → append the accepted ones to the
//! log and fsync once (group commit) → apply → publish → acknowledge. The log append, the
//! updates and snapshots run on tokio's blocking pool (updates at most one per core, a
//! semaphore), never on the async workers. A failed append answers 503 and applies nothing.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::error::ApiError;
use super::history::SharedHistory;
use super::metrics::{Metrics, StreamLabel, coverage_labels};
use crate::cluster::{Cluster, Entry, LogError, Record, StreamLog};
use crate::engine::Options;
use crate::engine::Scaler;
use crate::engine::{Applied, Observation, Plan, Stats, Stream};
use crate::engine::{Coverage, ForecastState};
use crate::storage::{Store, StoreError, StreamStore};

/// What handlers may ask of an owner.
#[derive(Debug)]
pub enum Command {
    Observe {
        batch: Vec<Observation>,
        reply: oneshot::Sender<Result<Outcome, ApiError>>,
    },
    /// Finish what is queued before this, then stop. `snapshot`: leave a final snapshot (server
    /// shutdown) rather than nothing (the stream is being deleted).
    Close {
        snapshot: bool,
        reply: oneshot::Sender<()>,
    },
    /// Finish what is queued before this, then move the stream's files to the trash (`store`'s
    /// [`Store::delete_stream`]) and stop; if that fails, answer why and carry on unchanged.
    Delete {
        store: Store,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Cluster mode: a record was appended to the stream's log at `seq`; apply what this owner
    /// has not yet (records a producer published directly).
    Appended { seq: u64 },
    /// Cluster mode: this node lost the stream's partition; stop at once, writing nothing.
    Drop,
}

/// The result of one accepted batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub duplicates: usize,
    pub applied: Vec<Applied>,
}

/// The immutable state published after every batch.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub name: String,
    pub options: Options,
    pub stats: Stats,
    pub scale: Option<Vec<Scaler>>,
    pub last_update: Option<SystemTime>,
    pub forecast: Option<Arc<ForecastState>>,
    /// The running coverage of the stream's intervals.
    pub coverage: Vec<Coverage>,
    pub failed: Option<String>,
}

/// The event sent to `/events` subscribers for every applied observation.
pub type Event = Applied;

/// SSE fan-out, created when the first subscriber arrives: a broadcast channel preallocates
/// its whole ring, which for a thousand streams nobody watches would be memory for nothing.
#[derive(Debug)]
pub struct Events {
    tx: std::sync::OnceLock<broadcast::Sender<Event>>,
    /// One permit per subscriber (`limits.subscribers_per_stream`), held while it is connected.
    pub slots: Arc<Semaphore>,
}

/// Events buffered per stream before a slow subscriber is told it lagged.
const EVENT_BUFFER: usize = 1024;

impl Events {
    fn new(subscribers: usize) -> Self {
        Events {
            tx: std::sync::OnceLock::new(),
            slots: Arc::new(Semaphore::new(subscribers)),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx
            .get_or_init(|| broadcast::channel(EVENT_BUFFER).0)
            .subscribe()
    }

    fn send(&self, e: &Event) {
        if let Some(tx) = self.tx.get() {
            // No subscriber left is fine.
            let _ = tx.send(e.clone());
        }
    }
}

/// A cheap-to-clone handle on a stream's owner.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    pub tx: mpsc::Sender<Command>,
    pub view: watch::Receiver<Arc<StreamView>>,
    pub events: Arc<Events>,
    /// The recent observations with their predictions (empty after a restart until new ones
    /// arrive).
    pub history: Arc<SharedHistory>,
}

impl StreamHandle {
    pub fn view(&self) -> Arc<StreamView> {
        self.view.borrow().clone()
    }
}

/// Most queued commands committed together (one log append, one fsync).
const MAX_GROUP: usize = 256;

/// Cluster mode: a group of at least this many observations is learned while its record is
/// appended (below it, learning takes less than the append and the copy is not worth it)...
const SPECULATE_OBSERVATIONS: usize = 32;
/// ... on a stream that may hold at most this much ([`Stream::memory_bytes`]), when the copy
/// kept until the append is confirmed fits the memory budget beside the requests in flight
/// (charged like a request's body; when it does not, the group is learned after the append).
const SPECULATE_BYTES: u64 = 8 << 20;

/// What the owner starts from: a live stream with its files, or a stream that failed to
/// recover (it answers every command with the reason).
pub enum Start {
    Live(Box<Stream>, Box<StreamStore>),
    /// Cluster mode: the stream's log is in JetStream.
    Replicated(Box<Stream>, Box<Replicated>),
    Failed(Options, String),
}

/// How an owner is set up: its queue, its event subscribers and its history.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub queue_depth: usize,
    pub subscribers: usize,
    pub history: usize,
}

/// What an owner holds in cluster mode instead of the stream's files.
pub struct Replicated {
    pub log: StreamLog,
    pub cluster: Cluster,
    /// Snapshot after this many observations (`[storage] snapshot_every`)...
    pub snapshot_every: u64,
    /// ... or this many seconds with something new (`[storage] snapshot_interval_s`).
    pub snapshot_interval: std::time::Duration,
    pub since_snapshot: u64,
    pub snapshot_time: Instant,
    /// The daemon's memory budget, which a speculative copy of the stream is charged to.
    pub budget: std::sync::Weak<super::state::Shared>,
}

impl Replicated {
    /// Charges a copy of `bytes` to the memory budget, or `None` when it does not fit.
    fn charge(&self, bytes: u64) -> Option<super::state::Charge> {
        let inner = self.budget.upgrade()?;
        super::state::AppState { inner }.charge(bytes).ok()
    }
}

impl Replicated {
    fn snapshot_due(&self) -> bool {
        self.since_snapshot >= self.snapshot_every
            || self
                .log
                .snapshot_due(self.cluster.config().snapshot_records)
            || (self.since_snapshot > 0 && self.snapshot_time.elapsed() >= self.snapshot_interval)
    }
}

/// Starts the owner of a stream.
pub fn spawn(
    name: String,
    start: Start,
    sizes: Sizes,
    metrics: Arc<Metrics>,
    cores: Arc<Semaphore>,
    panic_in_update: bool,
) -> (StreamHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(sizes.queue_depth.max(1));
    let history = Arc::new(SharedHistory::new(sizes.history, view_outputs(&start)));
    let live_view = |stream: &Stream, last_update| StreamView {
        name: name.clone(),
        options: stream.options().clone(),
        stats: stream.stats().clone(),
        scale: stream.y_scale().map(<[Scaler]>::to_vec),
        last_update,
        forecast: stream.forecast_state().map(Arc::new),
        coverage: stream.coverage(),
        failed: None,
    };
    let (stream, store, replicated, view) = match start {
        Start::Live(stream, store) => {
            let view = live_view(&stream, store.last_write());
            (Some(stream), Some(store), None, view)
        }
        Start::Replicated(stream, replicated) => {
            let view = live_view(&stream, None);
            (Some(stream), None, Some(replicated), view)
        }
        Start::Failed(options, reason) => {
            metrics
                .failed
                .get_or_create(&StreamLabel {
                    stream: name.clone(),
                })
                .set(1);
            let view = StreamView {
                name: name.clone(),
                options,
                stats: Stats::default(),
                scale: None,
                last_update: None,
                forecast: None,
                coverage: Vec::new(),
                failed: Some(reason),
            };
            (None, None, None, view)
        }
    };
    let (view_tx, view_rx) = watch::channel(Arc::new(view));
    let events = Arc::new(Events::new(sizes.subscribers));
    let owner = Owner {
        name,
        stream,
        store,
        replicated,
        view: view_tx,
        events: events.clone(),
        history: history.clone(),
        metrics,
        cores,
        panic_in_update,
    };
    let task = tokio::spawn(owner.run(rx));
    (
        StreamHandle {
            tx,
            view: view_rx,
            events,
            history,
        },
        task,
    )
}

fn view_outputs(start: &Start) -> usize {
    match start {
        Start::Live(stream, _) | Start::Replicated(stream, _) => stream.options().outputs,
        Start::Failed(options, _) => options.outputs,
    }
}

struct Owner {
    name: String,
    /// None once the stream failed (a panic in an update, or recovery): every command then
    /// gets the reason.
    stream: Option<Box<Stream>>,
    store: Option<Box<StreamStore>>,
    /// Cluster mode: the log in JetStream (then `store` is `None`).
    replicated: Option<Box<Replicated>>,
    view: watch::Sender<Arc<StreamView>>,
    events: Arc<Events>,
    history: Arc<SharedHistory>,
    metrics: Arc<Metrics>,
    cores: Arc<Semaphore>,
    /// Test fault injection (see `server::Failpoints`).
    panic_in_update: bool,
}

type Reply = oneshot::Sender<Result<Outcome, ApiError>>;

impl Owner {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let tick = self
                .store
                .as_ref()
                .and_then(|s| s.fsync_interval())
                .filter(|_| self.store.as_ref().is_some_and(|s| s.needs_sync()));
            let cmd = match tick {
                Some(t) => tokio::select! {
                    c = rx.recv() => c,
                    _ = tokio::time::sleep(t) => {
                        self.with_store(|store, _| store.sync()).await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(cmd) = cmd else {
                // Every handle is gone without a Close: leave the state on disk anyway.
                self.close(true).await;
                break;
            };
            let next = match cmd {
                Command::Observe { batch, reply } => {
                    let mut group = vec![(batch, reply)];
                    let mut next = None;
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Command::Observe { batch, reply }) => group.push((batch, reply)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.observe(group).await;
                    next
                }
                other => Some(other),
            };
            match next {
                Some(Command::Close { snapshot, reply }) => {
                    self.close(snapshot).await;
                    let _ = reply.send(());
                    break;
                }
                Some(Command::Delete { store, reply }) => {
                    let deleted = self.delete(store).await;
                    let done = deleted.is_ok();
                    let _ = reply.send(deleted);
                    if done {
                        // Whatever was queued behind the delete is dropped with the queue: its
                        // senders see the stream gone (404).
                        break;
                    }
                }
                Some(Command::Appended { seq }) => {
                    if self.replicated.as_ref().is_some_and(|r| seq > r.log.last()) {
                        let _ = self.catch_up().await;
                    }
                }
                Some(Command::Drop) => {
                    tracing::info!(stream = %self.name, "stream moved to another node");
                    break;
                }
                Some(Command::Observe { .. }) | None => {}
            }
        }
        tracing::debug!(stream = %self.name, "owner stopped");
    }

    fn label(&self) -> StreamLabel {
        StreamLabel {
            stream: self.name.clone(),
        }
    }

    fn failed(&self) -> ApiError {
        let reason = self.view.borrow().failed.clone().unwrap_or_default();
        ApiError::StreamFailed(self.name.clone(), reason)
    }

    /// Runs blocking file work on the store (and stream) off the async workers.
    async fn with_store(
        &mut self,
        f: impl FnOnce(&mut StreamStore, &Stream) -> Result<(), StoreError> + Send + 'static,
    ) {
        let (Some(mut store), Some(stream)) = (self.store.take(), self.stream.take()) else {
            return;
        };
        let r = tokio::task::spawn_blocking(move || {
            let r = f(&mut store, &stream);
            (store, stream, r)
        })
        .await;
        match r {
            Ok((store, stream, r)) => {
                self.store = Some(store);
                self.stream = Some(stream);
                if let Err(e) = r {
                    tracing::error!(stream = %self.name, error = %e, "storage");
                    self.metrics.storage_errors.inc();
                    if e.is_removed() {
                        self.fail(e.public());
                    }
                }
            }
            Err(e) => self.fail(format!("storage task failed: {e}")),
        }
    }

    async fn close(&mut self, snapshot: bool) {
        if self.replicated.is_some() {
            if snapshot {
                self.snapshot_replicated(true).await;
            }
            return;
        }
        self.with_store(move |store, stream| {
            if snapshot && store.has_unsnapshotted() {
                store.snapshot(stream)
            } else {
                store.sync()
            }
        })
        .await;
    }

    /// Moves the stream's files to the trash. On success the stream is gone (its files
    /// closed); on failure it is as it was and keeps serving.
    async fn delete(&mut self, store: Store) -> Result<(), ApiError> {
        if let Some(r) = &self.replicated {
            if !r.log.owned() {
                return Err(ApiError::Cluster(format!(
                    "this node no longer owns stream `{}`; retry",
                    self.name
                )));
            }
            return match r.cluster.delete_stream(&self.name).await {
                Ok(()) => {
                    self.stream = None;
                    self.replicated = None;
                    Ok(())
                }
                Err(e) => Err(ApiError::Cluster(format!(
                    "could not delete stream `{}`, it is unchanged: {e}",
                    self.name
                ))),
            };
        }
        let name = self.name.clone();
        match tokio::task::spawn_blocking(move || store.delete_stream(&name)).await {
            Ok(Ok(())) => {
                self.stream = None;
                self.store = None;
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(stream = %self.name, error = %e, "could not delete the stream; it is unchanged");
                self.metrics.storage_errors.inc();
                Err(ApiError::Storage(format!(
                    "could not delete stream `{}`, it is unchanged: {}",
                    self.name,
                    e.public()
                )))
            }
            Err(e) => Err(ApiError::Internal(format!(
                "deleting stream `{}` failed: {e}",
                self.name
            ))),
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(stream = %self.name, %reason, "stream failed");
        self.stream = None;
        self.store = None;
        self.metrics.failed.get_or_create(&self.label()).set(1);
        self.view.send_modify(|v| {
            let mut nv = (**v).clone();
            nv.failed = Some(reason);
            nv.forecast = None;
            *v = Arc::new(nv);
        });
    }

    /// Plans the group against `stream` and counts its duplicates; a group with nothing new is
    /// answered here (`None`).
    fn plan_new(
        &self,
        stream: &Stream,
        group: Vec<(Vec<Observation>, Reply)>,
    ) -> Option<(Vec<Planned>, Vec<Reply>)> {
        let (work, replies) = plan_group(stream, group);
        let duplicates: u64 = work.iter().map(|(_, p)| p.duplicates as u64).sum();
        self.metrics
            .duplicates
            .get_or_create(&self.label())
            .inc_by(duplicates);
        if work.iter().all(|(_, p)| p.accepted.is_empty()) {
            for ((_, plan), reply) in work.iter().zip(replies) {
                let _ = reply.send(Ok(Outcome {
                    duplicates: plan.duplicates,
                    applied: Vec::new(),
                }));
            }
            return None;
        }
        Some((work, replies))
    }

    /// Plans every batch of the group, logs the accepted ones with one append (and one fsync),
    /// applies them in order, and answers each.
    async fn observe(&mut self, group: Vec<(Vec<Observation>, Reply)>) {
        if self.replicated.is_some() {
            return self.observe_replicated(group).await;
        }
        let (Some(stream), Some(store)) = (self.stream.take(), self.store.take()) else {
            for (_, reply) in group {
                let _ = reply.send(Err(self.failed()));
            }
            return;
        };
        let Some((work, replies)) = self.plan_new(&stream, group) else {
            self.stream = Some(stream);
            self.store = Some(store);
            return;
        };
        // A step split over two threads runs only when two cores are free of other updates.
        let threads = u32::try_from(stream.step_threads()).unwrap_or(1);
        let permit = self.cores.clone().acquire_many_owned(threads).await;
        let started = Instant::now();
        let panic_in_update = self.panic_in_update;
        let done = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            assert!(!panic_in_update, "failpoint panic-in-update");
            apply_group(stream, Some(store), &work)
        })
        .await;
        match done {
            Ok(GroupWork {
                stream,
                store,
                result: Ok(learned),
            }) => {
                self.deliver(&stream, learned, replies, started);
                self.stream = Some(stream);
                self.store = store;
            }
            Ok(GroupWork {
                stream,
                store,
                result: Err(e),
            }) => {
                tracing::error!(stream = %self.name, error = %e, "could not log a batch; nothing applied");
                self.metrics.storage_errors.inc();
                self.stream = Some(stream);
                self.store = store;
                if e.is_removed() {
                    // No write of this stream can be made durable any more: fail it loudly
                    // rather than answer 503s that a retry can never get past.
                    self.fail(e.public());
                    for reply in replies {
                        let _ = reply.send(Err(self.failed()));
                    }
                    return;
                }
                let detail = format!(
                    "could not write to the log of stream `{}`, nothing was applied: {}",
                    self.name,
                    e.public()
                );
                for reply in replies {
                    let _ = reply.send(Err(ApiError::Storage(detail.clone())));
                }
            }
            Err(e) => {
                let reason = if e.is_panic() {
                    "an update panicked".to_owned()
                } else {
                    format!("an update was cancelled: {e}")
                };
                self.fail(reason);
                for reply in replies {
                    let _ = reply.send(Err(self.failed()));
                }
            }
        }
    }

    /// Cluster mode: plans the group, appends its accepted observations to the replicated log
    /// as one record (fenced by the last record applied), and only once JetStream has stored
    /// it on a quorum publishes what was learned and answers. An owner that finds the log ahead
    /// of it (a producer's record) applies what it missed and plans the group again.
    ///
    /// A group of many observations on a small stream is learned while JetStream stores it
    /// (on a copy of the stream kept until the append is confirmed, the one that stays if it
    /// fails), so that its acknowledgement waits for the longer of the two rather than their
    /// sum; the result is the same, since the record holds exactly what is learned.
    async fn observe_replicated(&mut self, mut group: Vec<(Vec<Observation>, Reply)>) {
        for _attempt in 0..4 {
            let Some(stream) = self.stream.take() else {
                for (_, reply) in group {
                    let _ = reply.send(Err(self.failed()));
                }
                return;
            };
            let Some((work, replies)) = self.plan_new(&stream, group) else {
                self.stream = Some(stream);
                return;
            };
            let record: Vec<Observation> = work
                .iter()
                .flat_map(|(b, p)| {
                    p.accepted
                        .iter()
                        .enumerate()
                        .map(move |(k, &i)| Observation {
                            seq: Some(p.first_seq + k as u64),
                            ..b[i].clone()
                        })
                })
                .collect();
            let copy_bytes = Stream::memory_bytes(stream.options());
            // Held to the end of this attempt, as long as the copy.
            let copy_charge =
                if record.len() >= SPECULATE_OBSERVATIONS && copy_bytes <= SPECULATE_BYTES {
                    self.replicated.as_ref().and_then(|r| r.charge(copy_bytes))
                } else {
                    None
                };
            let speculate = copy_charge.is_some();
            let started = Instant::now();
            let (appended, stream, work, learned) = if speculate {
                let threads = u32::try_from(stream.step_threads()).unwrap_or(1);
                let permit = self.cores.clone().acquire_many_owned(threads).await;
                let panic_in_update = self.panic_in_update;
                let learning = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let before = stream.clone();
                    assert!(!panic_in_update, "failpoint panic-in-update");
                    let done = apply_group(stream, None, &work);
                    (before, done, work)
                });
                let appended = self.append_record(&record, started).await;
                match learning.await {
                    Ok((before, done, work)) => (appended, before, work, Some(done)),
                    Err(e) => {
                        // The record may stand in the log: a takeover replays it.
                        self.fail_update(e);
                        for reply in replies {
                            let _ = reply.send(Err(self.failed()));
                        }
                        return;
                    }
                }
            } else {
                let appended = self.append_record(&record, started).await;
                (appended, stream, work, None)
            };
            let refuse = |replies: Vec<Reply>, e: ApiError| {
                let detail = e.to_string();
                let too_large = matches!(e, ApiError::TooLarge(_));
                for reply in replies {
                    let _ = reply.send(Err(if too_large {
                        ApiError::TooLarge(detail.clone())
                    } else {
                        ApiError::Cluster(detail.clone())
                    }));
                }
            };
            // Past the append, `stream` is the stream before this group.
            match appended {
                Ok(_) => {
                    if let Some(r) = self.replicated.as_mut() {
                        r.since_snapshot += record.len() as u64;
                    }
                    match learned {
                        Some(GroupWork {
                            stream: after,
                            result: Ok(learned),
                            ..
                        }) => {
                            self.deliver(&after, learned, replies, started);
                            self.stream = Some(after);
                        }
                        Some(GroupWork { stream: after, .. }) => {
                            self.stream = Some(after);
                        }
                        None => self.learn_replicated(stream, work, replies, started).await,
                    }
                    if self.replicated.as_ref().is_some_and(|r| r.snapshot_due()) {
                        self.snapshot_replicated(false).await;
                    }
                    return;
                }
                Err(LogError::Behind) => {
                    self.stream = Some(stream);
                    if let Err(e) = self.catch_up().await {
                        refuse(replies, e);
                        return;
                    }
                    group = work.into_iter().map(|(b, _)| b).zip(replies).collect();
                }
                Err(LogError::TooLarge(detail)) => {
                    self.stream = Some(stream);
                    refuse(replies, ApiError::TooLarge(detail));
                    return;
                }
                Err(e @ LogError::NotOwner(_)) => {
                    // The stream is someone else's now: this node learns nothing more of it.
                    self.stream = Some(stream);
                    refuse(replies, ApiError::Cluster(format!("{e}; retry")));
                    return;
                }
                Err(e @ LogError::Unavailable(_)) => {
                    self.stream = Some(stream);
                    refuse(
                        replies,
                        ApiError::Cluster(format!(
                            "could not append to the log of stream `{}`: {e}; a batch without `seq` may have been stored, retry it with `seq`",
                            self.name
                        )),
                    );
                    return;
                }
            }
        }
        for (_, reply) in group {
            let _ = reply.send(Err(ApiError::Cluster(format!(
                "the log of stream `{}` kept moving ahead of this node; retry",
                self.name
            ))));
        }
    }

    /// Appends one record to the replicated log and times it.
    async fn append_record(
        &mut self,
        record: &[Observation],
        started: Instant,
    ) -> Result<u64, LogError> {
        let Some(replicated) = self.replicated.as_mut() else {
            return Err(LogError::NotOwner(self.name.clone()));
        };
        let appended = replicated.log.append(record).await;
        self.metrics
            .cluster_append_seconds
            .observe(started.elapsed().as_secs_f64());
        appended
    }

    /// An update task that panicked or was cancelled fails the stream.
    fn fail_update(&mut self, e: tokio::task::JoinError) {
        let reason = if e.is_panic() {
            "an update panicked".to_owned()
        } else {
            format!("an update was cancelled: {e}")
        };
        self.fail(reason);
    }

    /// Learns a group already in the replicated log, publishes, answers.
    async fn learn_replicated(
        &mut self,
        stream: Box<Stream>,
        work: Vec<Planned>,
        replies: Vec<Reply>,
        started: Instant,
    ) {
        let threads = u32::try_from(stream.step_threads()).unwrap_or(1);
        let permit = self.cores.clone().acquire_many_owned(threads).await;
        let panic_in_update = self.panic_in_update;
        let done = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            assert!(!panic_in_update, "failpoint panic-in-update");
            apply_group(stream, None, &work)
        })
        .await;
        match done {
            Ok(GroupWork {
                stream,
                result: Ok(learned),
                ..
            }) => {
                self.deliver(&stream, learned, replies, started);
                self.stream = Some(stream);
            }
            Ok(GroupWork { stream, .. }) => {
                self.stream = Some(stream);
            }
            Err(e) => {
                self.fail_update(e);
                for reply in replies {
                    let _ = reply.send(Err(self.failed()));
                }
            }
        }
    }

    /// Applies every record of the replicated log this owner has not applied yet (producers'
    /// records, or a record whose append timed out here but was stored).
    async fn catch_up(&mut self) -> Result<(), ApiError> {
        let Some(replicated) = self.replicated.as_ref() else {
            return Ok(());
        };
        let entries = replicated
            .log
            .read_after()
            .await
            .map_err(|e| ApiError::Cluster(e.to_string()))?;
        if entries.is_empty() {
            return Ok(());
        }
        if !replicated.log.owned() {
            return Err(ApiError::Cluster(format!(
                "this node no longer owns stream `{}`; retry",
                self.name
            )));
        }
        let Some(stream) = self.stream.take() else {
            return Err(self.failed());
        };
        let last = entries.last().map_or(0, |e| e.seq);
        let done = tokio::task::spawn_blocking(move || {
            let mut stream = stream;
            let (applied, refused) = replay(&mut stream, &entries);
            let forecast = stream.forecast_state().map(Arc::new);
            (stream, applied, refused, forecast)
        })
        .await;
        match done {
            Ok((stream, applied, refused, forecast)) => {
                if let Some(r) = self.replicated.as_mut() {
                    r.log.advance(last);
                    r.since_snapshot += applied.len() as u64;
                }
                self.metrics.cluster_refused_records.inc_by(refused);
                self.announce(&stream, forecast, std::iter::once(applied.as_slice()));
                self.stream = Some(stream);
                Ok(())
            }
            Err(e) => {
                self.fail(format!("replaying the log failed: {e}"));
                Err(self.failed())
            }
        }
    }

    /// Stores a snapshot of the stream in JetStream (`force`: whenever something is new).
    async fn snapshot_replicated(&mut self, force: bool) {
        let Some(r) = self.replicated.as_ref() else {
            return;
        };
        if !r.log.owned() || (force && r.since_snapshot == 0) || (!force && !r.snapshot_due()) {
            return;
        }
        let Some(stream) = self.stream.take() else {
            return;
        };
        let encoded = tokio::task::spawn_blocking(move || {
            let bytes = crate::storage::encode_snapshot(stream.last_seq(), &stream.state());
            (stream, bytes)
        })
        .await;
        let Ok((stream, bytes)) = encoded else {
            self.fail("encoding a snapshot failed".into());
            return;
        };
        self.stream = Some(stream);
        let Some(r) = self.replicated.as_mut() else {
            return;
        };
        let stored = match bytes {
            Ok(b) => r.log.put_snapshot(b).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => {
                r.since_snapshot = 0;
                r.snapshot_time = Instant::now();
            }
            Err(e) => {
                // The log still holds everything: a takeover replays more, nothing more.
                tracing::warn!(stream = %self.name, error = %e, "snapshot not stored");
                self.metrics.storage_errors.inc();
            }
        }
    }

    fn record_timing(&self, learned: &Learned, started: Instant) {
        let n = learned
            .outcomes
            .iter()
            .map(|o| o.applied.len())
            .sum::<usize>()
            .max(1) as f64;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .update_seconds
            .observe(learned.learn_seconds / n);
    }

    /// A group learned: its timing, the announcement, and each batch's answer.
    fn deliver(&self, stream: &Stream, learned: Learned, replies: Vec<Reply>, started: Instant) {
        self.record_timing(&learned, started);
        self.announce(
            stream,
            learned.forecast,
            learned.outcomes.iter().map(|o| o.applied.as_slice()),
        );
        for (o, reply) in learned.outcomes.into_iter().zip(replies) {
            let _ = reply.send(Ok(o));
        }
    }

    /// After a group is learned: the new view, one event per applied observation, and the
    /// history.
    fn announce<'a>(
        &self,
        stream: &Stream,
        forecast: Option<Arc<ForecastState>>,
        batches: impl Iterator<Item = &'a [Applied]>,
    ) {
        self.publish(stream, forecast);
        for batch in batches {
            for a in batch {
                self.events.send(a);
            }
            self.history.extend(batch.iter());
        }
    }

    fn publish(&self, stream: &Stream, forecast: Option<Arc<ForecastState>>) {
        let stats = stream.stats().clone();
        let scale = stream.y_scale().map(<[Scaler]>::to_vec);
        let l = self.label();
        let before = self.view.borrow().stats.observations;
        self.metrics
            .observations
            .get_or_create(&l)
            .inc_by(stats.observations.saturating_sub(before));
        if let Some(m) = stats.mse_user() {
            self.metrics.mse.get_or_create(&l).set(m);
        }
        if let Some(m) = stats.mse_scaled() {
            self.metrics.mse_scaled.get_or_create(&l).set(m);
        }
        self.metrics.spread.get_or_create(&l).set(stats.spread_user);
        self.metrics
            .last_seq
            .get_or_create(&l)
            .set(stats.last_seq as i64);
        let coverage = stream.coverage();
        let last_step = stream.options().horizon;
        for c in &coverage {
            for step in [1, last_step] {
                if let Some(Some(v)) = c.steps.get(step - 1) {
                    self.metrics
                        .coverage
                        .get_or_create(&coverage_labels(&self.name, c.level, step))
                        .set(*v);
                }
            }
        }
        let view = StreamView {
            name: self.name.clone(),
            options: stream.options().clone(),
            stats,
            scale,
            last_update: Some(SystemTime::now()),
            forecast,
            coverage,
            failed: None,
        };
        self.view.send_replace(Arc::new(view));
    }
}

/// A batch of a group with its plan, made against the stream as it will stand once the batches
/// before it are applied.
type Planned = (Vec<Observation>, Plan);

/// Plans each batch of the group after the ones before it; a batch that is refused is answered
/// here and leaves the group.
fn plan_group(
    stream: &Stream,
    group: Vec<(Vec<Observation>, Reply)>,
) -> (Vec<Planned>, Vec<Reply>) {
    let mut cursor = stream.cursor();
    let mut work = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    for (batch, reply) in group {
        match stream.plan_next(&batch, &mut cursor) {
            Ok(plan) => {
                work.push((batch, plan));
                replies.push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }
    (work, replies)
}

/// What a group's blocking work hands back: the stream and its store, always, and what was
/// learned, or why the log refused the group (then nothing was applied).
struct GroupWork {
    stream: Box<Stream>,
    store: Option<Box<StreamStore>>,
    result: Result<Learned, StoreError>,
}

struct Learned {
    outcomes: Vec<Outcome>,
    forecast: Option<Arc<ForecastState>>,
    learn_seconds: f64,
}

/// Logs the group's accepted observations (one append, one fsync), then learns them in order,
/// then snapshots when due. Blocking: runs on the blocking pool under the core permits. In
/// cluster mode (no `store`) the group is already in the replicated log.
fn apply_group(
    mut stream: Box<Stream>,
    mut store: Option<Box<StreamStore>>,
    work: &[Planned],
) -> GroupWork {
    if let Some(st) = store.as_mut()
        && let Err(e) = log_group(st, work)
    {
        return GroupWork {
            stream,
            store,
            result: Err(e),
        };
    }
    let learning = Instant::now();
    let outcomes = work
        .iter()
        .map(|(batch, plan)| {
            let mut applied = Vec::with_capacity(plan.accepted.len());
            stream.apply(batch, plan, |a| applied.push(a));
            Outcome {
                duplicates: plan.duplicates,
                applied,
            }
        })
        .collect();
    let learn_seconds = learning.elapsed().as_secs_f64();
    // A failed snapshot loses nothing: the log has it all.
    if let Some(store) = store.as_mut()
        && store.snapshot_due()
        && let Err(e) = store.snapshot(&stream)
    {
        tracing::error!(error = %e, "snapshot failed; the log still holds everything");
    }
    let forecast = stream.forecast_state().map(Arc::new);
    GroupWork {
        stream,
        store,
        result: Ok(Learned {
            outcomes,
            forecast,
            learn_seconds,
        }),
    }
}

/// One log record per batch with accepted observations: the batch itself when all of it was
/// accepted (borrowed, not copied), else a copy of the accepted ones.
fn log_group(store: &mut StreamStore, work: &[Planned]) -> Result<(), StoreError> {
    let partial: Vec<Vec<Observation>> = work
        .iter()
        .map(|(b, p)| {
            if p.accepted.len() == b.len() {
                Vec::new()
            } else {
                p.accepted.iter().map(|&i| b[i].clone()).collect()
            }
        })
        .collect();
    let records: Vec<(u64, &[Observation])> = work
        .iter()
        .zip(&partial)
        .filter(|((_, p), _)| !p.accepted.is_empty())
        .map(|((b, p), copy)| {
            let obs: &[Observation] = if p.accepted.len() == b.len() { b } else { copy };
            (p.first_seq, obs)
        })
        .collect();
    store.append(&records)
}

/// Replays records of the replicated log into `stream` through the same plan and apply as
/// live batches, in order; a record the stream refuses (a producer's malformed or misfit
/// message, a sequence gap) changes nothing. Returns what was applied and how many records
/// were refused. Blocking.
pub fn replay(stream: &mut Stream, entries: &[Entry]) -> (Vec<Applied>, u64) {
    use super::body::{Expect, Format, decode};
    let mut applied = Vec::new();
    let mut refused = 0;
    for entry in entries {
        let decoded;
        let batch: &[Observation] = match &entry.record {
            Record::Batch(b) => b,
            Record::Direct { content_type, body } => {
                let format = match content_type.as_deref().map(str::trim) {
                    None | Some("") => Format::Json,
                    Some(ct) if ct.starts_with("application/x-ndjson") => Format::Ndjson,
                    Some(ct) if ct.starts_with("application/jsonl") => Format::Ndjson,
                    Some(ct) if ct.starts_with("text/csv") => Format::Csv,
                    Some(ct) if ct.contains("json") => Format::Json,
                    Some(_) => {
                        refused += 1;
                        continue;
                    }
                };
                let o = stream.options();
                let expect = Expect {
                    shape: Some((o.inputs, o.outputs)),
                    max_observations: usize::MAX,
                };
                match decode(format, body, &expect) {
                    Ok(b) => {
                        decoded = b;
                        &decoded
                    }
                    Err(e) => {
                        tracing::warn!(seq = entry.seq, error = %e, "log record refused");
                        refused += 1;
                        continue;
                    }
                }
            }
        };
        match stream.plan(batch) {
            Ok(plan) => stream.apply(batch, &plan, |a| applied.push(a)),
            Err(e) => {
                tracing::warn!(seq = entry.seq, error = %e, "log record refused");
                refused += 1;
            }
        }
    }
    (applied, refused)
}
