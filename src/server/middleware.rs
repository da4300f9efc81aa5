//! Cross-cutting request handling: bearer-token auth, the concurrent-request limit, the
//! whole-request timeout, panics, and request metrics. Every refusal is a problem document.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::metrics::{HttpLabels, RouteLabel};
use super::page::{ASSET_ROUTE, PAGE_ROUTE};
use super::router::{EVENTS_ROUTE, FORECAST_ROUTE};

/// Equality that takes the same time wherever the first difference is (only the length leaks).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry one of the configured bearer tokens. Every token is compared, so
/// the time does not depend on which one matched.
pub fn authorized(tokens: &[String], headers: &axum::http::HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token))
    else {
        return false;
    };
    tokens.iter().fold(false, |ok, t| {
        ok | constant_time_eq(t.as_bytes(), given.trim().as_bytes())
    })
}

/// The route template the request matched (`None` for an unknown path). Decisions about a
/// route go by this, never by the path's text: a stream may be named like a route's last
/// segment (`events`, `forecast`).
fn route(req: &Request) -> Option<&str> {
    req.extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
}

/// Writes need a token when tokens are configured; reads too with `protect_reads`; `/healthz`
/// never does, nor the page and its files (they hold no data, and a browser cannot send a
/// token when it navigates: the page asks for one and sends it with its API requests).
/// `POST …/forecast` is a read (it carries the future inputs in a body).
pub async fn auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let auth = &app.inner.config.auth;
    let open =
        req.uri().path() == "/healthz" || matches!(route(&req), Some(PAGE_ROUTE | ASSET_ROUTE));
    if auth.tokens.is_empty() || open {
        return next.run(req).await;
    }
    let write = !(matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || (req.method() == Method::POST && route(&req) == Some(FORECAST_ROUTE)));
    if (write || auth.protect_reads) && !authorized(&auth.tokens, req.headers()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Refuses (503) rather than queues requests beyond the configured concurrency, and bounds each
/// request's time (503 with a problem document). Server-Sent Events streams are exempt from
/// the timeout (they are long-lived by design) but count against the concurrency while their
/// response is being set up only.
pub async fn limits(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_permit) = app.inner.requests.clone().try_acquire_owned() else {
        return ApiError::Busy(format!(
            "more than {} requests in flight",
            app.inner.config.limits.concurrent_requests
        ))
        .into_response();
    };
    if req.method() == Method::GET && route(&req) == Some(EVENTS_ROUTE) {
        return next.run(req).await;
    }
    let limit = Duration::from_millis(app.inner.config.limits.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout(limit.as_millis() as u64).into_response(),
    }
}

/// The method as a metrics label: one of the standard methods, else `other`. Clients choose
/// the method (any token is one), and every label value is a series kept for the daemon's life.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Counts requests by route, method and status, and times them. Every label comes from a
/// closed set: the route is the matched template (never the path the client sent), or
/// `unmatched`.
pub async fn track(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
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

/// A panicking handler answers 500 with a problem document; the daemon keeps serving.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    tracing::error!(panic = %what, "a request handler panicked");
    ApiError::Internal("the request handler failed".into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_match_exactly() {
        let tokens = vec!["s3cret".to_owned(), "other".to_owned()];
        let mut h = axum::http::HeaderMap::new();
        assert!(!authorized(&tokens, &h));
        for (value, ok) in [
            ("Bearer s3cret", true),
            ("bearer s3cret", true),
            ("BEARER other", true),
            ("Bearer other", true),
            ("Bearers3cret", false),
            ("Bear s3cret", false),
            ("Bearer s3cre", false),
            ("Bearer s3cret2", false),
            ("Basic s3cret", false),
            ("s3cret", false),
        ] {
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(authorized(&tokens, &h), ok, "{value}");
        }
    }
}
