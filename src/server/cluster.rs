//! The daemon's side of cluster mode: loading and closing the streams of the partitions this
//! node gains and loses, applying what producers publish to the log, forwarding requests for
//! streams owned elsewhere, and `GET /v1/cluster`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::owner::{Command, Start, replay};
use super::state::AppState;
use crate::cluster::{Change, Cluster, Lease, NodeStatus, Route, Status, StreamLog, get_snapshots};
use crate::engine::{Options, Stream};
use crate::storage::{decode_snapshot, is_valid_stream_name};

/// Marks a request one node forwarded to another: the receiver serves it or refuses it, never
/// forwards it again.
pub const FORWARDED: &str = "ekid-forwarded";

/// Follows the coordinator's changes until the cluster is dropped.
pub async fn follow(app: AppState, cluster: Cluster, mut changes: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = changes.recv().await {
        match change {
            Change::Acquired { partition, lease } => {
                load_partition(&app, &cluster, partition, lease).await;
            }
            Change::Lost { partition } => {
                for h in take_partition(&app, &cluster, partition) {
                    let _ = h.tx.send(Command::Drop).await;
                }
            }
            Change::Release { partition } => {
                for h in take_partition(&app, &cluster, partition) {
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
                cluster.release(partition).await;
            }
            Change::Appended { name, seq } => {
                if let Ok(h) = app.handle(&name) {
                    let send = h.tx.send(Command::Appended { seq });
                    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
                }
            }
            Change::Recheck { partition } => {
                for (name, h) in app.handles() {
                    if cluster.partition(&name) == partition {
                        let send = h.tx.send(Command::Appended { seq: u64::MAX });
                        let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
                    }
                }
            }
        }
    }
}

fn take_partition(
    app: &AppState,
    cluster: &Cluster,
    partition: u32,
) -> Vec<super::owner::StreamHandle> {
    app.handles()
        .into_iter()
        .filter(|(n, _)| cluster.partition(n) == partition)
        .filter_map(|(n, _)| app.take_handle(&n))
        .collect()
}

/// Loads every stream of a partition this node acquired, then lets it serve.
async fn load_partition(app: &AppState, cluster: &Cluster, partition: u32, lease: Arc<Lease>) {
    let names = loop {
        match cluster.streams_in(partition).await {
            Ok(n) => break n,
            Err(e) if lease.valid() => {
                tracing::warn!(partition, error = %e, "listing streams failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => return,
        }
    };
    let started = std::time::Instant::now();
    for name in &names {
        loop {
            if !lease.valid() {
                return;
            }
            match load_stream(app, cluster, name, &lease).await {
                Ok(Some(start)) => {
                    app.insert_loaded(name, start);
                    // Records appended between the replay and the registration (their
                    // notices found no owner yet): read them now.
                    if let Ok(h) = app.handle(name) {
                        let _ = h.tx.send(Command::Appended { seq: u64::MAX }).await;
                    }
                }
                Ok(None) => {}
                Err(Load::Unavailable(e)) => {
                    // JetStream electing leaders, NATS coming back: try again.
                    tracing::warn!(stream = %name, error = %e, "loading the stream; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Err(Load::Damaged(options, e)) => {
                    tracing::error!(stream = %name, error = %e, "could not load the stream");
                    // Serve the reason rather than a wrong state.
                    app.insert_loaded(name, Start::Failed(options, format!("could not load: {e}")));
                }
            }
            break;
        }
    }
    cluster.set_ready(partition);
    tracing::info!(
        partition,
        streams = names.len(),
        seconds = started.elapsed().as_secs_f64(),
        "partition serving"
    );
}

/// Why a stream could not be loaded.
enum Load {
    /// NATS or JetStream did not answer: worth another try.
    Unavailable(String),
    /// What JetStream holds cannot be read back: the stream fails with the reason.
    Damaged(Options, String),
}

/// A stream rebuilt from JetStream: its newest snapshot, then its log after it replayed
/// through the same plan and apply as live batches.
async fn load_stream(
    app: &AppState,
    cluster: &Cluster,
    name: &str,
    lease: &Arc<Lease>,
) -> Result<Option<Start>, Load> {
    let unavailable = |e: &dyn std::fmt::Display| Load::Unavailable(e.to_string());
    let Some((json, incarnation)) = cluster.options(name).await.map_err(|e| unavailable(&e))?
    else {
        return Ok(None);
    };
    let options: Options = serde_json::from_slice(&json)
        .map_err(|e| Load::Damaged(Options::default(), format!("its options: {e}")))?;
    let handles = cluster.handles();
    let (slots, snapshots) = get_snapshots(&handles, name, incarnation)
        .await
        .map_err(|e| unavailable(&e))?;
    let threads = app.step_threads();
    let opts = options.clone();
    let built = tokio::task::spawn_blocking(move || {
        // The newest snapshot that reads back whole; none: the whole log.
        let mut stream = snapshots
            .iter()
            .find_map(|(covered, bytes)| {
                let (_, state) = decode_snapshot(bytes)
                    .map_err(|e| tracing::warn!(covered, error = %e, "snapshot unreadable"))
                    .ok()?;
                Some((Stream::from_state(state).ok()?, *covered))
            })
            .unwrap_or_else(|| (Stream::new(opts), 0));
        stream.0.set_step_threads(threads);
        stream
    })
    .await
    .map_err(|e| Load::Damaged(options.clone(), e.to_string()))?;
    let (stream, covered) = built;
    let oldest = slots.iter().copied().filter(|&s| s > 0).min().unwrap_or(0);
    if covered < oldest {
        // Neither snapshot reads back and the log before them is gone.
        return Err(Load::Damaged(
            options,
            "its snapshots cannot be read and the log they cover was trimmed".into(),
        ));
    }
    let mut log = StreamLog::new(
        name,
        cluster.subject(name),
        handles,
        lease.clone(),
        incarnation,
        covered,
        slots,
    );
    let entries = log.read_after().await.map_err(|e| unavailable(&e))?;
    let last = entries.last().map_or(covered, |e| e.seq);
    let (stream, refused) = tokio::task::spawn_blocking(move || {
        let mut stream = stream;
        let (_, refused) = replay(&mut stream, &entries);
        (stream, refused)
    })
    .await
    .map_err(|e| Load::Damaged(options.clone(), format!("replaying its log: {e}")))?;
    app.inner.metrics.cluster_refused_records.inc_by(refused);
    log.advance(last);
    tracing::info!(stream = name, snapshot = covered, last, "stream taken over");
    Ok(Some(Start::Replicated(
        Box::new(stream),
        Box::new(app.replicated(cluster, log)),
    )))
}

/// The stream a path names (`/v1/streams/{name}...`), if any.
fn stream_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/streams/")?;
    let name = rest.split('/').next()?;
    is_valid_stream_name(name).then_some(name)
}

/// Middleware: a request for a stream this node does not own goes to its owner, and the
/// owner's answer comes back as it is (streamed, for events). `GET /v1/streams` gathers the
/// lists of every live node.
pub async fn route(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = app.inner.cluster.clone() else {
        return next.run(req).await;
    };
    let forwarded = req.headers().contains_key(FORWARDED);
    let path = req.uri().path().to_owned();
    if path == "/v1/streams" && req.method() == axum::http::Method::GET && !forwarded {
        return list_all(&app, &cluster, req, next).await;
    }
    let Some(name) = stream_of(&path) else {
        return next.run(req).await;
    };
    match cluster.route(name) {
        Route::Local => next.run(req).await,
        _ if forwarded => {
            ApiError::Cluster(format!("stream `{name}` is moving between nodes; retry"))
                .into_response()
        }
        Route::Remote { url, .. } => {
            app.inner.metrics.cluster_forwards.inc();
            forward(&app, &cluster, &url, req).await
        }
        Route::Unavailable(why) if !cluster.connected() => {
            ApiError::Cluster(format!("NATS is unreachable ({why})")).into_response()
        }
        Route::Unavailable(why) => ApiError::Cluster(why).into_response(),
    }
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "host"
            | "content-length"
            | "proxy-connection"
    )
}

async fn forward(app: &AppState, cluster: &Cluster, url: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let target = format!(
        "{}{}",
        url.trim_end_matches('/'),
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    // The body is held here until the owner has it: charged to this node's memory budget
    // like a body this node reads for itself (503 when it does not fit beside the others in
    // flight, 413 past the limit), and given back when the owner has answered.
    let limit = app.inner.config.limits.body_bytes;
    let raw = match super::api::declared_length(&parts.headers) {
        Some(n) => n.min(limit),
        // No length and not chunked: a request that carries no body (GET, DELETE).
        None if !parts
            .headers
            .contains_key(axum::http::header::TRANSFER_ENCODING)
            && matches!(
                parts.method,
                axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::DELETE
            ) =>
        {
            0
        }
        None => limit,
    };
    let _charge = if raw > 0 {
        match app.charge(raw as u64) {
            Ok(c) => Some(c),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let body = match super::api::read_body(body, limit, raw).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let mut out = app.inner.forwarder.request(parts.method.clone(), &target);
    for (k, v) in &parts.headers {
        if !hop_by_hop(k) {
            out = out.header(k, v);
        }
    }
    out = out.header(FORWARDED, cluster.node());
    let sent = out.body(body).send().await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            return ApiError::Cluster(format!("the stream's owner at {url} did not answer: {e}"))
                .into_response();
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = Response::builder().status(status);
    for (k, v) in resp.headers() {
        if !hop_by_hop(k) {
            r = r.header(k, v);
        }
    }
    r.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| ApiError::Internal(format!("forwarding: {e}")).into_response())
}

/// `GET /v1/streams` on a cluster: this node's streams and every live peer's, by name.
async fn list_all(app: &AppState, cluster: &Cluster, req: Request, next: Next) -> Response {
    let headers = req.headers().clone();
    let local = next.run(req).await;
    if local.status() != StatusCode::OK {
        return local;
    }
    let limit = app.inner.config.limits.body_bytes.max(1 << 26);
    let Ok(bytes) = axum::body::to_bytes(local.into_body(), limit).await else {
        return ApiError::Internal("listing streams".into()).into_response();
    };
    let mut all: Vec<serde_json::Value> = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("streams").and_then(|s| s.as_array().cloned()))
        .unwrap_or_default();
    let peers = cluster.peers();
    let requests: Vec<reqwest::RequestBuilder> = peers
        .iter()
        .map(|(_, url)| {
            let mut r = app
                .inner
                .forwarder
                .get(format!("{}/v1/streams", url.trim_end_matches('/')))
                .header(FORWARDED, cluster.node())
                .timeout(Duration::from_secs(5));
            if let Some(a) = headers.get(axum::http::header::AUTHORIZATION) {
                r = r.header(axum::http::header::AUTHORIZATION, a);
            }
            r
        })
        .collect();
    let answers = futures_util::future::join_all(requests.into_iter().map(fetch_list)).await;
    let mut missing = false;
    for a in answers {
        match a {
            Some(list) => all.extend(list),
            None => missing = true,
        }
    }
    if missing {
        return ApiError::Cluster("a node did not answer with its streams; retry".into())
            .into_response();
    }
    all.sort_by(|a, b| {
        let n = |v: &serde_json::Value| v.get("name").and_then(|n| n.as_str()).map(str::to_owned);
        n(a).cmp(&n(b))
    });
    all.dedup_by(|a, b| a.get("name") == b.get("name"));
    Json(serde_json::json!({ "streams": all })).into_response()
}

async fn fetch_list(r: reqwest::RequestBuilder) -> Option<Vec<serde_json::Value>> {
    let resp = r.send().await.ok()?;
    let v: serde_json::Value = resp.json().await.ok()?;
    v.get("streams").and_then(|s| s.as_array().cloned())
}

/// `GET /v1/cluster`: the nodes, which partitions each owns, and the leases.
#[utoipa::path(get, path = "/v1/cluster", tag = "service",
    responses((status = 200, description = "The nodes of the cluster and what each owns; a node that runs alone shows itself", body = Status)))]
pub async fn cluster_status(State(app): State<AppState>) -> Json<Status> {
    match &app.inner.cluster {
        Some(c) => Json(c.status()),
        None => Json(alone(&app)),
    }
}

/// A node that runs alone: itself, owning every stream.
fn alone(app: &AppState) -> Status {
    let url = format!("http://{}", app.inner.config.listen);
    Status {
        node: "local".into(),
        url: url.clone(),
        connected: None,
        replicas: None,
        lease_ttl_ms: None,
        nodes: vec![NodeStatus {
            name: "local".into(),
            url,
            live: true,
            streams: app.stream_count(),
            partitions: Vec::new(),
        }],
        partitions: Vec::new(),
    }
}

/// The error for a request whose stream's owner task went away while it waited: the stream
/// was deleted (404), or in cluster mode its partition moved to another node (503, retry).
pub fn owner_gone(app: &AppState, name: &str) -> ApiError {
    if app.inner.cluster.is_some() && app.handle(name).is_err() {
        ApiError::Cluster(format!("stream `{name}` moved to another node; retry"))
    } else {
        ApiError::NoSuchStream(name.to_owned())
    }
}

/// Copies the cluster's counters into the metrics before a scrape.
pub fn refresh_metrics(app: &AppState) {
    let Some(c) = &app.inner.cluster else { return };
    let m = &app.inner.metrics;
    let k = c.counters();
    use std::sync::atomic::Ordering::Relaxed;
    m.cluster_partitions.set(c.owned_partitions() as i64);
    m.cluster_acquired.set(k.takeovers.load(Relaxed) as i64);
    m.cluster_lost.set(k.lost.load(Relaxed) as i64);
    m.cluster_released.set(k.released.load(Relaxed) as i64);
    m.cluster_connected.set(i64::from(c.connected()));
    m.cluster_notices.set(k.notices.load(Relaxed) as i64);
}

/// The node name when none is configured: the host's, made a valid name.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() { "node".into() } else { name }
}

/// Joins the cluster the config names, retrying while JetStream elects its leaders.
pub async fn join(
    config: &super::Config,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(Cluster, mpsc::UnboundedReceiver<Change>)> {
    let c = &config.cluster;
    let node = if c.node.is_empty() {
        default_node_name()
    } else {
        c.node.clone()
    };
    let url = if c.advertise.is_empty() {
        format!("http://{listen}")
    } else {
        c.advertise.clone()
    };
    let started = std::time::Instant::now();
    loop {
        match Cluster::connect(c.clone(), node.clone(), url.clone()).await {
            Ok(x) => {
                tracing::info!(node, url, "joined the cluster");
                return Ok(x);
            }
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                tracing::warn!(error = %e, "joining the cluster; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("joining the cluster at {:?}: {e}", c.urls)),
        }
    }
}
