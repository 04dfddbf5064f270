//! `PutRecords`: how a reading becomes a Kinesis record, and one signed request.

use crate::aws::credentials::Chain;
use crate::aws::sigv4::{self, Scope, Signable};
use crate::batch::{BatchApi, RecordOutcome, RequestError, SendFuture};
use crate::http::{HttpClient, Method, Request};
use crate::meta::key_for;
use base64::Engine as _;
use bytes::Bytes;
use ferry_buffer::Reading;
use ferry_config::{KeyRule, RecordFormat};
use std::sync::Arc;

/// Most records in one `PutRecords` call.
pub const MAX_RECORDS: usize = 500;
/// Most bytes (data plus partition keys) in one call.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// Most bytes of one record (data plus partition key).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Longest partition key, in Unicode characters.
pub const MAX_KEY_CHARS: usize = 256;

/// One record: its JSON object in the request body, and the bytes it counts.
#[derive(Debug)]
pub struct Record {
    json: String,
    size: usize,
    lane: u64,
}

/// The Kinesis API of one uplink.
pub struct Kinesis {
    pub(crate) http: HttpClient,
    pub(crate) creds: Chain,
    /// `https://kinesis.REGION.amazonaws.com` or the configured endpoint.
    pub(crate) endpoint: String,
    /// The `host` header (host and port of the endpoint).
    pub(crate) host: String,
    pub(crate) region: String,
    /// `"StreamName":"…"` or `"StreamARN":"…"`, ready for the body.
    pub(crate) stream_field: String,
    /// The stream, for messages.
    pub(crate) stream: String,
    pub(crate) key: KeyRule,
    /// Lanes of partition keys: the records of one key share a lane, so one call at a time
    /// carries them and they reach the shard in order (with `max_inflight_requests` lanes, as
    /// many calls as that can be in flight for different keys).
    pub(crate) lanes: u64,
    pub(crate) format: RecordFormat,
    pub(crate) gateway_id: Arc<str>,
}

impl std::fmt::Debug for Kinesis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kinesis")
            .field("endpoint", &self.endpoint)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// `{"__type": "…#Code", "message": "…"}` of an error answer.
#[derive(serde::Deserialize, Default)]
struct ErrorAnswer {
    #[serde(rename = "__type", default)]
    kind: String,
    #[serde(alias = "Message", default)]
    message: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRecordsAnswer {
    records: Vec<RecordAnswer>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RecordAnswer {
    error_code: Option<String>,
    error_message: Option<String>,
}

/// FNV-1a: a stable, cheap hash of a partition key to its lane.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Error codes that mean "over the rate": throttles, not failures of the link.
fn is_throttle(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "LimitExceededException"
            | "RequestLimitExceeded"
            | "SlowDown"
    )
}

/// Error codes that mean the credentials were refused: fetch them again.
fn is_credentials(code: &str) -> bool {
    matches!(
        code,
        "ExpiredTokenException"
            | "ExpiredToken"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "InvalidClientTokenId"
    )
}

impl Kinesis {
    fn body(&self, records: &[Arc<Record>]) -> Vec<u8> {
        let mut body = String::with_capacity(
            32 + self.stream_field.len() + records.iter().map(|r| r.json.len() + 1).sum::<usize>(),
        );
        body.push('{');
        body.push_str(&self.stream_field);
        body.push_str(",\"Records\":[");
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&r.json);
        }
        body.push_str("]}");
        body.into_bytes()
    }

    /// One signed call, answered per record.
    async fn put(&self, records: &[Arc<Record>]) -> Result<Vec<RecordOutcome>, Fail> {
        let creds = self.creds.get().await.map_err(|e| {
            Fail::Request(RequestError {
                message: e.to_string(),
                throttled: false,
            })
        })?;
        let body = self.body(records);
        let amz_date = sigv4::amz_date(ferry_buffer::now_ms() / 1000);
        let target = "Kinesis_20131202.PutRecords";
        let content_type = "application/x-amz-json-1.1";
        let mut headers = vec![
            ("content-type", content_type),
            ("host", self.host.as_str()),
            ("x-amz-date", amz_date.as_str()),
            ("x-amz-target", target),
        ];
        if let Some(t) = &creds.session_token {
            headers.push(("x-amz-security-token", t.as_str()));
        }
        let auth = sigv4::authorization(
            &Signable {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                body: &body,
            },
            Scope {
                amz_date: &amz_date,
                region: &self.region,
                service: "kinesis",
            },
            &creds,
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/", self.endpoint));
        for (k, v) in &headers {
            if *k != "host" {
                req = req.header(*k, *v);
            }
        }
        let req = req
            .header("authorization", auth)
            .body(Bytes::from(body))
            .map_err(|e| {
                Fail::Request(RequestError {
                    message: e.to_string(),
                    throttled: false,
                })
            })?;
        let resp = self.http.send(req).await.map_err(|e| {
            Fail::Request(RequestError {
                message: format!("Kinesis at {} did not answer: {e}", self.endpoint),
                throttled: false,
            })
        })?;
        let status = resp.status.as_u16();
        if resp.status.is_success() {
            let answer: PutRecordsAnswer = serde_json::from_slice(&resp.body).map_err(|e| {
                Fail::Request(RequestError {
                    message: format!("Kinesis answered PutRecords with unexpected JSON: {e}"),
                    throttled: false,
                })
            })?;
            return Ok(answer
                .records
                .into_iter()
                .map(|r| match r.error_code {
                    None => RecordOutcome::Delivered,
                    Some(code) => RecordOutcome::Retry {
                        throttled: is_throttle(&code),
                        reason: format!(
                            "Kinesis did not take a record: {code}: {}",
                            r.error_message.unwrap_or_default()
                        ),
                    },
                })
                .collect());
        }
        let err: ErrorAnswer = serde_json::from_slice(&resp.body).unwrap_or_default();
        let code = err.kind.rsplit('#').next().unwrap_or_default().to_string();
        let detail = if err.message.is_empty() {
            String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]).into_owned()
        } else {
            err.message
        };
        if is_credentials(&code) {
            self.creds.invalidate();
        }
        let message = match code.as_str() {
            "ResourceNotFoundException" => format!(
                "Kinesis stream {} not found in {} (HTTP {status} {code}): {detail}",
                self.stream, self.region
            ),
            "" => format!("Kinesis answered HTTP {status}: {detail}"),
            _ => format!("Kinesis refused PutRecords (HTTP {status} {code}): {detail}"),
        };
        if code == "ValidationException" || code == "SerializationException" {
            return Err(Fail::Invalid(message));
        }
        Err(Fail::Request(RequestError {
            throttled: is_throttle(&code),
            message,
        }))
    }
}

/// How a call failed.
enum Fail {
    /// The whole request failed; retry it.
    Request(RequestError),
    /// The request is invalid: one of its records may be; split it to find which.
    Invalid(String),
}

/// Sends `records`; an invalid request is split in halves until the record Kinesis refuses is
/// alone, and that one is refused for good (dead-lettered) while the others go through.
fn put_split(api: Arc<Kinesis>, records: Vec<Arc<Record>>) -> SendFuture {
    Box::pin(async move {
        match api.put(&records).await {
            Ok(outcomes) => Ok(outcomes),
            Err(Fail::Request(e)) => Err(e),
            Err(Fail::Invalid(reason)) if records.len() == 1 => {
                Ok(vec![RecordOutcome::Refused(reason)])
            }
            Err(Fail::Invalid(_)) => {
                let right = records[records.len() / 2..].to_vec();
                let left = records[..records.len() / 2].to_vec();
                let mut out = put_split(api.clone(), left).await?;
                out.extend(put_split(api, right).await?);
                Ok(out)
            }
        }
    })
}

/// The `BatchApi` of a Kinesis uplink (an `Arc` so requests can outlive a borrow).
#[derive(Debug)]
pub struct KinesisApi(pub Arc<Kinesis>);

impl BatchApi for KinesisApi {
    type Record = Record;

    fn limits(&self) -> (usize, usize) {
        (MAX_RECORDS, MAX_REQUEST_BYTES)
    }

    fn encode(&self, r: &Reading) -> Result<Record, String> {
        let k = &self.0;
        let key = key_for(k.key, r).unwrap_or(&r.device);
        let key = if key.is_empty() { "-" } else { key };
        if key.chars().count() > MAX_KEY_CHARS {
            return Err(format!(
                "the partition key ({} characters) is longer than Kinesis allows ({MAX_KEY_CHARS})",
                key.chars().count()
            ));
        }
        let data = match k.format {
            RecordFormat::Raw => r.payload.to_vec(),
            RecordFormat::Envelope => crate::meta::envelope(&k.gateway_id, r),
        };
        let size = data.len() + key.len();
        if size > MAX_RECORD_BYTES {
            return Err(format!(
                "the record ({size} bytes with its partition key) is larger than Kinesis allows ({MAX_RECORD_BYTES} bytes)"
            ));
        }
        let json = format!(
            "{{\"Data\":\"{}\",\"PartitionKey\":{}}}",
            base64::engine::general_purpose::STANDARD.encode(&data),
            serde_json::to_string(key).unwrap_or_else(|_| "\"-\"".into())
        );
        Ok(Record {
            json,
            size,
            lane: fnv1a(key.as_bytes()) % k.lanes.max(1),
        })
    }

    fn size(&self, record: &Record) -> usize {
        record.size
    }

    fn lane(&self, record: &Record) -> Option<u64> {
        Some(record.lane)
    }

    fn send(&self, records: Vec<Arc<Record>>) -> SendFuture {
        put_split(self.0.clone(), records)
    }
}
