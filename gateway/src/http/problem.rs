//! RFC 9457 problem details: every error response of the HTTP listener is
//! `application/problem+json` with `type`, `title`, `status` and a precise `detail`.
//!
//! Handlers return [`IngestError`]; [`problem_layer`] also rewrites the plain-text or empty
//! error responses that axum and tower-http produce on their own (404, 405, the 413 of the
//! wire limit, the 415 of the decompression layer), so no client ever sees anything else.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type, e.g. `urn:ferry:problem:malformed-json`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What exactly went wrong with this request.
    pub detail: String,
}

/// Why an ingest request was refused. Each variant maps to one status and one problem type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The body is not valid JSON (or not of the documented shape).
    #[error("{0}")]
    MalformedJson(String),
    /// The SenML pack is invalid; the detail names the record index.
    #[error("{0}")]
    InvalidSenml(String),
    /// The topic is empty, holds a wildcard, or is not UTF-8.
    #[error("{0}")]
    BadTopic(String),
    /// Another field of a record is invalid (timestamp, device id).
    #[error("{0}")]
    BadRecord(String),
    /// The compressed body could not be decompressed.
    #[error("{0}")]
    BadEncoding(String),
    /// The body is larger than `http.max_body_bytes` on the wire.
    #[error("the request body is larger than http.max_body_bytes = {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The decompressed body is larger than `http.max_decompressed_bytes`.
    #[error(
        "the decompressed request body is larger than http.max_decompressed_bytes = {limit} bytes"
    )]
    DecompressedTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The batch holds more readings than `http.max_batch_readings`.
    #[error("the batch holds {count} readings, more than http.max_batch_readings = {limit}")]
    TooManyReadings {
        /// Readings in the request (counted so far).
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The readings are larger than the whole buffer.
    #[error("{0}")]
    LargerThanBuffer(String),
    /// The body was not received within `http.body_timeout_ms`.
    #[error("the request body was not received within http.body_timeout_ms = {ms} ms")]
    BodyTimeout {
        /// The limit.
        ms: u64,
    },
    /// The content type is not one the batch endpoint reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No token, or an unknown one.
    #[error("{0}")]
    Unauthorized(String),
    /// The token is bound to another device.
    #[error("{0}")]
    Forbidden(String),
    /// The buffer refused the readings for now (full in reject mode, disk error, shutting
    /// down); the client should retry after `retry_after_secs`.
    #[error("{detail}")]
    Unavailable {
        /// Problem type slug.
        kind: &'static str,
        /// What happened.
        detail: String,
        /// Seconds for `Retry-After`.
        retry_after_secs: u64,
    },
    /// The body could not be read for another reason (the connection broke).
    #[error("{0}")]
    BodyRead(String),
}

impl IngestError {
    /// The status, the problem type slug and the title.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use IngestError::*;
        match self {
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON"),
            InvalidSenml(_) => (
                StatusCode::BAD_REQUEST,
                "invalid-senml",
                "Invalid SenML pack",
            ),
            BadTopic(_) => (StatusCode::BAD_REQUEST, "bad-topic", "Invalid topic"),
            BadRecord(_) => (StatusCode::BAD_REQUEST, "bad-record", "Invalid reading"),
            BadEncoding(_) => (
                StatusCode::BAD_REQUEST,
                "bad-encoding",
                "Body could not be decompressed",
            ),
            BodyRead(_) => (
                StatusCode::BAD_REQUEST,
                "body-read",
                "Body could not be read",
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            ),
            DecompressedTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "decompressed-too-large",
                "Decompressed body too large",
            ),
            TooManyReadings { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-many-readings",
                "Too many readings in one request",
            ),
            LargerThanBuffer(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "larger-than-buffer",
                "Readings larger than the buffer",
            ),
            BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request body timed out",
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Missing or invalid token",
            ),
            Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Token not allowed for this device",
            ),
            Unavailable { kind, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                kind,
                "Readings not accepted for now",
            ),
        }
    }

    /// A short, stable name for the rejection, used as the stats and metrics label.
    pub fn reason(&self) -> &'static str {
        self.parts().1
    }

    /// The problem object for this error.
    pub fn problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        Problem {
            type_uri: format!("urn:ferry:problem:{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut resp = self.problem().into_response();
        match &self {
            IngestError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ferry\""),
                );
            }
            IngestError::Unavailable {
                retry_after_secs, ..
            } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        resp.extensions_mut().insert(Rejection(self.reason()));
        resp
    }
}

/// Marks a response as a rejection, with its reason, for the stats middleware.
#[derive(Debug, Clone, Copy)]
pub struct Rejection(pub &'static str);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        resp
    }
}

/// Rewrites error responses that are not problem+json already (axum's 404/405 and extractor
/// rejections, tower-http's 413 and 415) into problem+json, keeping their status and headers.
pub async fn problem_layer(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejection bodies from axum and tower-http are short plain text; keep it as detail.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (slug, detail) = match status {
        StatusCode::NOT_FOUND => ("not-found", format!("no route for {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method-not-allowed",
            format!("{method} is not allowed on {path}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "body-too-large",
            "the request body is larger than http.max_body_bytes".to_string(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported-media-type",
            "the Content-Encoding is not supported; use gzip, zstd or identity".to_string(),
        ),
        _ if text.is_empty() => (
            "about-blank",
            status.canonical_reason().unwrap_or("error").to_string(),
        ),
        _ => ("request-rejected", text),
    };
    let problem = Problem {
        type_uri: format!("urn:ferry:problem:{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.extensions.insert(Rejection(match slug {
        "body-too-large" => "body-too-large",
        "unsupported-media-type" => "unsupported-media-type",
        "not-found" => "not-found",
        "method-not-allowed" => "method-not-allowed",
        _ => "other",
    }));
    Response::from_parts(parts, Body::from(body))
}
