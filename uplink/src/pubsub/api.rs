//! The Pub/Sub REST `publish` method as a [`BatchApi`]: how a reading becomes a message, the
//! request limits, one request and what its answer means.

use super::auth::Auth;
use crate::batch::{BatchApi, RecordOutcome, RequestError, SendFuture};
use crate::http::{HttpClient, Method, Request, StatusCode, header};
use crate::meta::for_each_field;
use crate::meta::key_for;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use ferry_buffer::Reading;
use ferry_config::KeyRule;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;

/// Most messages in one publish request.
pub const MAX_MESSAGES_PER_REQUEST: usize = 1000;
/// Most bytes in one publish request (ferry counts its JSON body).
pub const MAX_REQUEST_BYTES: usize = 10_000_000;
/// Most bytes of one message: data, attribute keys and values, ordering key.
pub const MAX_MESSAGE_BYTES: usize = 10_000_000;
/// Most attributes of one message.
pub const MAX_ATTRIBUTES: usize = 100;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
/// Longest ordering key, in bytes.
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;
/// The JSON around the messages of a request: `{"messages":[` … `]}`.
const BODY_OVERHEAD: usize = 16;
/// The longest part of an upstream error message quoted on the status page.
const MAX_QUOTED: usize = 300;

/// One message, serialized once as its JSON object (`{"data":…,"attributes":{…},
/// "orderingKey":…}`), so that a retry sends the same bytes.
#[derive(Debug)]
pub struct Message {
    json: Bytes,
    lane: Option<u64>,
}

impl Message {
    /// The JSON object of the message.
    pub fn json(&self) -> &[u8] {
        &self.json
    }
}

/// The publish method of one topic.
#[derive(Debug)]
pub struct PubsubApi {
    inner: Arc<Inner>,
    gateway_id: Arc<str>,
    ordering_key: KeyRule,
}

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    auth: Auth,
    /// `{endpoint}/v1/projects/{project}/topics/{topic}:publish`.
    url: String,
    /// `projects/{project}/topics/{topic}`, for messages.
    topic: String,
    endpoint: String,
}

/// Why one publish request failed.
enum Failure {
    /// 400 INVALID_ARGUMENT: something in the request is refused; which message is not said.
    Invalid(String),
    /// Anything else: the request as a whole is to be retried.
    Request(RequestError),
}

impl PubsubApi {
    /// The publish method of `projects/{project}/topics/{topic}` at `endpoint` (no trailing
    /// `/`), for the gateway `gateway_id`.
    pub fn new(
        http: HttpClient,
        auth: Auth,
        endpoint: &str,
        project: &str,
        topic: &str,
        ordering_key: KeyRule,
        gateway_id: Arc<str>,
    ) -> PubsubApi {
        let name = format!("projects/{project}/topics/{topic}");
        PubsubApi {
            inner: Arc::new(Inner {
                http,
                auth,
                url: format!("{endpoint}/v1/{name}:publish"),
                topic: name,
                endpoint: endpoint.to_owned(),
            }),
            gateway_id,
            ordering_key,
        }
    }

    /// The topic's full name, `projects/{project}/topics/{topic}`.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // Writing a str to a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// `s` cut to at most `max` bytes on a char boundary, for messages.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl BatchApi for PubsubApi {
    type Record = Message;

    fn limits(&self) -> (usize, usize) {
        (MAX_MESSAGES_PER_REQUEST, MAX_REQUEST_BYTES - BODY_OVERHEAD)
    }

    fn encode(&self, r: &Reading) -> Result<Message, String> {
        // The attributes: the metadata fields, then the content type. A key given twice keeps
        // its last value, so ferry's own fields win over a device property of the same name.
        let mut attrs: Vec<(String, String)> = Vec::with_capacity(r.properties.len() + 6);
        let mut put = |k: &str, v: &str| match attrs.iter_mut().find(|(a, _)| a == k) {
            Some(slot) => v.clone_into(&mut slot.1),
            None => attrs.push((k.to_owned(), v.to_owned())),
        };
        for_each_field(&self.gateway_id, r, &mut String::new(), &mut put);
        if let Some(ct) = &r.content_type {
            put("content-type", ct);
        }
        if attrs.len() > MAX_ATTRIBUTES {
            return Err(format!(
                "the reading has {} attributes ({} MQTT v5 properties and ferry's fields), more than Pub/Sub's limit of {MAX_ATTRIBUTES}",
                attrs.len(),
                r.properties.len()
            ));
        }
        let mut size = r.payload.len();
        for (k, v) in &attrs {
            if k.is_empty() {
                return Err(
                    "the reading has an attribute with an empty key, which Pub/Sub refuses".into(),
                );
            }
            if k.len() > MAX_ATTRIBUTE_KEY_BYTES {
                return Err(format!(
                    "the attribute key {:?}… is {} bytes, more than Pub/Sub's limit of {MAX_ATTRIBUTE_KEY_BYTES}",
                    clip(k, 40),
                    k.len()
                ));
            }
            if k.starts_with("goog") {
                return Err(format!(
                    "the attribute key {:?} starts with \"goog\", which Pub/Sub reserves",
                    clip(k, 40)
                ));
            }
            if v.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(format!(
                    "the value of the attribute {:?} is {} bytes, more than Pub/Sub's limit of {MAX_ATTRIBUTE_VALUE_BYTES}",
                    clip(k, 40),
                    v.len()
                ));
            }
            size += k.len() + v.len();
        }
        let key = key_for(self.ordering_key, r).filter(|k| !k.is_empty());
        if let Some(k) = key {
            if k.len() > MAX_ORDERING_KEY_BYTES {
                return Err(format!(
                    "the ordering key ({} rule) is {} bytes, more than Pub/Sub's limit of {MAX_ORDERING_KEY_BYTES}",
                    self.ordering_key,
                    k.len()
                ));
            }
            size += k.len();
        }
        if size > MAX_MESSAGE_BYTES {
            return Err(format!(
                "the message is {size} bytes (payload and attributes), more than Pub/Sub's limit of {MAX_MESSAGE_BYTES}"
            ));
        }

        let mut json = String::with_capacity(r.payload.len() * 4 / 3 + 64 * attrs.len() + 64);
        json.push_str("{\"data\":\"");
        STANDARD.encode_string(&r.payload, &mut json);
        json.push_str("\",\"attributes\":{");
        for (i, (k, v)) in attrs.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            push_json_str(&mut json, k);
            json.push(':');
            push_json_str(&mut json, v);
        }
        json.push('}');
        if let Some(k) = key {
            json.push_str(",\"orderingKey\":");
            push_json_str(&mut json, k);
        }
        json.push('}');
        if json.len() + BODY_OVERHEAD > MAX_REQUEST_BYTES {
            return Err(format!(
                "the message is {} bytes as JSON (the payload in base64), more than a Pub/Sub publish request may hold ({MAX_REQUEST_BYTES})",
                json.len()
            ));
        }
        let lane = key.map(|k| {
            let mut h = std::hash::DefaultHasher::new();
            k.hash(&mut h);
            h.finish()
        });
        Ok(Message {
            json: Bytes::from(json),
            lane,
        })
    }

    fn size(&self, record: &Message) -> usize {
        // The comma between messages.
        record.json.len() + 1
    }

    fn lane(&self, record: &Message) -> Option<u64> {
        record.lane
    }

    fn send(&self, records: Vec<Arc<Message>>) -> SendFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(&records).await })
    }
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Inner {
    /// One request; a 400 for several messages is bisected (see the module doc).
    async fn send(&self, records: &[Arc<Message>]) -> Result<Vec<RecordOutcome>, RequestError> {
        match self.publish(records).await {
            Ok(()) => Ok(vec![RecordOutcome::Delivered; records.len()]),
            Err(Failure::Invalid(reason)) if records.len() == 1 => {
                Ok(vec![RecordOutcome::Refused(reason)])
            }
            Err(Failure::Invalid(reason)) => {
                tracing::info!(topic = %self.topic, messages = records.len(), error = %reason,
                    "Pub/Sub refused a publish request of several messages; they are sent again in halves to find the refused one.");
                Ok(self.bisect(records).await)
            }
            Err(Failure::Request(e)) => Err(e),
        }
    }

    /// Sends each half of `records` in turn (bisecting further on a 400); a half that fails as
    /// a whole, and every record after it, is answered `Retry`, so order is kept.
    fn bisect<'a>(&'a self, records: &'a [Arc<Message>]) -> BoxFut<'a, Vec<RecordOutcome>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(records.len());
            let mut failed: Option<RecordOutcome> = None;
            let (a, b) = records.split_at(records.len() / 2);
            for half in [a, b] {
                if let Some(f) = &failed {
                    out.extend(std::iter::repeat_n(f.clone(), half.len()));
                    continue;
                }
                match self.publish(half).await {
                    Ok(()) => out.extend(std::iter::repeat_n(RecordOutcome::Delivered, half.len())),
                    Err(Failure::Invalid(reason)) if half.len() == 1 => {
                        out.push(RecordOutcome::Refused(reason));
                    }
                    Err(Failure::Invalid(_)) => out.extend(self.bisect(half).await),
                    Err(Failure::Request(e)) => {
                        let f = RecordOutcome::Retry {
                            reason: e.message,
                            throttled: e.throttled,
                        };
                        out.extend(std::iter::repeat_n(f.clone(), half.len()));
                        failed = Some(f);
                    }
                }
                if failed.is_none()
                    && let Some(f @ RecordOutcome::Retry { .. }) = out.last()
                {
                    failed = Some(f.clone());
                }
            }
            out
        })
    }

    /// One publish request of `records`.
    async fn publish(&self, records: &[Arc<Message>]) -> Result<(), Failure> {
        let request_error = |message: String, throttled: bool| {
            Failure::Request(RequestError { message, throttled })
        };
        let auth = self
            .auth
            .header(&self.http)
            .await
            .map_err(|e| request_error(e, false))?;
        let mut body = Vec::with_capacity(
            BODY_OVERHEAD + records.iter().map(|m| m.json.len() + 1).sum::<usize>(),
        );
        body.extend_from_slice(b"{\"messages\":[");
        for (i, m) in records.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&m.json);
        }
        body.extend_from_slice(b"]}");
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("ferry/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(value) = auth {
            req = req.header(header::AUTHORIZATION, &*value);
        }
        let req = req
            .body(Bytes::from(body))
            .map_err(|e| request_error(format!("cannot build the publish request: {e}"), false))?;
        let resp = self.http.send(req).await.map_err(|e| {
            request_error(
                format!("cannot reach Pub/Sub at {}: {e}", self.endpoint),
                false,
            )
        })?;
        if resp.status == StatusCode::OK {
            #[derive(serde::Deserialize)]
            struct Answer {
                #[serde(rename = "messageIds", default)]
                message_ids: Vec<serde::de::IgnoredAny>,
            }
            let ids = serde_json::from_slice::<Answer>(&resp.body)
                .map(|a| a.message_ids.len())
                .unwrap_or(0);
            if ids != records.len() {
                return Err(request_error(
                    format!(
                        "Pub/Sub answered {ids} message ids for {} messages published to {}",
                        records.len(),
                        self.topic
                    ),
                    false,
                ));
            }
            return Ok(());
        }
        Err(self.classify(resp.status, &resp.body))
    }

    /// What a non-200 answer means.
    fn classify(&self, status: StatusCode, body: &[u8]) -> Failure {
        #[derive(serde::Deserialize)]
        struct Envelope {
            error: ApiError,
        }
        #[derive(serde::Deserialize)]
        struct ApiError {
            #[serde(default)]
            message: String,
            #[serde(default)]
            status: String,
        }
        let (code, text) = match serde_json::from_slice::<Envelope>(body) {
            Ok(e) => (e.error.status, e.error.message),
            Err(_) => (
                status.canonical_reason().unwrap_or("").to_uppercase(),
                String::from_utf8_lossy(body).into_owned(),
            ),
        };
        let text = clip(text.trim(), MAX_QUOTED).replace(['\n', '\r'], " ");
        let what = if text.is_empty() {
            format!("{} {code}", status.as_u16())
        } else {
            format!("{} {code}: {text}", status.as_u16())
        };
        let topic = &self.topic;
        match (status.as_u16(), code.as_str()) {
            (400, "INVALID_ARGUMENT") | (400, "") => {
                Failure::Invalid(format!("Pub/Sub refused the message ({what})"))
            }
            (404, _) | (_, "NOT_FOUND") => Failure::Request(RequestError {
                message: format!(
                    "Pub/Sub topic {topic} not found ({} NOT_FOUND)",
                    status.as_u16()
                ),
                throttled: false,
            }),
            (401 | 403, _) | (_, "PERMISSION_DENIED" | "UNAUTHENTICATED") => {
                Failure::Request(RequestError {
                    message: format!(
                        "Pub/Sub refused publishing to {topic} with {} ({what})",
                        self.auth.describe()
                    ),
                    throttled: false,
                })
            }
            (429, _) | (_, "RESOURCE_EXHAUSTED") => Failure::Request(RequestError {
                message: format!("Pub/Sub throttled publishing to {topic} ({what})"),
                throttled: true,
            }),
            _ => Failure::Request(RequestError {
                message: format!("publishing to Pub/Sub topic {topic} failed ({what})"),
                throttled: false,
            }),
        }
    }
}
