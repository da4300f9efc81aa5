//! One owner task per stream: the only place a stream's state is mutated. Handlers talk to it
//! through a bounded queue of [`Command`]s and read the immutable [`StreamView`] it publishes
//! after every batch, so reads never queue behind writes. The CPU-heavy part of a batch runs
//! on tokio's blocking pool, at most one batch per core at a time (a semaphore), never on the
//! async workers.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::error::ApiError;
use super::metrics::{Metrics, StreamLabel};
use crate::forecast::ForecastState;
use crate::model::Scaler;
use crate::options::Options;
use crate::stream::{Applied, Observation, Stats, Stream};

/// What handlers may ask of an owner.
#[derive(Debug)]
pub enum Command {
    Observe {
        batch: Vec<Observation>,
        reply: oneshot::Sender<Result<Outcome, ApiError>>,
    },
    /// Finish what is queued before this, then stop (stream deleted or server stopping).
    Close { reply: oneshot::Sender<()> },
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
    pub failed: Option<String>,
}

/// The event sent to `/events` subscribers for every applied observation.
pub type Event = Applied;

/// A cheap-to-clone handle on a stream's owner.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    pub tx: mpsc::Sender<Command>,
    pub view: watch::Receiver<Arc<StreamView>>,
    pub events: broadcast::Sender<Event>,
}

impl StreamHandle {
    pub fn view(&self) -> Arc<StreamView> {
        self.view.borrow().clone()
    }
}

/// Starts the owner of `stream`.
pub fn spawn(
    name: String,
    stream: Stream,
    queue_depth: usize,
    metrics: Arc<Metrics>,
    cores: Arc<Semaphore>,
) -> (StreamHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue_depth.max(1));
    let view = StreamView {
        name: name.clone(),
        options: stream.options().clone(),
        stats: stream.stats().clone(),
        scale: stream.y_scale().map(<[Scaler]>::to_vec),
        last_update: None,
        forecast: stream.forecast_state().map(Arc::new),
        failed: None,
    };
    let (view_tx, view_rx) = watch::channel(Arc::new(view));
    let (events, _) = broadcast::channel(1024);
    let owner = Owner {
        name,
        stream: Some(Box::new(stream)),
        view: view_tx,
        events: events.clone(),
        metrics,
        cores,
    };
    let task = tokio::spawn(owner.run(rx));
    (
        StreamHandle {
            tx,
            view: view_rx,
            events,
        },
        task,
    )
}

struct Owner {
    name: String,
    /// None once a batch panicked: the stream is failed and answers every command with 500.
    stream: Option<Box<Stream>>,
    view: watch::Sender<Arc<StreamView>>,
    events: broadcast::Sender<Event>,
    metrics: Arc<Metrics>,
    cores: Arc<Semaphore>,
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Observe { batch, reply } => {
                    let r = self.observe(batch).await;
                    let _ = reply.send(r);
                }
                Command::Close { reply } => {
                    let _ = reply.send(());
                    break;
                }
            }
        }
        tracing::debug!(stream = %self.name, "owner stopped");
    }

    fn label(&self) -> StreamLabel {
        StreamLabel {
            stream: self.name.clone(),
        }
    }

    async fn observe(&mut self, batch: Vec<Observation>) -> Result<Outcome, ApiError> {
        let failed = || {
            let reason = self.view.borrow().failed.clone().unwrap_or_default();
            ApiError::StreamFailed(self.name.clone(), reason)
        };
        let Some(stream) = self.stream.take() else {
            return Err(failed());
        };
        let plan = match stream.plan(&batch) {
            Ok(p) => p,
            Err(e) => {
                self.stream = Some(stream);
                return Err(e.into());
            }
        };
        self.metrics
            .duplicates
            .get_or_create(&self.label())
            .inc_by(plan.duplicates as u64);
        if plan.accepted.is_empty() {
            self.stream = Some(stream);
            return Ok(Outcome {
                duplicates: plan.duplicates,
                applied: Vec::new(),
            });
        }
        let permit = self.cores.clone().acquire_owned().await;
        let started = Instant::now();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut stream = stream;
            let mut applied = Vec::with_capacity(plan.accepted.len());
            stream.apply(&batch, &plan, |a| applied.push(a));
            let forecast = stream.forecast_state().map(Arc::new);
            (stream, plan, applied, forecast)
        })
        .await;
        match work {
            Ok((stream, plan, applied, forecast)) => {
                let elapsed = started.elapsed().as_secs_f64();
                let n = applied.len().max(1) as f64;
                self.metrics.batch_seconds.observe(elapsed);
                self.metrics.update_seconds.observe(elapsed / n);
                self.publish(&stream, forecast);
                for a in &applied {
                    // No subscribers is fine.
                    let _ = self.events.send(a.clone());
                }
                self.stream = Some(stream);
                Ok(Outcome {
                    duplicates: plan.duplicates,
                    applied,
                })
            }
            Err(e) => {
                let reason = if e.is_panic() {
                    "the update panicked".to_owned()
                } else {
                    format!("the update was cancelled: {e}")
                };
                tracing::error!(stream = %self.name, %reason, "stream failed");
                self.metrics.failed.get_or_create(&self.label()).set(1);
                self.view.send_modify(|v| {
                    let mut nv = (**v).clone();
                    nv.failed = Some(reason);
                    *v = Arc::new(nv);
                });
                Err(failed())
            }
        }
    }

    fn publish(&self, stream: &Stream, forecast: Option<Arc<ForecastState>>) {
        let stats = stream.stats().clone();
        let scale = stream.y_scale().map(<[Scaler]>::to_vec);
        let width = scale
            .as_ref()
            .and_then(|s| s.first())
            .map_or(1.0, |s| s.max - s.min);
        let l = self.label();
        self.metrics
            .observations
            .get_or_create(&l)
            .inc_by(stats.observations - self.view.borrow().stats.observations);
        if let Some(m) = stats.mse_user() {
            self.metrics.mse.get_or_create(&l).set(m);
        }
        if let Some(m) = stats.mse_scaled() {
            self.metrics.mse_scaled.get_or_create(&l).set(m);
        }
        self.metrics
            .spread
            .get_or_create(&l)
            .set(stats.prediction_spread * width);
        self.metrics
            .last_seq
            .get_or_create(&l)
            .set(stats.last_seq as i64);
        let view = StreamView {
            name: self.name.clone(),
            options: stream.options().clone(),
            stats,
            scale,
            last_update: Some(SystemTime::now()),
            forecast,
            failed: None,
        };
        self.view.send_replace(Arc::new(view));
    }
}

/// Serialisable form of a scale for the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScaleOut {
    pub min: f64,
    pub max: f64,
}
