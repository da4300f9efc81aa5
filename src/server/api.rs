//! HTTP handlers: decode and validate at the edge, then talk to the stream's owner or read its
//! published view. Every error leaves as a problem document through [`ApiError`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream as FuturesStream, StreamExt};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot};

use super::AppState;
use super::body::{self, DecodeError, Expect, Format};
use super::error::{ApiError, Problem};
use super::history::Recent;
use super::owner::{Command, StreamView};
use super::state::Charge;
use crate::engine::{Coverage, ForecastStep};
use crate::engine::{Options, RawOptions};

/// [`crate::storage::is_valid_stream_name`] (names become directory names on disk).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if crate::storage::is_valid_stream_name(name) {
        Ok(())
    } else {
        Err(ApiError::BadName(format!(
            "{}, got `{}`",
            crate::storage::STREAM_NAME_RULE,
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// The length a request declares (`Content-Length`), if any.
pub fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads a whole body up to `limit` bytes into one buffer sized for the `expected` length (the
/// declared one), never holding more than one buffer of at most `limit` bytes.
pub async fn read_body(body: Body, limit: usize, expected: usize) -> Result<Vec<u8>, ApiError> {
    let too_large =
        || ApiError::TooLarge(format!("the body is larger than the {limit}-byte limit"));
    let mut buf = Vec::with_capacity(expected.min(limit));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::Decode(DecodeError {
                detail: format!("could not read the body: {e}"),
                line: None,
                field: None,
            })
        })?;
        let len = buf.len() + chunk.len();
        if len > limit {
            return Err(too_large());
        }
        if len > buf.capacity() {
            // Doubling, but never past the limit.
            let want = (2 * buf.capacity()).clamp(len, limit);
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Charges to the memory budget what reading a body and decoding it may hold (its declared
/// length, or the body limit, plus `decoded` of that), then reads it. The charge is given back
/// when the returned [`Charge`] drops.
async fn read_charged(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    decoded: impl Fn(usize) -> u64,
) -> Result<(Vec<u8>, Charge), ApiError> {
    let limit = app.inner.config.limits.body_bytes;
    let raw = declared_length(headers).map_or(limit, |n| n.min(limit));
    let charge = app.charge(raw as u64 + decoded(raw))?;
    let bytes = read_body(body, limit, raw).await?;
    Ok((bytes, charge))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
}

/// The media type without parameters, lower-cased.
fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(ct: &str) -> bool {
    let m = media_type(ct);
    m == "application/json" || m.ends_with("+json")
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

// ---------------------------------------------------------------------------------------------
// Response types.

/// Serialisable form of a scale for the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScaleOut {
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsOut {
    /// Observations applied.
    pub observations: u64,
    /// Last applied sequence number (0 before the first).
    pub last_seq: u64,
    /// Prequential mean squared error, original units (null before the first prediction).
    pub mse: Option<f64>,
    /// Prequential mean squared error, model units.
    pub mse_scaled: Option<f64>,
    /// Standard deviation of the particles' last predictions, original units (with several
    /// outputs: the root of their variances summed, each in its own units).
    pub spread: f64,
    /// Estimated one-step noise variance, original units (with several outputs: summed, like
    /// `mse`).
    pub noise: f64,
    /// Particles re-drawn because their prediction was not finite.
    pub repaired: u64,
    /// Time of the last applied batch (RFC 3339); after a restart, until the next batch, when
    /// the stream's log or snapshot was last written; null before the first observation.
    pub last_update: Option<String>,
    /// The running coverage of the stream's forecast intervals: for each report level, the
    /// share of observations that fell inside the interval served for them, per step ahead
    /// (step 1 first; null before a step's first scored forecast).
    pub coverage: Vec<Coverage>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamOut {
    pub name: String,
    pub options: Options,
    pub stats: StatsOut,
    /// The scale per output (null until fixed by the first batch when `scale` is `auto`).
    pub scale: Option<Vec<ScaleOut>>,
    /// Why the stream failed, if it did.
    pub failed: Option<String>,
    /// Cluster mode: the JetStream subject of the stream's log, `ekid.obs.<partition>.<name>`
    /// (a `.` of the name written `=`), where producers may publish observations directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_subject: Option<String>,
}

impl StreamOut {
    /// The stream as this node serves it (in cluster mode, with its log's subject).
    fn of(app: &AppState, view: &StreamView) -> Self {
        let mut out = StreamOut::from(view);
        out.log_subject = app.inner.cluster.as_ref().map(|c| c.subject(&view.name));
        out
    }
}

impl From<&StreamView> for StreamOut {
    fn from(v: &StreamView) -> Self {
        StreamOut {
            name: v.name.clone(),
            options: v.options.clone(),
            stats: StatsOut {
                observations: v.stats.observations,
                last_seq: v.stats.last_seq,
                mse: v.stats.mse_user(),
                mse_scaled: v.stats.mse_scaled(),
                spread: v.stats.spread_user,
                noise: v.stats.noise_user,
                repaired: v.stats.repaired,
                last_update: v.last_update.map(rfc3339),
                coverage: v.coverage.clone(),
            },
            scale: v.scale.as_ref().map(|s| {
                s.iter()
                    .map(|s| ScaleOut {
                        min: s.min,
                        max: s.max,
                    })
                    .collect()
            }),
            failed: v.failed.clone(),
            log_subject: None,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamList {
    pub streams: Vec<StreamOut>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PredictionOut {
    pub seq: u64,
    /// The prediction made before this observation was learned (null while the lag buffer fills).
    pub prediction: Option<Vec<f64>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ObserveOut {
    pub accepted: usize,
    pub duplicates: usize,
    /// First sequence number applied (null if nothing new was applied).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub predictions: Vec<PredictionOut>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ForecastOut {
    pub stream: String,
    /// The last sequence number the forecast has seen.
    pub seq: u64,
    pub horizon: usize,
    /// The first of `levels` (its interval is each step's `lower` and `upper`).
    pub level: f64,
    /// The levels asked for, in order: each step has one interval per level.
    pub levels: Vec<f64>,
    pub steps: Vec<ForecastStep>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub streams: usize,
}

// ---------------------------------------------------------------------------------------------
// Handlers.

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "The daemon is up", body = Health)))]
pub async fn healthz(State(app): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        streams: app.stream_count(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "application/openmetrics-text")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    super::cluster::refresh_metrics(&app);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.inner.metrics.encode(),
    )
        .into_response()
}

#[utoipa::path(put, path = "/v1/streams/{name}", tag = "streams",
    params(StreamPath),
    request_body(content((RawOptions = "application/json")), description = "Stream options; every field optional, defaults from the server config"),
    responses(
        (status = 201, description = "Created", body = StreamOut),
        (status = 200, description = "Exists with the same options", body = StreamOut),
        (status = 400, description = "Malformed options or bad name", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Exists with different options", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid option value or over a limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage failed, busy, timed out or shutting down; retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let limit = app.inner.config.limits.body_bytes;
    let bytes = read_body(body, limit, declared_length(&headers).unwrap_or(0)).await?;
    let raw: RawOptions = if bytes.iter().all(u8::is_ascii_whitespace) {
        RawOptions::default()
    } else {
        match content_type(&headers) {
            Some(ct) if is_json(&ct) => {}
            other => {
                return Err(ApiError::UnsupportedMediaType {
                    got: other.unwrap_or_default(),
                    accepted: "application/json",
                });
            }
        }
        body::from_json(&bytes).map_err(ApiError::MalformedOptions)?
    };
    let options = raw.resolve(&app.inner.defaults)?;
    let (created, view) = app.create_stream(&name, options).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(StreamOut::of(&app, view.as_ref()))).into_response())
}

#[utoipa::path(get, path = "/v1/streams", tag = "streams",
    responses((status = 200, description = "Every stream", body = StreamList)))]
pub async fn list_streams(State(app): State<AppState>) -> Json<StreamList> {
    let mut streams: Vec<StreamOut> = app
        .handles()
        .iter()
        .map(|(_, h)| StreamOut::of(&app, h.view().as_ref()))
        .collect();
    streams.sort_by(|a, b| a.name.cmp(&b.name));
    Json(StreamList { streams })
}

#[utoipa::path(get, path = "/v1/streams/{name}", tag = "streams",
    params(StreamPath),
    responses(
        (status = 200, description = "Options and statistics", body = StreamOut),
        (status = 400, description = "Bad name", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<StreamOut>, ApiError> {
    check_name(&name)?;
    let h = app.handle(&name)?;
    Ok(Json(StreamOut::of(&app, h.view().as_ref())))
}

#[utoipa::path(delete, path = "/v1/streams/{name}", tag = "streams",
    params(StreamPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad name", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage failed, busy, timed out or shutting down; retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    app.delete_stream(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/streams/{name}/observations", tag = "observations",
    params(StreamPath),
    request_body(content(
        (ObservationsBody = "application/json"),
        (String = "application/x-ndjson"),
        (String = "text/csv"),
    ), description = "One observation or a batch: a JSON object or array, NDJSON (one object per line) or CSV (header: `y` or `y1..`, optional `x` or `x1..`, optional `seq`)"),
    responses(
        (status = 200, description = "Applied (all or nothing), with the prequential predictions", body = ObserveOut),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Sequence gap", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid observation (dimension, non-finite value, seq 0)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The stream failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Stream queue full, the memory budget held by requests in flight, or shutting down; retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_observations(
    State(app): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ObserveOut>, ApiError> {
    check_name(&name)?;
    let handle = app.handle(&name)?;
    let limits = &app.inner.config.limits;
    let ct = content_type(&headers).unwrap_or_default();
    let format = match media_type(&ct).as_str() {
        _ if is_json(&ct) => Format::Json,
        "application/x-ndjson" | "application/jsonl" => Format::Ndjson,
        "text/csv" => Format::Csv,
        _ => {
            return Err(ApiError::UnsupportedMediaType {
                got: ct,
                accepted: "application/json, application/x-ndjson or text/csv",
            });
        }
    };
    let options = &handle.view().options;
    let expect = Expect {
        shape: Some((options.inputs, options.outputs)),
        max_observations: limits.batch_observations,
    };
    let width = options.inputs + options.outputs;
    let (bytes, charge) = read_charged(&app, &headers, body, |raw| {
        body::observations_bound(raw, expect.max_observations, width)
    })
    .await?;
    // Decoding is CPU work of the size of the body: on the blocking pool, which keeps the
    // charge until it is done even if this request is abandoned meanwhile.
    let (batch, _charge) =
        tokio::task::spawn_blocking(move || (body::decode(format, &bytes, &expect), charge))
            .await
            .map_err(|e| ApiError::Internal(format!("decoding the body failed: {e}")))?;
    let batch = batch?;
    let (reply, rx) = oneshot::channel();
    // The owner went away: the stream was deleted, or (cluster mode) moved to another node.
    let gone = || super::cluster::owner_gone(&app, &name);
    handle
        .tx
        .try_send(Command::Observe { batch, reply })
        .map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => ApiError::QueueFull(name.clone()),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => gone(),
        })?;
    let outcome = rx.await.map_err(|_| gone())??;
    Ok(Json(ObserveOut {
        accepted: outcome.applied.len(),
        duplicates: outcome.duplicates,
        first_seq: outcome.applied.first().map(|a| a.seq),
        last_seq: outcome.applied.last().map(|a| a.seq),
        predictions: outcome
            .applied
            .into_iter()
            .map(|a| PredictionOut {
                seq: a.seq,
                prediction: a.prediction,
            })
            .collect(),
    }))
}

fn bad_query(field: &str, detail: impl Into<String>) -> ApiError {
    ApiError::BadQuery {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

/// The stream's name in a path, as the OpenAPI document declares it (the rule itself is
/// `storage::is_valid_stream_name`, which the handlers apply).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(
    dead_code,
    reason = "a schema only: handlers read the name from the path"
)]
pub struct StreamPath {
    /// Stream name: 1 to 64 of A-Z a-z 0-9 _ . -
    #[param(pattern = r"^[A-Za-z0-9_.\-]{1,64}$")]
    name: String,
}

/// The forecast's query parameters, parsed by hand (not by serde) so that every refusal names
/// its parameter: an unknown one, one given twice, a value that is not a number.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ForecastQuery {
    /// Steps ahead (1 ..= the configured limit).
    #[param(minimum = 1)]
    pub horizon: usize,
    /// Coverage of the interval, in (0, 1), or several, comma-separated (`0.5,0.9`): one
    /// interval each; default 0.9.
    #[param(style = Form, explode = false)]
    pub level: Option<Vec<f64>>,
}

impl ForecastQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<Self, ApiError> {
        let (mut horizon, mut level) = (None, None);
        for (key, value) in pairs {
            let slot = match key.as_str() {
                "horizon" => &mut horizon,
                "level" => &mut level,
                _ => {
                    return Err(bad_query(
                        &key,
                        format!("unknown query parameter `{key}`: use `horizon` and `level`"),
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return Err(bad_query(&key, format!("`{key}` is given twice")));
            }
        }
        let horizon = horizon
            .ok_or_else(|| bad_query("horizon", "`horizon` is required"))?
            .parse()
            .map_err(|_| bad_query("horizon", "`horizon` must be a whole number of steps"))?;
        let level = level
            .map(|v| {
                v.split(',')
                    .map(|l| l.trim().parse::<f64>())
                    .collect::<Result<Vec<f64>, _>>()
            })
            .transpose()
            .map_err(|_| {
                bad_query(
                    "level",
                    "`level` must be a number in (0, 1), or several separated by commas",
                )
            })?;
        Ok(ForecastQuery { horizon, level })
    }
}

/// The forecast request as the OpenAPI document describes it (the body itself is decoded by
/// `body::decode_forecast`, which refuses rows of `x` as they come).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct ForecastRequest {
    #[schema(minimum = 1)]
    pub horizon: usize,
    /// Coverage of the interval in (0, 1), or an array of them (one interval each); default 0.9.
    pub level: Option<NumberOrArray>,
    /// The future exogenous inputs: `horizon` rows of `inputs` values (omit when none).
    #[serde(default)]
    pub x: Vec<Vec<f64>>,
}

#[utoipa::path(get, path = "/v1/streams/{name}/forecast", tag = "forecasts",
    params(StreamPath, ForecastQuery),
    responses(
        (status = 200, description = "Mean-particle forecast with predictive intervals", body = ForecastOut),
        (status = 400, description = "Bad query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not enough observations yet", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Over the forecast work limit (horizon times the work of one step)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The stream failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_forecast(
    State(app): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<ForecastOut>, ApiError> {
    check_name(&name)?;
    let Query(pairs) = query.map_err(|e| bad_query("query", e.body_text()))?;
    let q = ForecastQuery::parse(pairs)?;
    let view = app.handle(&name)?.view();
    if view.options.inputs > 0 {
        return Err(bad_query(
            "x",
            format!(
                "stream `{name}` has {} exogenous inputs: POST the future inputs to this URL",
                view.options.inputs
            ),
        ));
    }
    forecast(&app, view, q.horizon, q.level, Vec::new()).await
}

#[utoipa::path(post, path = "/v1/streams/{name}/forecast", tag = "forecasts",
    params(StreamPath),
    request_body(content((ForecastRequest = "application/json"))),
    responses(
        (status = 200, description = "Mean-particle forecast with predictive intervals", body = ForecastOut),
        (status = 400, description = "Malformed request or wrong future inputs", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not enough observations yet", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Over the forecast work limit (horizon times the work of one step)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The stream failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The memory budget held by requests in flight; retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn post_forecast(
    State(app): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ForecastOut>, ApiError> {
    check_name(&name)?;
    let view = app.handle(&name)?.view();
    match content_type(&headers) {
        Some(ct) if is_json(&ct) => {}
        other => {
            return Err(ApiError::UnsupportedMediaType {
                got: other.unwrap_or_default(),
                accepted: "application/json",
            });
        }
    }
    let (inputs, max_horizon) = (view.options.inputs, app.inner.config.limits.horizon);
    let (bytes, charge) = read_charged(&app, &headers, body, |raw| {
        body::forecast_bound(raw, max_horizon, inputs)
    })
    .await?;
    let (req, _charge) = tokio::task::spawn_blocking(move || {
        (body::decode_forecast(&bytes, inputs, max_horizon), charge)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoding the body failed: {e}")))?;
    let req = req?;
    forecast(&app, view, req.horizon, req.level, req.x).await
}

/// Most levels one forecast may ask for.
const MAX_LEVELS: usize = 16;

async fn forecast(
    app: &AppState,
    view: Arc<StreamView>,
    horizon: usize,
    levels: Option<Vec<f64>>,
    x: Vec<f64>,
) -> Result<Json<ForecastOut>, ApiError> {
    let max = app.inner.config.limits.horizon;
    if !(1..=max).contains(&horizon) {
        return Err(bad_query(
            "horizon",
            format!("`horizon` must be between 1 and {max}, got {horizon}"),
        ));
    }
    let levels = levels.unwrap_or_else(|| vec![0.9]);
    if levels.is_empty() || levels.len() > MAX_LEVELS {
        return Err(bad_query(
            "level",
            format!(
                "`level` must name 1 to {MAX_LEVELS} levels, got {}",
                levels.len()
            ),
        ));
    }
    if let Some(bad) = levels.iter().find(|l| !(**l > 0.0 && **l < 1.0)) {
        return Err(bad_query(
            "level",
            format!("`level` must be in (0, 1), got {bad}"),
        ));
    }
    if let Some(f) = &view.failed {
        return Err(ApiError::StreamFailed(view.name.clone(), f.clone()));
    }
    let Some(state) = view.forecast.clone() else {
        return Err(ApiError::NotReady(format!(
            "stream `{}` has {} observations; a forecast needs at least {} (its lags)",
            view.name, view.stats.observations, view.options.lags
        )));
    };
    // The roll-outs this state will run: the stream's forecaster, plus the particles while its
    // intervals are not calibrated yet.
    let paths = state.particles.len() / state.layout.dim().max(1) + 1;
    let work = horizon as u64 * paths as u64 * state.layout.dim() as u64;
    let budget = app.inner.config.limits.forecast_work;
    if work > budget {
        return Err(ApiError::Limit {
            field: Some("horizon"),
            detail: format!(
                "a {horizon}-step forecast of this stream costs {work} parameter-steps, over the {budget} limit; ask for a shorter horizon"
            ),
        });
    }
    let steps = roll_out(app, state, horizon, levels.clone(), x).await?;
    Ok(Json(ForecastOut {
        stream: view.name.clone(),
        seq: view.stats.last_seq,
        horizon,
        level: levels[0],
        levels,
        steps,
    }))
}

/// How long a forecast computes before it lets whoever waits for a core (a batch update, another
/// forecast) have its turn.
const FORECAST_SLICE: Duration = Duration::from_millis(10);

/// Tells a roll-out on the blocking pool that its request is gone (timed out, or the client
/// left): set when the handler's future is dropped.
#[derive(Default)]
struct Cancel {
    cancelled: AtomicBool,
    /// Wakes a roll-out that waits for a core.
    wake: tokio::sync::Notify,
}

struct CancelOnDrop(Arc<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancelled.store(true, Ordering::Relaxed);
        // Stored if nobody waits yet: the next wait ends at once.
        self.0.wake.notify_one();
    }
}

/// A forecast's hold on a core: its turn among forecasts, then one of the core permits batch
/// updates use.
type CoreHold = (OwnedSemaphorePermit, OwnedSemaphorePermit);

async fn take_core(turns: &Arc<Semaphore>, cores: &Arc<Semaphore>) -> Option<CoreHold> {
    let turn = turns.clone().acquire_owned().await.ok()?;
    let core = cores.clone().acquire_owned().await.ok()?;
    Some((turn, core))
}

/// Rolls a forecast out on the blocking pool (it is O(horizon · particles · d)) holding one of
/// the core permits batch updates use, so forecasts and updates together keep to the cores.
/// Every [`FORECAST_SLICE`] the roll-out lets its core go and queues again: first for a turn
/// among forecasts (as many turns as cores), then for the core. The semaphores are fair, so
/// forecasts take turns, and an update waiting for a core has at most one forecast per core
/// ahead of it, whatever number are running. When the request's future is dropped, the
/// roll-out stops at its next step.
async fn roll_out(
    app: &AppState,
    state: Arc<crate::engine::ForecastState>,
    horizon: usize,
    levels: Vec<f64>,
    x: Vec<f64>,
) -> Result<Vec<ForecastStep>, ApiError> {
    let (cores, turns) = app.cores();
    // The semaphores are never closed; the daemon is going away if they were.
    let gone = || ApiError::ShuttingDown;
    let hold = take_core(&turns, &cores).await.ok_or_else(gone)?;
    let cancel = Arc::new(Cancel::default());
    let _on_drop = CancelOnDrop(cancel.clone());
    let runtime = tokio::runtime::Handle::current();
    let steps = tokio::task::spawn_blocking(move || {
        let mut hold = Some(hold);
        let mut slice = Instant::now();
        let mut calls = 0u32;
        state.forecast_while(horizon, &levels, &x, &mut || {
            if cancel.cancelled.load(Ordering::Relaxed) {
                return false;
            }
            // A step is O(d); the clock is read every few.
            calls = calls.wrapping_add(1);
            if calls.is_multiple_of(16) && slice.elapsed() >= FORECAST_SLICE {
                drop(hold.take());
                hold = runtime.block_on(async {
                    tokio::select! {
                        h = take_core(&turns, &cores) => h,
                        _ = cancel.wake.notified() => None,
                    }
                });
                slice = Instant::now();
            }
            hold.is_some() && !cancel.cancelled.load(Ordering::Relaxed)
        })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("forecast failed: {e}")))?;
    // Stopped: the request is gone, so this answer reaches nobody.
    steps.ok_or_else(gone)
}

/// The history's query parameters, parsed by hand like the forecast's.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The newest observations to return, at most (default: all the stream keeps, `[limits]
    /// history`).
    #[param(minimum = 1)]
    pub limit: Option<usize>,
}

impl HistoryQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut limit = None;
        for (key, value) in pairs {
            if key != "limit" {
                return Err(bad_query(
                    &key,
                    format!("unknown query parameter `{key}`: use `limit`"),
                ));
            }
            if limit.is_some() {
                return Err(bad_query("limit", "`limit` is given twice"));
            }
            let n: usize =
                value.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    bad_query("limit", "`limit` must be a whole number, at least 1")
                })?;
            limit = Some(n);
        }
        Ok(HistoryQuery { limit })
    }
}

/// One kept observation, as the OpenAPI document describes it (the same fields as an event).
#[derive(utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "a schema only: the ring serialises its entries itself"
)]
pub struct HistoryEntry {
    seq: u64,
    /// The observed value(s), original units.
    y: Vec<f64>,
    /// The prequential prediction made before this observation was learned (null while the
    /// lag buffer filled).
    prediction: Option<Vec<f64>>,
    /// Squared error of the prediction summed over outputs, original units.
    error: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HistoryOut {
    pub stream: String,
    /// The last applied sequence number when the history was read.
    pub last_seq: u64,
    /// The newest kept observations, oldest first; after a restart only those applied since.
    #[schema(value_type = Vec<HistoryEntry>)]
    pub observations: Recent,
}

#[utoipa::path(get, path = "/v1/streams/{name}/history", tag = "observations",
    params(StreamPath, HistoryQuery),
    responses(
        (status = 200, description = "The recent observations with their prequential predictions", body = HistoryOut),
        (status = 400, description = "Bad name or query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn history(
    State(app): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let Query(pairs) = query.map_err(|e| bad_query("query", e.body_text()))?;
    let q = HistoryQuery::parse(pairs)?;
    let handle = app.handle(&name)?;
    let last_seq = handle.view().stats.last_seq;
    // Copying and encoding a ring of up to `[limits] history` entries is work of its size: on
    // the blocking pool.
    let body = tokio::task::spawn_blocking(move || {
        let out = HistoryOut {
            stream: name,
            last_seq,
            observations: handle.history.recent(q.limit.unwrap_or(usize::MAX)),
        };
        serde_json::to_vec(&out)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading the history failed: {e}")))?
    .map_err(|e| ApiError::Internal(format!("encoding the history failed: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /v1/streams/{name}/events`: one SSE event per applied observation; ends at shutdown.
#[utoipa::path(get, path = "/v1/streams/{name}/events", tag = "observations",
    params(StreamPath),
    responses(
        (status = 200, description = "Server-Sent Events: one `observation` event per applied observation (data: seq, y, prediction, error)", body = String, content_type = "text/event-stream"),
        (status = 400, description = "Bad name", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stream", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "As many event subscribers as the limit (of the stream, or in all); retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn events(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Sse<impl FuturesStream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    check_name(&name)?;
    let handle = app.handle(&name)?;
    let limits = &app.inner.config.limits;
    // Held by the event stream: a subscriber that leaves gives its slots back.
    let slots = (
        handle
            .events
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::Busy(format!(
                    "stream `{name}` has {} event subscribers, its limit",
                    limits.subscribers_per_stream
                ))
            })?,
        app.inner
            .subscribers
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::Busy(format!(
                    "{} event subscribers are connected, the limit",
                    limits.subscribers
                ))
            })?,
    );
    let rx = handle.events.subscribe();
    let shutdown = app.inner.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (rx, shutdown, slots),
        |(mut rx, mut shutdown, slots)| async move {
            if *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                _ = shutdown.changed() => None,
                r = rx.recv() => match r {
                    Ok(a) => {
                        let data = serde_json::to_string(&a).unwrap_or_default();
                        let ev = SseEvent::default().event("observation").id(a.seq.to_string()).data(data);
                        Some((Ok(ev), (rx, shutdown, slots)))
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let ev = SseEvent::default().event("lagged").data(format!("{{\"skipped\":{n}}}"));
                        Some((Ok(ev), (rx, shutdown, slots)))
                    }
                    // The stream was deleted.
                    Err(broadcast::error::RecvError::Closed) => None,
                },
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

// Schema-only types: the observation body as the OpenAPI document describes it (the body itself
// is decoded by `body`, which reports errors with line and field).

/// A number, or an array of numbers (one per output or input, or one per level).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum NumberOrArray {
    One(f64),
    Many(Vec<f64>),
}

/// One observation as JSON.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct ObservationJson {
    /// The next expected sequence number (1-based); an already applied one is skipped as a
    /// duplicate, a gap is 409.
    #[schema(minimum = 1)]
    seq: Option<u64>,
    /// Exogenous inputs (as many as the stream's `inputs`).
    x: Option<NumberOrArray>,
    /// The observed value(s) (as many as the stream's `outputs`).
    y: NumberOrArray,
}

/// One observation object or an array of them.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum ObservationsBody {
    One(ObservationJson),
    Many(Vec<ObservationJson>),
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(super::rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            super::rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
