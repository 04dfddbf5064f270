//! The Google Cloud Pub/Sub uplink (`[uplinks.NAME]` with `type = "pubsub"`): publishes the
//! buffer to one topic with the REST `publish` method
//! (`POST {endpoint}/v1/projects/{project}/topics/{topic}:publish`), over the crate's HTTPS
//! client ([`crate::http`]), on the shared batch run loop ([`crate::batch`]).
//!
//! A reading leaves the buffer only after Pub/Sub returned a message id for it (an answer
//! holds one id per message, all or nothing), or it was dead-lettered with a reason.
//! Delivery is at least once: a request whose answer was lost is sent again, so subscribers
//! de-duplicate on the `ferry-id` attribute.
//!
//! ## Message layout
//! - `data`: the payload exactly as received (base64 in the JSON request, as the API wants).
//! - `attributes`: the fields of [`crate::meta`] (the device's own MQTT v5 user properties,
//!   then ferry's `ferry-*` fields), and `content-type` when the device gave one. A key given twice keeps its last value, so
//!   ferry's own fields win over a device property of the same name.
//! - `orderingKey`: with `ordering_key` other than `none`, the device id, the source topic or
//!   one level of it (the same rule as the Kafka message key,
//!   [`crate::meta::key_for`]); an empty key is sent as none.
//!
//! ## Limits, and what happens at them
//! A request holds at most 1,000 messages and 10 MB (ferry counts its JSON body, base64
//! included). A reading that can never be published is dead-lettered when it is read, with
//! the reason: more than 100 attributes, an attribute key over 256 bytes, empty or starting
//! with `goog` (reserved), a value over 1,024 bytes, an ordering key over 1,024 bytes, or a
//! message over 10 MB (payload, attributes and key), or whose JSON (payload in base64) does
//! not fit in one request: a payload over about 7.4 MB.
//!
//! ## Order
//! Messages of one ordering key go in one request at a time, in order, retries included (the
//! batch run loop's lanes), and one request holds the messages of one key only, as the API
//! requires. Pub/Sub delivers them in order to subscriptions with message ordering on. The
//! official client libraries pause a key after a failed publish until the application resumes
//! it; ferry needs no such step: nothing of a key is sent after a failed request of that key
//! until that request succeeded. Without a key, requests go out in parallel in any order.
//!
//! ## Errors
//! Every message is one line naming the cause, e.g. `Pub/Sub topic projects/p/topics/t not
//! found (404 NOT_FOUND)`, and shows as `last_error` on the status page.
//!
//! | answer | what ferry does |
//! |---|---|
//! | 200 with one message id per message | delivered |
//! | 429, `RESOURCE_EXHAUSTED` | the request is retried after the backoff, counted as a throttle |
//! | 5xx, `UNAVAILABLE`, `DEADLINE_EXCEEDED`, other codes, a transport error, no answer within `request_timeout_ms` | retried after the backoff |
//! | 404 `NOT_FOUND` (the topic does not exist: e.g. a restarted emulator) | retried with a growing backoff; ferry goes on once the topic exists |
//! | 401, 403 `PERMISSION_DENIED` / `UNAUTHENTICATED` | retried with a growing backoff until the operator fixes the credentials or the IAM role |
//! | 400 `INVALID_ARGUMENT` for one message | the message is dead-lettered with Pub/Sub's reason |
//! | 400 `INVALID_ARGUMENT` for several messages | the answer does not say which message is refused: ferry sends the request again in halves, within the same request future, recursively, until the refused messages stand alone; those are dead-lettered, the others delivered. A half that fails otherwise is retried with everything after it, so order is kept |
//!
//! The project and topic ids are checked at start-up, so a 400 caused by the topic name does
//! not dead-letter readings.
//!
//! ## Authentication
//! In this order ([`auth`]): an `http://` endpoint (the emulator) uses none; a service account
//! key (`credentials_file`, else `GOOGLE_APPLICATION_CREDENTIALS`) signs a self-signed JWT
//! access token, reused until 5 minutes before it expires; else the GCE metadata server's
//! token (`GCE_METADATA_HOST` overrides its host). The key is never logged, shown, or kept as
//! text.
//!
//! ## Stats
//! The same as every uplink's, through [`crate::status::UplinkStatus`] under the uplink's
//! name (`ferry_uplink_acked_total{uplink="NAME"}`, …), emitted per batch by the run loop.
//!
//! ## Not done
//! gRPC (REST/JSON only); schemas and message transforms of the topic; publishing to more than
//! one topic per uplink (use several uplinks with `topics`); compression of the request body;
//! user (non-service-account) credentials files and workload identity federation files.

pub mod api;
pub mod auth;

#[cfg(test)]
mod tests;

use crate::Common;
use crate::batch::{self, Window};
use crate::http::HttpClient;
use crate::retry::Retry;
use crate::status::UplinkStatus;
use api::PubsubApi;
use auth::{Auth, CredentialsError};
use ferry_buffer::ReadError;
use ferry_config::PubsubUplink;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The type name of the Pub/Sub uplink.
pub const KIND: &str = "pubsub";

/// The endpoint unless `endpoint` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// Why the Pub/Sub uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PubsubSinkError {
    /// A setting is not usable (project, topic, endpoint).
    #[error("{0}")]
    Config(String),
    /// The credentials could not be loaded.
    #[error("cannot load the Pub/Sub credentials: {0}")]
    Credentials(#[from] CredentialsError),
    /// The CA file could not be loaded.
    #[error("cannot set up TLS for the Pub/Sub uplink: {0}")]
    Tls(#[from] crate::tls::TlsSetupError),
    /// The buffer has no consumer of the uplink's name, or could not be read.
    #[error("cannot read the buffer for the Pub/Sub uplink: {0}")]
    Read(#[from] ReadError),
}

/// The endpoint without its trailing `/`. The settings are checked by the config's rules
/// ([`ferry_config::check_pubsub_project`] and its neighbours) again here, since a sink can be
/// built from a config that was not validated.
fn endpoint(cfg: &PubsubUplink) -> Result<String, String> {
    let not_empty = |what: &str, v: &str| {
        if v.is_empty() {
            Err(format!("{what} is required"))
        } else {
            Ok(())
        }
    };
    not_empty("project", &cfg.project)?;
    ferry_config::check_pubsub_project(&cfg.project)
        .map_err(|e| format!("project {:?}: {e}", cfg.project))?;
    not_empty("topic", &cfg.topic)?;
    ferry_config::check_pubsub_topic(&cfg.topic)
        .map_err(|e| format!("topic {:?}: {e}", cfg.topic))?;
    let e = cfg.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
    ferry_config::check_endpoint(e).map_err(|err| format!("endpoint: {err}"))?;
    Ok(e.trim_end_matches('/').to_owned())
}

/// The Pub/Sub uplink.
#[derive(Debug)]
pub struct PubsubSink {
    api: Arc<PubsubApi>,
    window: Window,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    credentials: String,
    common: Common,
    status: UplinkStatus,
}

impl PubsubSink {
    /// Builds the uplink: checks the settings, loads the credentials and the CA file. Nothing
    /// is contacted until [`PubsubSink::run`].
    pub fn new(cfg: &PubsubUplink, common: Common) -> Result<PubsubSink, PubsubSinkError> {
        // Fails early when the buffer was opened without the consumer.
        drop(common.reader()?);
        let endpoint = endpoint(cfg).map_err(PubsubSinkError::Config)?;
        let http = HttpClient::new(
            cfg.ca_path.as_deref(),
            Duration::from_millis(cfg.request_timeout_ms.max(1)),
        )?;
        let auth = Auth::from_config(&endpoint, cfg.credentials_file.as_deref())?;
        let credentials = auth.describe();
        // The email of a service account is not a secret, and no token is ever recorded.
        let status = common.status(KIND, Vec::new());
        let api = PubsubApi::new(
            http,
            auth,
            &endpoint,
            &cfg.project,
            &cfg.topic,
            cfg.ordering_key,
            common.gateway_id.clone(),
        );
        let window = Window {
            max_requests: cfg.max_inflight_requests.max(1),
            max_readings: cfg.max_inflight_readings.max(1) as u64,
            max_bytes: crate::feed::max_in_flight_bytes(&common.buffer),
        };
        Ok(PubsubSink {
            api: Arc::new(api),
            window,
            initial_backoff_ms: cfg.initial_backoff_ms,
            max_backoff_ms: cfg.max_backoff_ms,
            credentials,
            common,
            status,
        })
    }

    /// The status handle (clone it before calling [`PubsubSink::run`]).
    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Forwards until `shutdown` resolves, then stops reading, waits up to the grace period for
    /// the requests in flight, acks what was confirmed, and returns. Unconfirmed readings stay
    /// in the buffer. Returns early, with an error, only if the buffer cannot be read at all.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), PubsubSinkError> {
        tracing::info!(uplink = %self.common.name, topic = %self.api.topic(),
            credentials = %self.credentials, max_inflight_requests = self.window.max_requests,
            max_inflight_readings = self.window.max_readings,
            "The Pub/Sub uplink starts publishing.");
        let retry = Retry::new(self.initial_backoff_ms, self.max_backoff_ms);
        batch::run(
            self.api,
            &self.common,
            &self.status,
            self.window,
            retry,
            shutdown,
        )
        .await?;
        Ok(())
    }
}

impl_uplink!(PubsubSink, KIND);
