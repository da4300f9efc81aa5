//! The daemon's life: open the data directory, recover every stream, accept connections under
//! their limits, and stop gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::{Body, Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use super::Config;
use super::router::router;
use super::state::AppState;
use crate::storage::Store;

/// Recovers every stream from the data directory, calls `ready` (the listener is bound and
/// requests are about to be served), serves until `shutdown` resolves, then stops accepting,
/// drains in-flight requests (ending SSE streams), lets every stream owner finish its queue and
/// snapshot, and returns.
///
/// Connections are served by hyper directly (not `axum::serve`) so that the number of open
/// connections is bounded (`connections`) and none holds its slot without using it: each must
/// deliver its first request within `header_timeout_ms` of being accepted (whatever it sends
/// meanwhile, a partial HTTP/2 preface included), and is closed once it has had no request in
/// flight for `idle_timeout_ms` (HTTP/1 keep-alive and HTTP/2 alike). hyper's own head timeout
/// starts only once the protocol is detected, and HTTP/2 has none.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (dir, storage) = (config.data_dir.clone(), config.storage.clone());
    let store = tokio::task::spawn_blocking(move || {
        Store::open(&dir, storage)
            .with_context(|| format!("opening the data directory {}", dir.display()))
    })
    .await??;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && config.auth.tokens.is_empty() {
        tracing::warn!(%local, "listening beyond loopback without [auth] tokens: anyone who can reach this address can write");
    }
    let deadlines = Deadlines {
        first: Duration::from_millis(config.limits.header_timeout_ms),
        idle: Duration::from_millis(config.limits.idle_timeout_ms),
    };
    let connections = Arc::new(Semaphore::new(config.limits.connections));
    let cluster = if config.cluster.enabled() {
        Some(super::cluster::join(&config, local).await?)
    } else {
        None
    };
    let (cluster, changes) = match cluster {
        Some((c, rx)) => (Some(c), Some(rx)),
        None => (None, None),
    };
    let state = AppState::new(config, store, stop_rx.clone(), cluster.clone())?;
    state.recover().await?;
    if let (Some(c), Some(rx)) = (cluster.clone(), changes) {
        tokio::spawn(super::cluster::follow(state.clone(), c, rx));
    }
    let app = router(state.clone());
    ready();

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(deadlines.first);
    // Every connection task holds a sender; shutdown waits for the last one to go.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; closing the new connection");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let activity = Arc::new(Activity::new());
                let service = CountRequests {
                    inner: TowerToHyperService::new(app.clone()),
                    activity: activity.clone(),
                };
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let (stop, alive) = (stop_rx.clone(), alive_tx.clone());
                tokio::spawn(async move {
                    drive(std::pin::pin!(conn), &activity, deadlines, stop, peer).await;
                    drop(permit);
                    drop(alive);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutdown: draining requests");
    let _ = stop_tx.send(true);
    drop(alive_tx);
    if tokio::time::timeout(Duration::from_secs(30), alive_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 30 s; closing them");
    }
    state.close_all().await;
    if let Some(c) = &cluster {
        c.leave().await;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// How long a connection may go without using its slot.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// From accept to the first request (`header_timeout_ms`).
    first: Duration,
    /// With no request in flight (`idle_timeout_ms`).
    idle: Duration,
}

/// How long a connection told to close (HTTP/2: GOAWAY) with nothing in flight may take to go
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection until it ends, the daemon shuts down (in-flight requests finish), or
/// it misses a deadline with no request in flight (it is closed).
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>> + GracefulShutdown,
    E: std::fmt::Display,
{
    // Some(None): shutting down, waiting for what is in flight; Some(Some(t)): closed for a
    // missed deadline, dropped at `t` unless a request is still in flight.
    let mut closing: Option<Option<Instant>> = None;
    loop {
        let wake = match closing {
            // Look again at least once an idle period: a request that ends moves the deadline
            // (it may then come sooner than the first-request one slept on).
            None => {
                let again = Instant::now() + deadlines.idle;
                activity.deadline(deadlines).map_or(again, |d| d.min(again))
            }
            Some(Some(at)) => at,
            Some(None) => Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if closing.is_none() => {
                conn.as_mut().shut_down();
                closing = Some(None);
            }
            _ = tokio::time::sleep_until(wake.into()) => match closing {
                None => {
                    if activity.deadline(deadlines).is_some_and(|d| d <= Instant::now()) {
                        tracing::debug!(%peer, requested = activity.requested(), "closing a connection that sent no request in time");
                        conn.as_mut().shut_down();
                        closing = Some(Some(Instant::now() + CLOSE_GRACE));
                    }
                }
                Some(Some(_)) if !activity.busy() => return,
                Some(_) => closing = Some(Some(Instant::now() + CLOSE_GRACE)),
            },
        }
    }
}

/// A connection that can be asked to finish what is in flight and close.
trait GracefulShutdown {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulShutdown
    for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        >,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What one connection is doing: its service counts requests, its task reads the deadlines.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Requests whose response has not been sent whole (or was dropped).
    in_flight: AtomicUsize,
    /// Whether a request has arrived at all.
    requested: AtomicBool,
    /// When `in_flight` last fell to zero, milliseconds after `opened`.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// When the connection is to be closed unless a request comes first; `None` while one is
    /// in flight.
    fn deadline(&self, d: Deadlines) -> Option<Instant> {
        if self.busy() {
            None
        } else if !self.requested() {
            Some(self.opened + d.first)
        } else {
            let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
            Some(self.opened + since + d.idle)
        }
    }
}

/// One request in flight on a connection, from the service call until its response body is
/// sent whole or dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        // Counted before it is marked requested: a reader that sees `requested` sees it busy
        // (or, once it is done, its `idle_since_ms`), never the stale idle time of a connection
        // that had no request yet.
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        activity.requested.store(true, Ordering::SeqCst);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router as a hyper service that counts each request in flight on its connection until
/// the response body is done.
#[derive(Clone)]
struct CountRequests<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> hyper::service::Service<R> for CountRequests<S>
where
    S: hyper::service::Service<R, Response = hyper::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = hyper::Response<CountedBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        let in_flight = InFlight::new(self.activity.clone());
        let response = self.inner.call(req);
        Box::pin(async move {
            let res = response.await?;
            Ok(res.map(|body| CountedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight until it is done or dropped.
struct CountedBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
