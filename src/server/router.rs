//! The routes of the API and the middleware around them, without binding a socket (tests and
//! the daemon drive the same [`router`]).

use axum::Router;
use axum::extract::Request;
use axum::middleware::from_fn_with_state;
use axum::routing::get;

use super::error::ApiError;
use super::page::{ASSET_ROUTE, PAGE_ROUTE};
use super::state::AppState;
use super::{api, cluster, middleware, openapi, page};

/// Forecasts: `POST` carries the future inputs in a body and is still a read.
pub const FORECAST_ROUTE: &str = "/v1/streams/{name}/forecast";
/// Server-Sent Events: long-lived by design, exempt from the request timeout.
pub const EVENTS_ROUTE: &str = "/v1/streams/{name}/events";

/// The whole API, without binding a socket (tests can drive it directly).
pub fn router(state: AppState) -> Router {
    use axum::routing::post;
    Router::new()
        .route(PAGE_ROUTE, get(page::index))
        .route(ASSET_ROUTE, get(page::asset))
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
            FORECAST_ROUTE,
            get(api::get_forecast).post(api::post_forecast),
        )
        .route(EVENTS_ROUTE, get(api::events))
        .route("/v1/streams/{name}/history", get(api::history))
        .route("/v1/cluster", get(cluster::cluster_status))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), cluster::route))
        .layer(from_fn_with_state(state.clone(), middleware::auth))
        .layer(from_fn_with_state(state.clone(), middleware::limits))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            middleware::panic_response,
        ))
        .layer(from_fn_with_state(state.clone(), middleware::track))
        .with_state(state)
}

async fn fallback(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}
