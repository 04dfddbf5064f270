//! The Amazon Kinesis Data Streams uplink (`[uplinks.NAME]` with `type = "kinesis"`).
//!
//! ## Flow
//! [`KinesisSink::run`] runs the shared batch engine ([`crate::batch`]) with `PutRecords` as
//! its request: segments of the uplink's buffer consumer come from the buffer task, the
//! readings its `topics` take become records, up to `max_inflight_requests` calls of at most
//! 500 records and 5 MiB each are in flight (and at most `max_inflight_readings` readings),
//! and a segment is acked in the buffer only when every record of it was taken by Kinesis or
//! dead-lettered. A reading leaves the buffer only after Kinesis confirmed it.
//!
//! ## Records
//! - **Data**: with `format = "envelope"` (default), the JSON envelope of [`crate::meta`]
//!   (`ferry_id` = `<gateway id>-<reading id>` for downstream de-duplication, gateway,
//!   device, topic, `received_at_ms`, source, clock mark, content type, the device's
//!   properties, and the payload embedded as JSON when it is JSON, as text or base64 otherwise, which
//!   `payload_encoding` names). With `format = "raw"`, the payload bytes alone: Kinesis records
//!   have no headers, so **every piece of metadata, `ferry_id` included, is lost**, and a
//!   consumer cannot tell a re-sent record from a new one.
//! - **PartitionKey**: by `partition_key` (`device` default, `topic`, `level:N`; as Kafka's
//!   key). Kinesis keeps the order of one partition key's records within its shard; ferry
//!   keeps them in order on the way: the records of one key are in one call at a time (keys
//!   are hashed to `max_inflight_requests` lanes, one call in flight per lane).
//!
//! ## Limits and failures
//! - A record over 1 MiB (data and partition key), or with a partition key over 256
//!   characters, can never be put: it is dead-lettered with the reason.
//! - **Partial failures** (`FailedRecordCount > 0`): only the records Kinesis did not take are
//!   sent again, in their order, after the backoff; `ProvisionedThroughputExceededException`
//!   and other throttles are counted (`throttled_total`, `ferry_uplink_throttled_total`), not
//!   treated as a broken link. A record of a partition key that was throttled can land after
//!   a later record of the same key that went through in the same call: Kinesis gives no way
//!   to put one behind the other without sending one record at a time. Consumers that need
//!   strict order per key sort by `ferry_id` (reading ids grow).
//! - **Whole-call failures** (no answer, HTTP 5xx, throttling of the call, a missing stream,
//!   refused credentials): every record of the call is sent again after the backoff
//!   ([`crate::retry`]); the status page shows AWS's error code and message. Refused or
//!   expired credentials are fetched again ([`credentials`]).
//! - A call Kinesis refuses as invalid (`ValidationException`) is split in halves until the
//!   offending record is alone; that one is dead-lettered, the others go through.
//!
//! ## Auth
//! Requests are signed with Signature Version 4 ([`sigv4`]); credentials come from the chain
//! in [`credentials`]. Secrets never appear in logs, errors or the status page.

mod api;

use crate::Common;
use crate::aws::credentials::{Chain, Configured};
use crate::aws::sigv4::Credentials;
use crate::batch::{self, Window};
use crate::retry::Retry;
use crate::status::UplinkStatus;
use api::{Kinesis, KinesisApi};
use ferry_buffer::ReadError;
use ferry_config::KinesisUplink;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use api::{MAX_KEY_CHARS, MAX_RECORD_BYTES, MAX_RECORDS, MAX_REQUEST_BYTES};

/// The type name of the Kinesis uplink.
pub const KIND: &str = "kinesis";

/// Why the Kinesis uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KinesisSinkError {
    /// No region in the config, the stream's ARN, `AWS_REGION` or `AWS_DEFAULT_REGION`.
    #[error("no region: set region, use the stream's ARN, or set AWS_REGION")]
    NoRegion,
    /// The endpoint is not `http(s)://host[:port]`.
    #[error("invalid endpoint {0:?}")]
    Endpoint(String),
    /// The TLS configuration could not be built (`ca_path`).
    #[error("cannot set up TLS for the Kinesis uplink: {0}")]
    Tls(#[from] crate::tls::TlsSetupError),
    /// The buffer has no consumer of the uplink's name, or could not be read.
    #[error("cannot read the buffer for the Kinesis uplink: {0}")]
    Read(#[from] ReadError),
}

/// The Kinesis uplink. Build it with [`KinesisSink::new`], keep [`KinesisSink::status`], then
/// spawn [`KinesisSink::run`].
#[derive(Debug)]
pub struct KinesisSink {
    api: Arc<Kinesis>,
    window: (usize, u64),
    backoff: (u64, u64),
    common: Common,
    status: UplinkStatus,
}

/// The region: configured, else the ARN's, else the environment's.
fn region(cfg: &KinesisUplink) -> Option<String> {
    cfg.region
        .clone()
        .or_else(|| {
            cfg.stream
                .strip_prefix("arn:")
                .and_then(|a| a.split(':').nth(2))
                .filter(|r| !r.is_empty())
                .map(str::to_string)
        })
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .filter(|r| !r.is_empty())
}

/// The endpoint (no trailing slash) and its `host` header.
fn endpoint(cfg: &KinesisUplink, region: &str) -> Result<(String, String), KinesisSinkError> {
    let url = match &cfg.endpoint {
        Some(e) => e.trim_end_matches('/').to_string(),
        None if region.starts_with("cn-") => {
            format!("https://kinesis.{region}.amazonaws.com.cn")
        }
        None => format!("https://kinesis.{region}.amazonaws.com"),
    };
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .ok_or_else(|| KinesisSinkError::Endpoint(url.clone()))?
        .to_string();
    Ok((url, host))
}

impl KinesisSink {
    /// Checks the buffer has the uplink's consumer and prepares the client; nothing is
    /// contacted before [`KinesisSink::run`].
    pub fn new(cfg: &KinesisUplink, common: Common) -> Result<KinesisSink, KinesisSinkError> {
        drop(common.reader()?);
        let region = region(cfg).ok_or(KinesisSinkError::NoRegion)?;
        let (url, host) = endpoint(cfg, &region)?;
        let keys = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(id), Some(secret)) => Some(Credentials {
                access_key_id: id.clone(),
                secret_access_key: secret.expose().to_string(),
                session_token: cfg.session_token.as_ref().map(|t| t.expose().to_string()),
            }),
            _ => None,
        };
        let secrets = [&cfg.secret_access_key, &cfg.session_token]
            .into_iter()
            .flatten()
            .map(|s| s.expose().to_string())
            .collect();
        let stream_field = if cfg.stream.starts_with("arn:") {
            format!(
                "\"StreamARN\":{}",
                serde_json::Value::from(cfg.stream.as_str())
            )
        } else {
            format!(
                "\"StreamName\":{}",
                serde_json::Value::from(cfg.stream.as_str())
            )
        };
        let api = Kinesis {
            http: crate::http::HttpClient::new(
                cfg.ca_path.as_deref(),
                Duration::from_millis(cfg.request_timeout_ms.max(1)),
            )?,
            creds: Chain::new(Configured {
                keys,
                profile: cfg.profile.clone(),
            })?,
            endpoint: url,
            host,
            region,
            stream_field,
            stream: cfg.stream.clone(),
            key: cfg.partition_key,
            lanes: cfg.max_inflight_requests.max(1) as u64,
            format: cfg.format,
            gateway_id: common.gateway_id.clone(),
        };
        Ok(KinesisSink {
            api: Arc::new(api),
            window: (cfg.max_inflight_requests, cfg.max_inflight_readings as u64),
            backoff: (cfg.initial_backoff_ms, cfg.max_backoff_ms),
            status: common.status(KIND, secrets),
            common,
        })
    }

    /// The status handle (clone it before calling [`KinesisSink::run`]).
    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Forwards until `shutdown` resolves, then sends nothing new, waits up to the grace
    /// period for the calls in flight and acks what Kinesis confirmed. Unconfirmed readings
    /// stay in the buffer.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), KinesisSinkError> {
        let KinesisSink {
            api,
            window,
            backoff,
            common,
            status,
        } = self;
        tracing::info!(uplink = %common.name, endpoint = %api.endpoint, stream = %api.stream,
            "The Kinesis uplink is starting.");
        let window = Window {
            max_requests: window.0.max(1),
            max_readings: window.1.max(1),
            max_bytes: crate::feed::max_in_flight_bytes(&common.buffer),
        };
        batch::run(
            Arc::new(KinesisApi(api)),
            &common,
            &status,
            window,
            Retry::new(backoff.0, backoff.1),
            shutdown,
        )
        .await?;
        tracing::info!(uplink = %common.name, "The Kinesis uplink stopped.");
        Ok(())
    }
}

impl_uplink!(KinesisSink, KIND);
