//! `/openapi.json`: the OpenAPI 3 document, generated from the handlers' annotations and the
//! same types they serialise, plus schema-only types for bodies decoded by hand.

use axum::Json;
use utoipa::OpenApi;

use super::api;
use super::error::Problem;
use super::owner::ScaleOut;
use crate::forecast::ForecastStep;
use crate::options::{
    Auto, Cell, Loss, Method, Off, Range, RawOptions, ScaleOption, Spread, SpreadOption, Step,
};

/// A number, or an array of numbers (one per output or input).
#[derive(utoipa::ToSchema)]
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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ekid",
        description = "Online forecasting of streaming time series with recurrent-network ensembles trained by Ensemble Kalman Inversion."
    ),
    paths(
        api::healthz,
        api::metrics,
        api::list_streams,
        api::put_stream,
        api::get_stream,
        api::delete_stream,
        api::post_observations,
        api::get_forecast,
        api::post_forecast,
        api::events,
    ),
    components(schemas(
        Problem,
        RawOptions,
        Cell,
        Method,
        Loss,
        Step,
        Spread,
        SpreadOption,
        Off,
        Auto,
        Range,
        ScaleOption,
        ScaleOut,
        ForecastStep,
        ObservationJson,
        ObservationsBody,
        NumberOrArray,
        api::StreamOut,
        api::StatsOut,
        api::StreamList,
        api::ObserveOut,
        api::PredictionOut,
        api::ForecastOut,
        api::ForecastRequest,
        api::Health,
    ))
)]
pub struct ApiDoc;

pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
