//! The ingest handlers: authenticate, read the (decompressed) body within its limit, parse,
//! commit with **one** `Buffer::append`, and answer `202` only once that append returned Ok,
//! i.e. after the fsync of the group commit holding the readings.

use super::HttpState;
use super::formats::{self, BatchFormat, BatchItem, Origin};
use super::problem::{IngestError, Problem};
use super::senml;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use ferry_buffer::{AppendError, Reading, Source, now_ms};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;

/// The header naming the device when the token does not.
pub const DEVICE_HEADER: &str = "x-ferry-device";

/// The answer to an accepted request: the readings are on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// Number of readings committed.
    pub accepted: usize,
    /// Id of the first of them (`null` for an empty batch).
    pub first_id: Option<u64>,
    /// Id of the last of them (`null` for an empty batch).
    pub last_id: Option<u64>,
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        (StatusCode::ACCEPTED, Json(self)).into_response()
    }
}

fn origin(st: &HttpState, headers: &HeaderMap) -> Result<Origin, IngestError> {
    let principal = st.tokens.authenticate(headers)?;
    let header_device = match headers.get(DEVICE_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    IngestError::BadRecord("the X-Ferry-Device header is not visible ASCII".into())
                })?
                .to_string(),
        ),
    };
    // Checked even when every record names its own device, so that an invalid header is
    // always refused (as the OpenAPI document says), not only when it is used.
    if let Some(d) = &header_device {
        formats::validate_device(d)?;
    }
    Ok(Origin {
        principal,
        header_device,
        now_ms: now_ms(),
    })
}

/// Whether `e` or anything in its `source()` chain (looking inside `io::Error`s too) is a `T`.
fn is_caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && is_caused_by::<T>(inner)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify_body_error(st: &HttpState, e: axum::Error) -> IngestError {
    let http = &st.config.http;
    if is_caused_by::<http_body_util::LengthLimitError>(&e) {
        IngestError::BodyTooLarge {
            limit: http.max_body_bytes,
        }
    } else if is_caused_by::<tower_http::timeout::TimeoutError>(&e) {
        IngestError::BodyTimeout {
            ms: http.body_timeout_ms,
        }
    } else if is_caused_by::<hyper::Error>(&e) {
        IngestError::BodyRead(format!("the request body could not be read: {e}"))
    } else if is_caused_by::<std::io::Error>(&e) {
        // The decompressors report corrupt input as io::Error (InvalidData / InvalidInput).
        IngestError::BadEncoding(format!("the request body could not be decompressed: {e}"))
    } else {
        IngestError::BadEncoding(format!("the request body could not be read: {e}"))
    }
}

/// Reads the whole (decompressed) body, refusing more than `http.max_decompressed_bytes`,
/// within `http.body_timeout_ms` in total (tower-http's `RequestBodyTimeoutLayer` only bounds
/// the gap between two chunks). The wire limit is enforced by `RequestBodyLimitLayer` below
/// the decompression layer.
async fn read_body(st: &HttpState, body: Body) -> Result<Bytes, IngestError> {
    let ms = st.config.http.body_timeout_ms;
    tokio::time::timeout(Duration::from_millis(ms), read_body_inner(st, body))
        .await
        .unwrap_or(Err(IngestError::BodyTimeout { ms }))
}

async fn read_body_inner(st: &HttpState, body: Body) -> Result<Bytes, IngestError> {
    let limit = st.config.http.max_decompressed_bytes;
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify_body_error(st, e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > limit {
            return Err(IngestError::DecompressedTooLarge { limit });
        }
        // Most bodies arrive in one frame: keep it without copying.
        match (&mut first, &mut buf) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let mut b = BytesMut::with_capacity(f.len() + data.len());
                b.extend_from_slice(f);
                b.extend_from_slice(&data);
                first = None;
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, buf) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// Commits the readings in one append and counts them.
async fn commit(st: &HttpState, readings: Vec<Reading>) -> Result<Accepted, IngestError> {
    let n = readings.len();
    if n == 0 {
        return Ok(Accepted {
            accepted: 0,
            first_id: None,
            last_id: None,
        });
    }
    let retry_after_secs = st.config.http.retry_after_secs;
    let devices = crate::status::DeviceBatch::of(&readings);
    match st.buffer.append(readings).await {
        Ok(receipt) => {
            metrics::counter!("ferry_readings_received_total", "source" => "http")
                .increment(n as u64);
            st.stats.accepted(n);
            st.devices.record(&devices);
            Ok(Accepted {
                accepted: receipt.count,
                first_id: Some(receipt.first_id),
                last_id: Some(receipt.last_id),
            })
        }
        Err(e) => Err(match e {
            AppendError::Full { .. } => {
                tracing::debug!(readings = n, error = %e, "An HTTP request was refused because the buffer is full.");
                IngestError::Unavailable {
                    kind: "buffer-full",
                    detail: format!("{e}; retry after {retry_after_secs} s"),
                    retry_after_secs,
                }
            }
            AppendError::Storage { .. } => {
                tracing::warn!(readings = n, error = %e, "An HTTP request was refused because the buffer cannot write to disk.");
                IngestError::Unavailable {
                    kind: "buffer-storage",
                    detail: format!("{e}; retry after {retry_after_secs} s"),
                    retry_after_secs,
                }
            }
            AppendError::TooLarge { .. } => IngestError::LargerThanBuffer(e.to_string()),
            AppendError::Closed { .. } => IngestError::Unavailable {
                kind: "shutting-down",
                detail: format!("the gateway is shutting down; retry after {retry_after_secs} s"),
                retry_after_secs,
            },
            other => IngestError::Unavailable {
                kind: "unavailable",
                detail: other.to_string(),
                retry_after_secs,
            },
        }),
    }
}

/// Submits one reading; the body is the payload.
#[utoipa::path(
    post,
    path = "/v1/readings/{topic}",
    tag = "ingest",
    params(
        ("topic" = String, Path, min_length = 1, pattern = "^[^+#\\u0000]+$",
            description = "The reading's topic: one or more path segments, percent-decoded; not empty, no `+`, `#` or NUL. Bounded by the request line: hyper answers 414 past 65534 bytes."),
        ("X-Ferry-Device" = Option<String>, Header, nullable = false, min_length = 1, max_length = 256, pattern = "^[ -~]*[!-~][ -~]*$",
            description = "The device id when the token is not bound to one: 1 to 256 visible ASCII characters. Default: `http`."),
    ),
    request_body(content = Option<serde_json::Value>, content_type = "*/*", description = "The payload: any bytes, stored as sent (after `Content-Encoding: gzip|zstd` is undone), with its Content-Type. May be empty."),
    responses(
        (status = 202, description = "The reading is on disk.", body = Accepted),
        (status = 400, description = "Invalid topic or device, or a corrupt compressed body.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown bearer token.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token is bound to another device.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds http.max_body_bytes or http.max_decompressed_bytes.", body = Problem, content_type = "application/problem+json"),
        (status = 414, description = "The request URI (and so the topic) is longer than 65534 bytes; answered by hyper, without a body."),
        (status = 415, description = "Unsupported Content-Encoding.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The buffer is full (reject mode) or cannot write; see Retry-After.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest_single(
    State(st): State<HttpState>,
    topic: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Accepted, IngestError> {
    let origin = origin(&st, req.headers())?;
    let Path(topic) = topic.map_err(|e| {
        IngestError::BadTopic(format!(
            "the topic in the path is invalid: {}",
            e.body_text()
        ))
    })?;
    ferry_config::topic::check_name(&topic).map_err(IngestError::BadTopic)?;
    let device = origin.device(None)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let payload = read_body(&st, req.into_body()).await?;
    let mut reading = Reading::new(Source::Http, device, topic, payload);
    reading.received_at_ms = origin.now_ms;
    reading.content_type = content_type;
    commit(&st, vec![reading]).await
}

/// `POST /v1/readings/` (no topic).
pub async fn ingest_empty_topic(
    State(st): State<HttpState>,
    req: Request,
) -> Result<Accepted, IngestError> {
    origin(&st, req.headers())?;
    Err(IngestError::BadTopic(
        "the topic is empty: post to /v1/readings/<topic>".into(),
    ))
}

/// Submits a batch: all of its readings are committed together, or none.
#[utoipa::path(
    post,
    path = "/v1/readings",
    tag = "ingest",
    params(
        ("X-Ferry-Device" = Option<String>, Header, nullable = false, min_length = 1, max_length = 256, pattern = "^[ -~]*[!-~][ -~]*$",
            description = "The default device id for records that do not name one: 1 to 256 visible ASCII characters. Checked even when every record names its own. Default: `http`."),
    ),
    request_body(
        description = "A JSON array of readings, NDJSON of the same objects, or a SenML pack (RFC 8428; one reading per resolved record, topic = resolved name). May be sent with `Content-Encoding: gzip` or `zstd`.",
        content(
            (Vec<BatchItem> = "application/json"),
            (BatchItem = "application/x-ndjson"),
            // Replaced by the SenmlRecord schema in `http::openapi_document` (utoipa cannot
            // express its anyOf / not / propertyNames).
            (Vec<Object> = "application/senml+json"),
        )
    ),
    responses(
        (status = 202, description = "Every reading of the batch is on disk.", body = Accepted),
        (status = 400, description = "Malformed JSON (with line and column), invalid SenML (with the record index), invalid topic, timestamp or device.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown bearer token.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token is bound to another device.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds http.max_body_bytes or http.max_decompressed_bytes, or the batch holds more than http.max_batch_readings readings.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type or Content-Encoding.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The buffer is full (reject mode) or cannot write; see Retry-After.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest_batch(
    State(st): State<HttpState>,
    req: Request,
) -> Result<Accepted, IngestError> {
    let origin = origin(&st, req.headers())?;
    let format = BatchFormat::from_content_type(
        req.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    let body = read_body(&st, req.into_body()).await?;
    let max = st.config.http.max_batch_readings;
    let readings = match format {
        BatchFormat::JsonArray => formats::parse_json_array(&body, &origin, max)?,
        BatchFormat::Ndjson => formats::parse_ndjson(&body, &origin, max)?,
        BatchFormat::Senml => senml::parse_senml(&body, &origin, max)?,
    };
    commit(&st, readings).await
}
