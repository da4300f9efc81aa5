//! The daemon: shared state, the router, and `serve` with graceful shutdown.

pub mod api;
pub mod body;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod owner;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::options::Options;
use crate::stream::Stream;
use error::ApiError;
use metrics::{HttpLabels, Metrics, RouteLabel};
use owner::{Command, StreamHandle, StreamView};

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
    streams: RwLock<Registry>,
    owners: Mutex<Vec<JoinHandle<()>>>,
    /// Limits concurrent batch updates to the number of cores.
    cores: Arc<Semaphore>,
    /// Flips to true when shutdown starts (ends SSE streams).
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Default)]
struct Registry {
    handles: HashMap<String, StreamHandle>,
    /// Ensemble bytes of every open stream, for the memory budget.
    bytes: u64,
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
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<Self> {
        let defaults = config.stream_defaults()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(AppState {
            inner: Arc::new(Shared {
                defaults,
                metrics: Arc::new(Metrics::default()),
                streams: RwLock::new(Registry::default()),
                owners: Mutex::new(Vec::new()),
                cores: Arc::new(Semaphore::new(cores)),
                shutdown,
                config,
            }),
        })
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

    /// Creates a stream, or finds the same one. Returns whether it was created.
    pub fn create_stream(
        &self,
        name: &str,
        options: Options,
    ) -> Result<(bool, Arc<StreamView>), ApiError> {
        if *self.inner.shutdown.borrow() {
            return Err(ApiError::ShuttingDown);
        }
        let limits = &self.inner.config.limits;
        let mut reg = write(&self.inner.streams);
        if let Some(h) = reg.handles.get(name) {
            let view = h.view();
            return if view.options == options {
                Ok((false, view))
            } else {
                Err(ApiError::OptionsConflict(name.to_owned()))
            };
        }
        if reg.handles.len() >= limits.streams {
            return Err(ApiError::Limit(format!(
                "the server holds its limit of {} streams",
                limits.streams
            )));
        }
        let bytes = options.ensemble_bytes() as u64;
        let left = limits.memory_bytes.saturating_sub(reg.bytes);
        if bytes > left {
            return Err(ApiError::Limit(format!(
                "the ensemble needs {bytes} bytes (J·d·8 = {}·{}·8) but only {left} of the {}-byte budget are left",
                options.ensemble,
                options.layout().dim(),
                limits.memory_bytes
            )));
        }
        let (handle, task) = owner::spawn(
            name.to_owned(),
            Stream::new(options),
            limits.queue_depth,
            self.inner.metrics.clone(),
            self.inner.cores.clone(),
        );
        let view = handle.view();
        reg.handles.insert(name.to_owned(), handle);
        reg.bytes += bytes;
        self.inner.metrics.streams.set(reg.handles.len() as i64);
        drop(reg);
        let mut owners = self.inner.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.retain(|t| !t.is_finished());
        owners.push(task);
        Ok((true, view))
    }

    /// Removes a stream: later requests see 404; the owner finishes what was queued first.
    pub async fn delete_stream(&self, name: &str) -> Result<(), ApiError> {
        let handle = {
            let mut reg = write(&self.inner.streams);
            let h = reg
                .handles
                .remove(name)
                .ok_or_else(|| ApiError::NoSuchStream(name.to_owned()))?;
            reg.bytes = reg
                .bytes
                .saturating_sub(h.view().options.ensemble_bytes() as u64);
            self.inner.metrics.streams.set(reg.handles.len() as i64);
            h
        };
        let (reply, rx) = oneshot::channel();
        if handle.tx.send(Command::Close { reply }).await.is_ok() {
            let _ = rx.await;
        }
        self.inner.metrics.forget(name);
        Ok(())
    }

    /// Closes every stream after the HTTP server has drained, and waits for the owners.
    pub async fn close_all(&self) {
        let handles: Vec<StreamHandle> = {
            let mut reg = write(&self.inner.streams);
            reg.bytes = 0;
            reg.handles.drain().map(|(_, h)| h).collect()
        };
        for h in handles {
            let (reply, rx) = oneshot::channel();
            if h.tx.send(Command::Close { reply }).await.is_ok() {
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

/// Counts requests by route, method and status, and times them.
async fn track(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let res = next.run(req).await;
    let m = &app.inner.metrics;
    m.http_requests
        .get_or_create(&HttpLabels {
            route: route.clone(),
            method,
            status: res.status().as_u16(),
        })
        .inc();
    m.http_seconds
        .get_or_create(&RouteLabel { route })
        .observe(started.elapsed().as_secs_f64());
    res
}

/// The whole API, without binding a socket (tests can drive it directly).
pub fn router(state: AppState) -> Router {
    use axum::routing::post;
    let timeout = Duration::from_millis(state.inner.config.limits.request_timeout_ms);
    let api = Router::new()
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/v1/streams", get(api::list_streams))
        .route(
            "/v1/streams/{name}",
            get(api::get_stream)
                .put(api::put_stream)
                .delete(api::delete_stream),
        )
        .route(
            "/v1/streams/{name}/observations",
            post(api::post_observations),
        )
        .route(
            "/v1/streams/{name}/forecast",
            get(api::get_forecast).post(api::post_forecast),
        )
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ));
    // SSE streams are long-lived: no request timeout on them.
    let sse = Router::new().route("/v1/streams/{name}/events", get(api::events));
    api.merge(sse)
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn fallback(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// Serves until `shutdown` resolves, then stops accepting, drains in-flight requests (ending SSE
/// streams), lets every stream owner finish its queue, and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = AppState::new(config, stop_rx)?;
    let app = router(state.clone());
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown: draining requests");
        let _ = stop_tx.send(true);
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
    state.close_all().await;
    tracing::info!("shutdown complete");
    Ok(())
}
