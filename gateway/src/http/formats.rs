//! The batch formats of `POST /v1/readings` other than SenML: a JSON array of [`BatchItem`]s
//! and NDJSON of the same objects. Also the topic, device and timestamp rules shared by every
//! endpoint.

use super::problem::IngestError;
use ferry_buffer::{ClockMark, Reading, Source};
use ferry_config::topic;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Media type of a JSON array batch.
pub const JSON: &str = "application/json";
/// Media type of an NDJSON batch.
pub const NDJSON: &str = "application/x-ndjson";
/// Media type of a SenML pack (RFC 8428).
pub const SENML_JSON: &str = "application/senml+json";

/// The batch formats `POST /v1/readings` reads, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// `application/json`: an array of [`BatchItem`].
    JsonArray,
    /// `application/x-ndjson`: one [`BatchItem`] per line.
    Ndjson,
    /// `application/senml+json`: one SenML pack.
    Senml,
}

impl BatchFormat {
    /// The format for a `Content-Type` header value (parameters such as `charset` ignored).
    pub fn from_content_type(ct: Option<&str>) -> Result<BatchFormat, IngestError> {
        let Some(ct) = ct else {
            return Err(IngestError::UnsupportedMediaType(format!(
                "a batch needs a Content-Type: {JSON}, {NDJSON} or {SENML_JSON}"
            )));
        };
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case(JSON) {
            Ok(BatchFormat::JsonArray)
        } else if mime.eq_ignore_ascii_case(NDJSON)
            || mime.eq_ignore_ascii_case("application/jsonl")
        {
            Ok(BatchFormat::Ndjson)
        } else if mime.eq_ignore_ascii_case(SENML_JSON) {
            Ok(BatchFormat::Senml)
        } else {
            Err(IngestError::UnsupportedMediaType(format!(
                "Content-Type '{ct}' is not a batch format; use {JSON}, {NDJSON} or {SENML_JSON}"
            )))
        }
    }
}

/// One reading in a JSON array or NDJSON batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// The topic, with the same rules as an MQTT topic name (no `+` or `#`, not empty).
    #[schema(min_length = 1, max_length = 65535, pattern = "^[^+#\\u0000]+$")]
    pub topic: String,
    /// The payload: any JSON value. It is stored as its JSON text with content type
    /// `application/json`.
    pub payload: serde_json::Value,
    /// When the reading was taken: an RFC 3339 string, or milliseconds since the Unix epoch.
    /// Not set: the time ferry received it. (Schema: see `http::openapi_document`.)
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub ts: Option<serde_json::Value>,
    /// The device id: 1 to 256 bytes, no control characters. Not set: the token's device, else
    /// the `X-Ferry-Device` header, else `http`.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    pub device: Option<String>,
}

/// What every reading of one request shares: who sent it and when it arrived.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The token's binding, if any.
    pub principal: super::auth::Principal,
    /// The `X-Ferry-Device` header, if any.
    pub header_device: Option<String>,
    /// When the request arrived, in ms since the epoch.
    pub now_ms: u64,
}

impl Origin {
    /// The device for a reading that names `asked` itself (or not).
    pub fn device(&self, asked: Option<&str>) -> Result<String, IngestError> {
        let asked = asked.or(self.header_device.as_deref());
        if let Some(d) = asked {
            validate_device(d)?;
        }
        Ok(self
            .principal
            .device_for(asked)?
            .unwrap_or_else(|| "http".to_string()))
    }
}

/// Checks a device id: 1 to 256 bytes, no control characters.
pub fn validate_device(device: &str) -> Result<(), IngestError> {
    if device.is_empty() || device.len() > 256 || device.chars().any(char::is_control) {
        return Err(IngestError::BadRecord(format!(
            "the device id {device:?} is invalid: it must be 1 to 256 bytes without control characters"
        )));
    }
    Ok(())
}

/// Parses a `ts` value: RFC 3339 text, or epoch milliseconds.
pub fn parse_ts(ts: &serde_json::Value) -> Result<u64, String> {
    match ts {
        // A whole number written as a float (`1700000000000.0`) is a JSON integer too.
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| format!("ts {n} is not a whole, non-negative number of milliseconds")),
        serde_json::Value::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("ts '{s}' is not an RFC 3339 timestamp: {e}"))?;
            let ms = t.unix_timestamp_nanos() / 1_000_000;
            u64::try_from(ms).map_err(|_| format!("ts '{s}' is before 1970"))
        }
        other => Err(format!(
            "ts must be an RFC 3339 string or epoch milliseconds, got {other}"
        )),
    }
}

fn item_to_reading(item: BatchItem, origin: &Origin, at: &str) -> Result<Reading, IngestError> {
    topic::check_name(&item.topic).map_err(|e| IngestError::BadTopic(format!("{at}: {e}")))?;
    let device = origin.device(item.device.as_deref()).map_err(|e| match e {
        IngestError::BadRecord(d) => IngestError::BadRecord(format!("{at}: {d}")),
        IngestError::Forbidden(d) => IngestError::Forbidden(format!("{at}: {d}")),
        other => other,
    })?;
    let (received_at_ms, mark) = match &item.ts {
        None | Some(serde_json::Value::Null) => (origin.now_ms, ClockMark::Unknown),
        Some(ts) => (
            parse_ts(ts).map_err(|e| IngestError::BadRecord(format!("{at}: {e}")))?,
            ClockMark::Device,
        ),
    };
    let payload = serde_json::to_vec(&item.payload).unwrap_or_default();
    let mut r = Reading::new(Source::Http, device, item.topic, payload).with_content_type(JSON);
    r.received_at_ms = received_at_ms;
    // A device's own timestamp: the buffer stamps the rest (ferry_buffer::clock).
    r.clock.mark = mark;
    Ok(r)
}

/// Strips serde_json's " at line L column C" suffix, which we report in our own words.
pub(crate) fn serde_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map(str::to_string).unwrap_or(s)
}

/// Parses a JSON array batch.
pub fn parse_json_array(
    body: &[u8],
    origin: &Origin,
    max: usize,
) -> Result<Vec<Reading>, IngestError> {
    let items: Vec<BatchItem> = serde_json::from_slice(body).map_err(|e| {
        IngestError::MalformedJson(format!(
            "the JSON batch is invalid at line {}, column {}: {}",
            e.line(),
            e.column(),
            serde_message(&e)
        ))
    })?;
    if items.len() > max {
        return Err(IngestError::TooManyReadings {
            count: items.len(),
            limit: max,
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| item_to_reading(item, origin, &format!("record {i}")))
        .collect()
}

/// Parses an NDJSON batch; blank lines are skipped.
pub fn parse_ndjson(body: &[u8], origin: &Origin, max: usize) -> Result<Vec<Reading>, IngestError> {
    let mut out = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == max {
            return Err(IngestError::TooManyReadings {
                count: max + 1,
                limit: max,
            });
        }
        let item: BatchItem = serde_json::from_slice(line).map_err(|e| {
            IngestError::MalformedJson(format!(
                "NDJSON line {}, column {}: {}",
                i + 1,
                e.column(),
                serde_message(&e)
            ))
        })?;
        out.push(item_to_reading(
            item,
            origin,
            &format!("NDJSON line {}", i + 1),
        )?);
    }
    Ok(out)
}
