//! `/openapi.json`: the OpenAPI 3 document, generated from the handlers' annotations and the
//! same types they serialise, plus schema-only types for bodies decoded by hand.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{Modify, Number, OpenApi};

use super::AppState;
use super::Config;
use super::error::Problem;
use super::page::{ASSET_ROUTE, PAGE_ROUTE};
use super::{api, page};
use crate::engine::{
    Auto, Cell, Loss, Method, Off, Range, RawOptions, ScaleOption, Spread, SpreadOption, Step,
};
use crate::engine::{Coverage, ForecastStep, Interval};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ekid",
        description = "Online forecasting of streaming time series with recurrent-network ensembles trained by Ensemble Kalman Inversion."
    ),
    paths(
        page::index,
        page::asset,
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
        api::history,
        super::cluster::cluster_status,
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
        api::ScaleOut,
        ForecastStep,
        Interval,
        Coverage,
        api::ObservationJson,
        api::ObservationsBody,
        api::NumberOrArray,
        api::StreamOut,
        api::StatsOut,
        api::StreamList,
        api::ObserveOut,
        api::PredictionOut,
        api::ForecastOut,
        api::ForecastRequest,
        api::Health,
        api::HistoryOut,
        api::HistoryEntry,
    )),
    modifiers(&EveryOperation)
)]
pub struct ApiDoc;

/// What every operation can answer whatever its handler does, added to each once here: 503
/// from the request limits (too many requests in flight, the request timeout, shutting down),
/// and, except `/healthz` and the page's routes, 401 from the optional bearer-token auth (writes when tokens are
/// configured, reads too with `protect_reads`), whose scheme is declared as optional.
struct EveryOperation;

impl Modify for EveryOperation {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                responses.entry("503".into()).or_insert_with(|| {
                    problem("Busy (too many requests in flight), timed out or shutting down; retry after `Retry-After`").into()
                });
                if !["/healthz", PAGE_ROUTE, ASSET_ROUTE].contains(&path.as_str()) {
                    responses.entry("401".into()).or_insert_with(|| {
                        problem(
                            "A bearer token is configured and this request has none or a wrong one",
                        )
                        .into()
                    });
                    op.security = Some(vec![
                        SecurityRequirement::default(),
                        SecurityRequirement::new("bearer", Vec::<String>::new()),
                    ]);
                }
            }
        }
    }
}

/// The document, with this daemon's configured forecast horizon limit as `horizon`'s maximum
/// (a schema-driven client then stays inside it), serialised once when the daemon starts
/// (building it took about a millisecond, which each request spent on an async worker).
pub fn document(config: &Config) -> Bytes {
    let mut doc = ApiDoc::openapi();
    let max = config.limits.horizon;
    let cap = |schema: Option<&mut RefOr<Schema>>| {
        if let Some(RefOr::T(Schema::Object(o))) = schema {
            o.maximum = Some(Number::UInt(max));
        }
    };
    if let Some(get) = doc
        .paths
        .paths
        .get_mut("/v1/streams/{name}/forecast")
        .and_then(|item| item.get.as_mut())
    {
        for p in get.parameters.iter_mut().flatten() {
            if p.name == "horizon" {
                cap(p.schema.as_mut());
            }
        }
    }
    if let Some(RefOr::T(Schema::Object(request))) = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("ForecastRequest"))
    {
        cap(request.properties.get_mut("horizon"));
    }
    // Serialising our own document cannot fail (string keys, finite numbers).
    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
}

pub async fn openapi_json(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.inner.openapi.clone(),
    )
}
