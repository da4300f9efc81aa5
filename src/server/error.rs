//! The one application error type and its RFC 9457 problem document.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::body::{BodyError, DecodeError};
use crate::engine::BatchError;
use crate::engine::OptionsError;

/// `application/problem+json` body.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Problem {
    /// A URI reference naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The 1-based line of an NDJSON or CSV body at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// The 0-based index of the observation at fault in a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadName(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no stream named `{0}`")]
    NoSuchStream(String),
    #[error("stream `{0}` exists with different options")]
    OptionsConflict(String),
    #[error(transparent)]
    BadOptions(#[from] OptionsError),
    #[error("malformed options: {}", .0.detail)]
    MalformedOptions(DecodeError),
    #[error("{}", .0.detail)]
    Decode(DecodeError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// An observation refused where a body names it by line (NDJSON, CSV).
    #[error("line {1}: {0}")]
    BatchAt(BatchError, u64),
    /// A query parameter or forecast request field (`field`) is wrong.
    #[error("{detail}")]
    BadQuery { field: String, detail: String },
    #[error("unsupported content type `{got}`: use {accepted}")]
    UnsupportedMediaType { got: String, accepted: &'static str },
    #[error("{0}")]
    TooLarge(String),
    /// Over a configured limit; `field` is the request's knob to turn, when there is one.
    #[error("{detail}")]
    Limit {
        field: Option<&'static str>,
        detail: String,
    },
    #[error("stream `{0}` is busy: its queue is full, retry shortly")]
    QueueFull(String),
    #[error("{0}")]
    NotReady(String),
    #[error("stream `{0}` failed and no longer accepts work: {1}")]
    StreamFailed(String, String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the server is busy: {0}; retry shortly")]
    Busy(String),
    #[error("the request took longer than {0} ms")]
    Timeout(u64),
    /// A file operation failed; the detail says which and what is unchanged.
    #[error("{0}")]
    Storage(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Internal(String),
    /// Cluster mode: the stream's owner or JetStream cannot be reached right now.
    #[error("{0}")]
    Cluster(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            BadName(_) => (StatusCode::BAD_REQUEST, "bad-name", "Invalid stream name"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            NoSuchStream(_) => (StatusCode::NOT_FOUND, "no-such-stream", "Unknown stream"),
            OptionsConflict(_) => (
                StatusCode::CONFLICT,
                "options-conflict",
                "Stream exists with other options",
            ),
            BadOptions(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad-options",
                "Invalid stream options",
            ),
            MalformedOptions(_) => (
                StatusCode::BAD_REQUEST,
                "malformed-options",
                "Malformed stream options",
            ),
            Decode(_) => (
                StatusCode::BAD_REQUEST,
                "malformed-body",
                "Malformed request body",
            ),
            Batch(BatchError::SeqGap { .. }) | BatchAt(BatchError::SeqGap { .. }, _) => {
                (StatusCode::CONFLICT, "seq-gap", "Sequence gap")
            }
            Batch(_) | BatchAt(..) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-observation",
                "Invalid observation",
            ),
            BadQuery { .. } => (StatusCode::BAD_REQUEST, "bad-query", "Invalid query"),
            UnsupportedMediaType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported content type",
            ),
            TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Request too large",
            ),
            Limit { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "limit", "Limit exceeded"),
            QueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue-full", "Stream busy"),
            NotReady(_) => (
                StatusCode::CONFLICT,
                "not-ready",
                "Not enough observations yet",
            ),
            StreamFailed(..) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "stream-failed",
                "Stream failed",
            ),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy", "Server busy"),
            Timeout(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request timed out",
            ),
            Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                "Storage unavailable",
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Shutting down",
            ),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
            Cluster(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster-unavailable",
                "Cluster unavailable",
            ),
        }
    }

    pub fn problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        let (field, line, index) = match self {
            ApiError::BadName(_) => (Some("name".to_owned()), None, None),
            ApiError::BadOptions(e) => (Some(e.field.to_owned()), None, None),
            ApiError::MalformedOptions(d) => (d.field.clone(), None, None),
            ApiError::Decode(d) => (d.field.clone(), d.line, None),
            ApiError::Batch(b) => (Some(b.field().to_owned()), None, b.index()),
            ApiError::BatchAt(b, line) => (Some(b.field().to_owned()), Some(*line), b.index()),
            ApiError::BadQuery { field, .. } => (Some(field.clone()), None, None),
            ApiError::Limit {
                field: Some(field), ..
            } => (Some((*field).to_owned()), None, None),
            _ => (None, None, None),
        };
        Problem {
            kind: format!("/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            field,
            line,
            index,
        }
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        ApiError::Decode(e)
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Malformed(d) => ApiError::Decode(d),
            BodyError::Invalid { error, line: None } => ApiError::Batch(error),
            BodyError::Invalid {
                error,
                line: Some(line),
            } => ApiError::BatchAt(error, line),
            e @ BodyError::TooMany { .. } => ApiError::TooLarge(e.to_string()),
            BodyError::Inputs { field, detail } => ApiError::BadQuery { field, detail },
        }
    }
}

/// Writes a problem document with the right content type.
pub fn problem_response(p: &Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(p).unwrap_or_default();
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = problem_response(&self.problem());
        if matches!(self, ApiError::Busy(_) | ApiError::TooLarge(_)) {
            // Refused before its body was read (or all of it): the connection is not reused,
            // or the client's next request would follow the rest of this body.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        match self {
            ApiError::QueueFull(_)
            | ApiError::ShuttingDown
            | ApiError::Storage(_)
            | ApiError::Busy(_)
            | ApiError::Cluster(_)
            | ApiError::Timeout(_) => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        r
    }
}
