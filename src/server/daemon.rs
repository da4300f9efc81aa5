//! The daemon's life: open the data directory, recover every stream, accept connections under
//! their limits, and stop gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::Config;
use super::router::router;
use super::state::AppState;
use crate::storage::Store;

/// Recovers every stream from the data directory, calls `ready` (the listener is bound and
/// requests are about to be served), serves until `shutdown` resolves, then stops accepting,
/// drains in-flight requests (ending SSE streams), lets every stream owner finish its queue and
/// snapshot, and returns.
///
/// Connections are served by hyper directly (not `axum::serve`) so that a client that sends
/// its request head too slowly is cut off (`header_timeout_ms`) and the number of open
/// connections is bounded (`connections`).
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
    let header_timeout = Duration::from_millis(config.limits.header_timeout_ms);
    let connections = Arc::new(Semaphore::new(config.limits.connections));
    let state = AppState::new(config, store, stop_rx)?;
    state.recover().await?;
    let app = router(state.clone());
    ready();

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
                let service = TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutdown: draining requests");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 30 s; closing them");
    }
    state.close_all().await;
    tracing::info!("shutdown complete");
    Ok(())
}
