//! A node of the cluster: its connection to NATS, the buckets it shares with the other nodes,
//! and the coordinator that keeps its heartbeat and its leases.
//!
//! - `EKID_NODES` (KV, entries live for one lease TTL): one key per node, its URL, put every
//!   tick. A node is live while its entry is fresh.
//! - `EKID_LEASES` (KV, same TTL): one key per partition (`p<n>`) held by its owner, created
//!   with `create` (only when vacant) and renewed with `update` at the revision it holds. A key
//!   not renewed for one TTL disappears, and another node may create it.
//! - `EKID_STREAMS` (KV): each stream's options under `<partition>.<name>`, so that the
//!   streams of one partition are listed without reading the others'; the revision that
//!   created them tells one stream from a later one of the same name.
//! - `EKID_SNAPSHOTS` (object store): each stream's newest snapshot.
//!
//! Every tick (a quarter of the TTL) the coordinator renews what it holds, gives up what the
//! rendezvous hash now gives a live other node (the server closes those streams first), and
//! takes vacant partitions the hash gives it. For each partition it holds, a headers-only
//! consumer of that partition's log subjects tells the owners of records appended there (by
//! producers, or by this node), so that a node hears of its own partitions' records only.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, object_store, stream::StorageType};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::config::ClusterConfig;
use super::hash;
use super::log::{
    LOG_PREFIX, LOG_STREAM, Lease, LogHandles, key_of, name_of, name_of_subject, partition_filter,
    slot_name, subject_of,
};

/// How long a deleted stream's marker stays in the stream bucket. Every partition's takeover
/// lists its keys and reads the options of each; a marker that stayed for good would make
/// each takeover slower with every stream ever deleted. Readers that meet the marker and
/// readers that find the key gone alike skip the stream, so the time only needs to outlast a
/// request in flight.
const DELETED_MARKER_TTL: Duration = Duration::from_secs(300);

/// The header that marks a key-value message as a delete or purge (JetStream's KV convention).
const KV_OPERATION: &str = "KV-Operation";

const NODES: &str = "EKID_NODES";
const LEASES: &str = "EKID_LEASES";
const STREAMS: &str = "EKID_STREAMS";
const SNAPSHOTS: &str = "EKID_SNAPSHOTS";

/// What the coordinator tells the server.
#[derive(Debug)]
pub enum Change {
    /// This node now holds `partition`: load its streams, then call [`Cluster::set_ready`].
    Acquired { partition: u32, lease: Arc<Lease> },
    /// The lease on `partition` ran out or was taken: drop its streams now, writing nothing.
    Lost { partition: u32 },
    /// Another node should own `partition`: close its streams (a last snapshot is welcome),
    /// then call [`Cluster::release`].
    Release { partition: u32 },
    /// A record was appended to the log of stream `name`, at `seq`.
    Appended { name: String, seq: u64 },
    /// The notices of `partition`'s records may have missed some (its consumer was just
    /// created): every loaded stream of it reads its log for records it has not applied.
    Recheck { partition: u32 },
}

/// Where a request for a stream goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// This node owns the stream's partition and has loaded it.
    Local,
    /// The owner's advertised URL.
    Remote { node: String, url: String },
    /// No node can serve it right now (a takeover under way, NATS unreachable).
    Unavailable(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeValue {
    url: String,
    streams: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseValue {
    node: String,
    url: String,
}

struct Seen<T> {
    value: T,
    at: Instant,
}

struct Held {
    revision: u64,
    lease: Arc<Lease>,
    ready: bool,
    releasing: bool,
    /// The task that follows the partition's log subjects; it ends with the hold.
    tail: tokio::task::AbortHandle,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

#[derive(Default)]
struct View {
    nodes: HashMap<String, Seen<NodeValue>>,
    leases: HashMap<u32, Seen<LeaseValue>>,
    held: BTreeMap<u32, Held>,
}

/// Cluster counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub takeovers: AtomicU64,
    pub lost: AtomicU64,
    pub released: AtomicU64,
    /// Notices of log records this node received (its own partitions' only).
    pub notices: AtomicU64,
}

struct Inner {
    config: ClusterConfig,
    node: String,
    url: String,
    ttl: Duration,
    handles: LogHandles,
    nodes: kv::Store,
    leases: kv::Store,
    streams: kv::Store,
    /// Whether a deleted stream's marker in `streams` expires ([`DELETED_MARKER_TTL`]).
    markers_expire: bool,
    view: Mutex<View>,
    changes: mpsc::UnboundedSender<Change>,
    stream_count: AtomicUsize,
    counters: Counters,
    started: Instant,
}

/// A node's membership of the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// A node of the cluster, as `GET /v1/cluster` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub name: String,
    pub url: String,
    pub live: bool,
    pub streams: usize,
    pub partitions: Vec<u32>,
}

/// A partition of the streams and its owner, as `GET /v1/cluster` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionStatus {
    pub partition: u32,
    pub owner: Option<String>,
    /// For the partitions this node holds: whether its streams are loaded and serving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

/// `GET /v1/cluster`: what this node knows of the cluster (a node that runs alone: itself,
/// without the cluster's fields).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    pub node: String,
    pub url: String,
    /// Whether this node is connected to NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
    pub nodes: Vec<NodeStatus>,
    pub partitions: Vec<PartitionStatus>,
}

fn lock(m: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Connects to NATS, makes sure the shared streams and buckets exist, and starts the
    /// coordinator, the bucket watchers and the log's tail. `url` is where other nodes reach
    /// this one.
    pub async fn connect(
        config: ClusterConfig,
        node: String,
        url: String,
    ) -> anyhow::Result<(Cluster, mpsc::UnboundedReceiver<Change>)> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("ekid-{node}"))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(config.urls.clone())
            .await?;
        let js = jetstream::new(client.clone());
        let r = config.replicas;
        let ttl = Duration::from_millis(config.lease_ttl_ms);
        let log = js
            .get_or_create_stream(jetstream::stream::Config {
                name: LOG_STREAM.into(),
                subjects: vec![format!("{LOG_PREFIX}>")],
                num_replicas: r,
                storage: StorageType::File,
                ..Default::default()
            })
            .await?;
        let kv_bucket = |bucket: &str, max_age: Duration| kv::Config {
            bucket: bucket.into(),
            num_replicas: r,
            history: 1,
            max_age,
            storage: StorageType::File,
            ..Default::default()
        };
        let nodes = get_or_create_kv(&js, kv_bucket(NODES, ttl)).await?;
        let leases = get_or_create_kv(&js, kv_bucket(LEASES, ttl)).await?;
        let streams = get_or_create_kv(
            &js,
            kv::Config {
                limit_markers: Some(DELETED_MARKER_TTL),
                ..kv_bucket(STREAMS, Duration::ZERO)
            },
        )
        .await?;
        // A bucket made by a build that kept markers has no per-message TTLs: its markers stay.
        let markers_expire = streams.stream.cached_info().config.allow_message_ttl;
        let snapshots = match js.get_object_store(SNAPSHOTS).await {
            Ok(s) => s,
            Err(_) => {
                js.create_object_store(object_store::Config {
                    bucket: SNAPSHOTS.into(),
                    num_replicas: r,
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await?
            }
        };
        let snapshot_stream = js.get_stream(format!("OBJ_{SNAPSHOTS}")).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let cluster = Cluster {
            inner: Arc::new(Inner {
                config,
                node,
                url,
                ttl,
                handles: LogHandles {
                    client,
                    js,
                    log,
                    snapshots,
                    snapshot_stream,
                },
                nodes,
                leases,
                streams,
                markers_expire,
                view: Mutex::new(View::default()),
                changes: tx,
                stream_count: AtomicUsize::new(0),
                counters: Counters::default(),
                started: Instant::now(),
            }),
        };
        let weak = Arc::downgrade(&cluster.inner);
        tokio::spawn(watch_nodes(weak.clone()));
        tokio::spawn(watch_leases(weak.clone()));
        tokio::spawn(coordinate(weak));
        Ok((cluster, rx))
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    pub fn handles(&self) -> LogHandles {
        self.inner.handles.clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn connected(&self) -> bool {
        self.inner.handles.client.connection_state() == async_nats::connection::State::Connected
    }

    pub fn partition(&self, name: &str) -> u32 {
        hash::partition(name, self.inner.config.partitions)
    }

    /// The subject of stream `name`'s log, where producers may publish observations.
    pub fn subject(&self, name: &str) -> String {
        subject_of(self.partition(name), name)
    }

    /// The key of stream `name` in `EKID_STREAMS`.
    fn key(&self, name: &str) -> String {
        format!("{}.{}", self.partition(name), key_of(name))
    }

    pub fn set_stream_count(&self, n: usize) {
        self.inner.stream_count.store(n, Ordering::Relaxed);
    }

    /// The partitions this node holds and has loaded.
    pub fn owned_partitions(&self) -> usize {
        lock(&self.inner.view)
            .held
            .values()
            .filter(|h| h.ready && h.lease.valid())
            .count()
    }

    /// The lease this node holds on the partition of stream `name`, while it is valid.
    pub fn lease_of(&self, name: &str) -> Option<Arc<Lease>> {
        let p = self.partition(name);
        lock(&self.inner.view)
            .held
            .get(&p)
            .filter(|h| h.lease.valid())
            .map(|h| h.lease.clone())
    }

    /// The server has loaded every stream of `partition`.
    pub fn set_ready(&self, partition: u32) {
        if let Some(h) = lock(&self.inner.view).held.get_mut(&partition) {
            h.ready = true;
        }
    }

    /// The server has closed the streams of `partition`: let another node take it.
    pub async fn release(&self, partition: u32) {
        let held = lock(&self.inner.view).held.remove(&partition);
        if let Some(h) = held {
            h.lease.revoke();
            self.inner.counters.released.fetch_add(1, Ordering::Relaxed);
            let key = format!("p{partition}");
            if let Err(e) = self
                .inner
                .leases
                .delete_expect_revision(&key, Some(h.revision))
                .await
            {
                // It runs out by itself within a TTL.
                tracing::warn!(partition, error = %e, "could not release a lease");
            }
        }
    }

    /// Where requests for stream `name` go.
    pub fn route(&self, name: &str) -> Route {
        let p = self.partition(name);
        let view = lock(&self.inner.view);
        if let Some(h) = view.held.get(&p)
            && h.lease.valid()
        {
            return if h.ready && !h.releasing {
                Route::Local
            } else {
                Route::Unavailable(format!("partition {p} of stream `{name}` is moving"))
            };
        }
        match view.leases.get(&p) {
            Some(s) if s.at.elapsed() < self.inner.ttl && s.value.node != self.inner.node => {
                Route::Remote {
                    node: s.value.node.clone(),
                    url: s.value.url.clone(),
                }
            }
            _ => Route::Unavailable(format!(
                "no node owns partition {p} of stream `{name}` right now"
            )),
        }
    }

    /// The URLs of the other live nodes.
    pub fn peers(&self) -> Vec<(String, String)> {
        let view = lock(&self.inner.view);
        view.nodes
            .iter()
            .filter(|(n, s)| **n != self.inner.node && s.at.elapsed() < self.inner.ttl)
            .map(|(n, s)| (n.clone(), s.value.url.clone()))
            .collect()
    }

    pub fn status(&self) -> Status {
        let view = lock(&self.inner.view);
        let ttl = self.inner.ttl;
        let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for (name, s) in &view.nodes {
            nodes.insert(
                name.clone(),
                NodeStatus {
                    name: name.clone(),
                    url: s.value.url.clone(),
                    live: s.at.elapsed() < ttl,
                    streams: s.value.streams,
                    partitions: Vec::new(),
                },
            );
        }
        let me = nodes
            .entry(self.inner.node.clone())
            .or_insert_with(|| NodeStatus {
                name: self.inner.node.clone(),
                url: self.inner.url.clone(),
                live: true,
                streams: 0,
                partitions: Vec::new(),
            });
        me.live = true;
        me.streams = self.inner.stream_count.load(Ordering::Relaxed);
        let mut partitions = Vec::new();
        for p in 0..self.inner.config.partitions {
            let (owner, ready) = match view.held.get(&p) {
                Some(h) if h.lease.valid() => (Some(self.inner.node.clone()), Some(h.ready)),
                _ => (
                    view.leases
                        .get(&p)
                        .filter(|s| s.at.elapsed() < ttl && s.value.node != self.inner.node)
                        .map(|s| s.value.node.clone()),
                    None,
                ),
            };
            if let Some(o) = &owner
                && let Some(n) = nodes.get_mut(o)
            {
                n.partitions.push(p);
            }
            partitions.push(PartitionStatus {
                partition: p,
                owner,
                ready,
            });
        }
        Status {
            node: self.inner.node.clone(),
            url: self.inner.url.clone(),
            connected: Some(self.connected()),
            replicas: Some(self.inner.config.replicas),
            lease_ttl_ms: Some(self.inner.config.lease_ttl_ms),
            nodes: nodes.into_values().collect(),
            partitions,
        }
    }

    /// The names of the streams in `partition`: the subjects of the keys under
    /// `<partition>.`, from one paged stream-info request answered by the bucket's leader (no
    /// consumer to place, which a JetStream cluster missing a server may not manage). A
    /// deleted stream's key stays listed until its marker expires; loading it finds no options
    /// and skips it.
    pub async fn streams_in(&self, partition: u32) -> anyhow::Result<Vec<String>> {
        let store = &self.inner.streams;
        let prefix = format!("{}{partition}.", store.prefix);
        let list = async {
            let mut subjects = store
                .stream
                .info_with_subjects(format!("{prefix}>"))
                .await?;
            let mut out = Vec::new();
            while let Some(item) = subjects.next().await {
                let (subject, _) = item?;
                if let Some(key) = subject.strip_prefix(prefix.as_str()) {
                    out.push(name_of(key));
                }
            }
            Ok::<_, anyhow::Error>(out)
        };
        let mut out = tokio::time::timeout(self.inner.ttl, list)
            .await
            .map_err(|_| anyhow::anyhow!("listing partition {partition}'s streams timed out"))??;
        out.sort();
        Ok(out)
    }

    /// A stream's options (JSON) and the revision that created them, as the bucket's leader
    /// has them. The bucket allows direct gets, which any replica may answer: one that lags
    /// could miss a stream created a moment before, and a takeover would then skip it.
    pub async fn options(&self, name: &str) -> anyhow::Result<Option<(bytes::Bytes, u64)>> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let store = &self.inner.streams;
        let subject = format!("{}{}", store.prefix, self.key(name));
        let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // A deleted or purged key's last message is its marker.
        let marker = message
            .headers
            .get(KV_OPERATION)
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        Ok((!marker).then_some((message.payload, message.sequence)))
    }

    /// Records a new stream's options, after clearing whatever an earlier stream of the same
    /// name left in the log and the snapshots. Returns the revision (the stream's
    /// incarnation), or `None` when a stream of that name exists.
    pub async fn create_stream(&self, name: &str, options: Vec<u8>) -> anyhow::Result<Option<u64>> {
        if self.options(name).await?.is_some() {
            return Ok(None);
        }
        self.clear(name).await?;
        match self
            .inner
            .streams
            .create(self.key(name), options.into())
            .await
        {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a stream: its options, then its log and snapshot.
    pub async fn delete_stream(&self, name: &str) -> anyhow::Result<()> {
        let (streams, key) = (&self.inner.streams, self.key(name));
        if self.inner.markers_expire {
            streams.purge_with_ttl(key, DELETED_MARKER_TTL).await?;
        } else {
            streams.purge(key).await?;
        }
        if let Err(e) = self.clear(name).await {
            // The next stream of this name clears them before it starts.
            tracing::warn!(stream = name, error = %e, "could not clear a deleted stream's log");
        }
        Ok(())
    }

    async fn clear(&self, name: &str) -> anyhow::Result<()> {
        self.inner
            .handles
            .log
            .purge()
            .filter(self.subject(name))
            .await?;
        for slot in 0..2 {
            match self
                .inner
                .handles
                .snapshots
                .delete(slot_name(name, slot).as_str())
                .await
            {
                Ok(()) => {}
                Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The last record of a stream's log (0: none).
    pub async fn last_seq(&self, name: &str) -> anyhow::Result<u64> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .inner
            .handles
            .log
            .get_last_raw_message_by_subject(&self.subject(name))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Leaves the cluster at shutdown, once the server has closed its streams: releases every
    /// lease and the node's entry so that the others take over at once.
    pub async fn leave(&self) {
        let held: Vec<u32> = lock(&self.inner.view).held.keys().copied().collect();
        for p in held {
            self.release(p).await;
        }
        let _ = self.inner.nodes.delete(&self.inner.node).await;
    }

    /// Revokes every lease (shutdown begins: nothing more is applied).
    pub fn stop_applying(&self) {
        for h in lock(&self.inner.view).held.values() {
            h.lease.revoke();
        }
    }
}

async fn get_or_create_kv(
    js: &jetstream::Context,
    config: kv::Config,
) -> anyhow::Result<kv::Store> {
    match js.get_key_value(config.bucket.clone()).await {
        Ok(s) => Ok(s),
        Err(_) => Ok(js.create_key_value(config).await?),
    }
}

/// Keeps `view.nodes` current.
async fn watch_nodes(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let watch = inner.nodes.watch_all().await;
        drop(inner);
        let Ok(mut watch) = watch else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while let Some(entry) = watch.next().await {
            let Some(inner) = weak.upgrade() else { return };
            let Ok(entry) = entry else { break };
            let mut view = lock(&inner.view);
            match entry.operation {
                kv::Operation::Put => {
                    if let Ok(value) = serde_json::from_slice::<NodeValue>(&entry.value) {
                        view.nodes.insert(
                            entry.key,
                            Seen {
                                value,
                                at: Instant::now(),
                            },
                        );
                    }
                }
                _ => {
                    view.nodes.remove(&entry.key);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps `view.leases` current.
async fn watch_leases(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let watch = inner.leases.watch_all().await;
        drop(inner);
        let Ok(mut watch) = watch else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while let Some(entry) = watch.next().await {
            let Some(inner) = weak.upgrade() else { return };
            let Ok(entry) = entry else { break };
            let Some(p) = entry
                .key
                .strip_prefix('p')
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let mut view = lock(&inner.view);
            match entry.operation {
                kv::Operation::Put => {
                    if let Ok(value) = serde_json::from_slice::<LeaseValue>(&entry.value) {
                        view.leases.insert(
                            p,
                            Seen {
                                value,
                                at: Instant::now(),
                            },
                        );
                    }
                }
                _ => {
                    view.leases.remove(&p);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tells the server of every record appended to the logs of `partition` (headers only), so
/// that owners apply what producers publish directly; runs while this node holds the
/// partition (aborted when its [`Held`] goes). After each (re)creation of its consumer it asks
/// for a [`Change::Recheck`], which covers what was appended before the consumer existed.
async fn tail(weak: std::sync::Weak<Inner>, partition: u32) {
    use jetstream::consumer::{DeliverPolicy, push};
    let mut next: Option<u64> = None;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let config = push::OrderedConfig {
            deliver_subject: inner.handles.client.new_inbox(),
            filter_subject: partition_filter(partition),
            headers_only: true,
            deliver_policy: match next {
                Some(seq) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                None => DeliverPolicy::New,
            },
            ..Default::default()
        };
        let consumer = inner.handles.log.create_consumer(config).await;
        let messages = match consumer {
            Ok(c) => c.messages().await,
            Err(e) => {
                tracing::debug!(partition, error = %e, "log tail: cannot create the consumer");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Ok(mut messages) = messages else {
            drop(inner);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let _ = inner.changes.send(Change::Recheck { partition });
        drop(inner);
        while let Some(m) = messages.next().await {
            let Ok(m) = m else { break };
            let Some(inner) = weak.upgrade() else { return };
            let Ok(info) = m.info() else { continue };
            let seq = info.stream_sequence;
            next = Some(seq + 1);
            inner.counters.notices.fetch_add(1, Ordering::Relaxed);
            if let Some(name) = name_of_subject(m.subject.as_str()) {
                let _ = inner.changes.send(Change::Appended { name, seq });
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The coordinator: heartbeat, lease renewal, release and acquisition, every quarter TTL.
async fn coordinate(weak: std::sync::Weak<Inner>) {
    let Some(inner) = weak.upgrade() else { return };
    let tick = inner.ttl / 4;
    drop(inner);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        round(&inner, &weak).await;
    }
}

async fn round(inner: &Inner, weak: &std::sync::Weak<Inner>) {
    // A lease whose deadline passed (a paused process, NATS unreachable) is lost first.
    let expired: Vec<u32> = {
        let mut view = lock(&inner.view);
        let gone: Vec<u32> = view
            .held
            .iter()
            .filter(|(_, h)| !h.lease.valid())
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            view.held.remove(p);
        }
        gone
    };
    for p in expired {
        tracing::warn!(
            partition = p,
            "lease ran out; this node stops serving its streams"
        );
        inner.counters.lost.fetch_add(1, Ordering::Relaxed);
        let _ = inner.changes.send(Change::Lost { partition: p });
    }
    let heartbeat = NodeValue {
        url: inner.url.clone(),
        streams: inner.stream_count.load(Ordering::Relaxed),
    };
    if let Ok(v) = serde_json::to_vec(&heartbeat) {
        let _ = inner.nodes.put(&inner.node, v.into()).await;
    }
    let value: bytes::Bytes = serde_json::to_vec(&LeaseValue {
        node: inner.node.clone(),
        url: inner.url.clone(),
    })
    .unwrap_or_default()
    .into();
    let valid_for = inner.ttl * 3 / 4;
    // Renew.
    let held: Vec<(u32, u64, Arc<Lease>)> = lock(&inner.view)
        .held
        .iter()
        .map(|(p, h)| (*p, h.revision, h.lease.clone()))
        .collect();
    let renewals = held.into_iter().map(|(p, rev, lease)| {
        let value = value.clone();
        async move {
            let sent = Instant::now();
            let r = inner.leases.update(format!("p{p}"), value, rev).await;
            (p, sent, lease, r)
        }
    });
    for (p, sent, lease, r) in futures_util::future::join_all(renewals).await {
        match r {
            Ok(rev) => {
                lease.extend(sent, valid_for);
                if let Some(h) = lock(&inner.view).held.get_mut(&p) {
                    h.revision = rev;
                }
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                lease.revoke();
                lock(&inner.view).held.remove(&p);
                tracing::warn!(partition = p, "lease taken by another node");
                inner.counters.lost.fetch_add(1, Ordering::Relaxed);
                let _ = inner.changes.send(Change::Lost { partition: p });
            }
            // Transient: the lease holds until its deadline.
            Err(e) => tracing::debug!(partition = p, error = %e, "lease renewal failed"),
        }
    }
    // Let the watchers fill in before deciding anything.
    if inner.started.elapsed() < inner.ttl / 2 {
        return;
    }
    let live: Vec<String> = {
        let view = lock(&inner.view);
        let mut live: Vec<String> = view
            .nodes
            .iter()
            .filter(|(_, s)| s.at.elapsed() < inner.ttl)
            .map(|(n, _)| n.clone())
            .collect();
        if !live.contains(&inner.node) {
            live.push(inner.node.clone());
        }
        live
    };
    let mut acquire = Vec::new();
    {
        let mut view = lock(&inner.view);
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let owners = hash::assignment(inner.config.partitions, &live);
        for p in 0..inner.config.partitions {
            let want = owners[p as usize];
            let mine = want == Some(inner.node.as_str());
            let vacant = view
                .leases
                .get(&p)
                .is_none_or(|s| s.at.elapsed() >= inner.ttl);
            match view.held.get_mut(&p) {
                Some(h) if !mine && h.ready && !h.releasing => {
                    h.releasing = true;
                    let _ = inner.changes.send(Change::Release { partition: p });
                }
                Some(_) => {}
                None if mine && vacant => acquire.push(p),
                None => {}
            }
        }
    }
    let attempts = acquire.into_iter().map(|p| {
        let value = value.clone();
        async move {
            let sent = Instant::now();
            let r = inner.leases.create(format!("p{p}"), value).await;
            (p, sent, r)
        }
    });
    for (p, sent, r) in futures_util::future::join_all(attempts).await {
        if let Ok(rev) = r {
            let lease = Lease::new();
            lease.extend(sent, valid_for);
            let tail = tokio::spawn(tail(weak.clone(), p)).abort_handle();
            lock(&inner.view).held.insert(
                p,
                Held {
                    revision: rev,
                    lease: lease.clone(),
                    ready: false,
                    releasing: false,
                    tail,
                },
            );
            inner.counters.takeovers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(partition = p, "lease acquired");
            let _ = inner.changes.send(Change::Acquired {
                partition: p,
                lease,
            });
        }
    }
}
