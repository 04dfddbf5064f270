//! # ferry-uplink: carrying the buffer upstream
//!
//! Each uplink is a buffer consumer ([`ferry_buffer::Buffer::reader`]) named after its
//! `[uplinks.NAME]` table, with its own cursor. It reads committed segments oldest first, sends
//! the readings its `topics` take, and acks a segment only when the upstream has confirmed
//! every reading it sent of it (or the reading was dead-lettered). The buffer, not the upstream
//! client's queue, is the storage: anything unconfirmed is sent again from the buffer after a
//! failure or a restart, so delivery is at least once and readings carry a stable id
//! (`ferry-id` = `<gateway id>-<reading id>`) for upstream de-duplication.
//!
//! ## One trait, shared parts
//! Every uplink type implements [`Uplink`] and is built by [`from_config`], the only place
//! that names the types. What they share is written once:
//! - [`feed`]: the buffer task that reads ahead and commits acks and dead letters in order,
//!   off the uplink's event loop;
//! - [`settle`]: the settlement window (ordered acks, dead letters, skips);
//! - [`retry`]: backoff, failure count, `offline`, and the rule that resets them;
//! - [`meta`]: the `ferry-*` metadata fields and the JSON envelope;
//! - [`topics`]: the `topics` filters (a reading an uplink does not take counts as delivered
//!   for it, `skipped`);
//! - [`status`]: the [`status::UplinkStatus`] handle the status page reads;
//! - [`tls`] and [`http`]: rustls on ring for every uplink, and the HTTPS client of the
//!   uplinks that speak HTTP;
//! - [`downlink`]: commands from the cloud (MQTT and Kafka uplinks), handed to the local
//!   broker and acknowledged upstream only after that.
//!
//! ## Types
//! - [`kafka`]: Kafka ([`kafka::KafkaSink`]).
//! - [`mqtt`]: an upstream MQTT broker ([`mqtt::MqttSink`]).
//! - [`kinesis`]: Amazon Kinesis Data Streams ([`kinesis::KinesisSink`]), on [`batch`].
//! - [`pubsub`]: Google Cloud Pub/Sub ([`pubsub::PubsubSink`]), on [`batch`].
//!
//! ## Adding a type
//! A folder `src/<type>/` with its sink (a struct built from its config struct and a
//! [`Common`], implementing [`Uplink`] on top of [`feed`], [`settle`] and [`retry`]), its config
//! struct in `ferry-config` (a variant of `UplinkKind`), and one line in [`from_config`].

/// Implements [`Uplink`] for a sink type that has the fields `common: Common` and
/// `status: UplinkStatus` and an inherent `async fn run(self, shutdown)`.
macro_rules! impl_uplink {
    ($sink:ty, $kind:expr) => {
        impl $crate::Uplink for $sink {
            fn name(&self) -> &str {
                &self.common.name
            }

            fn kind(&self) -> &'static str {
                $kind
            }

            fn status(&self) -> $crate::status::UplinkStatus {
                self.status.clone()
            }

            fn run(self: Box<Self>, shutdown: $crate::Shutdown) -> $crate::RunFuture {
                Box::pin(async move { <$sink>::run(*self, shutdown).await.map_err(Into::into) })
            }
        }
    };
}

pub mod aws;
pub mod backoff;
pub mod batch;
pub mod downlink;
pub(crate) mod feed;
pub mod fold;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod kinesis;
pub mod meta;
pub mod mqtt;
pub mod pubsub;
pub mod retry;
pub(crate) mod settle;
pub mod status;
pub mod tls;
pub mod topics;

pub use backoff::Backoff;
pub use status::{DownlinkSnapshot, LinkState, UplinkSnapshot, UplinkStatus};

use ferry_buffer::{Buffer, ReadError, Reader};
use ferry_config::{Config, UplinkKind};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use topics::TopicFilter;

/// The shutdown future an uplink's [`Uplink::run`] is handed.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Why an uplink could not be built or could not run: the type's own error, boxed so that its
/// `source()` chain is kept.
pub type UplinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future of [`Uplink::run`].
pub type RunFuture = Pin<Box<dyn Future<Output = Result<(), UplinkError>> + Send + 'static>>;

/// How long an uplink waits for what is in flight once shutdown starts, unless
/// [`Common::grace`] says otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One uplink, of any type.
pub trait Uplink: Send + std::fmt::Debug {
    /// The name of its `[uplinks.NAME]` table, also its buffer consumer name.
    fn name(&self) -> &str;
    /// Its type, e.g. `"kafka"`.
    fn kind(&self) -> &'static str;
    /// The status handle the status page reads (a clone; take it before `run`).
    fn status(&self) -> status::UplinkStatus;
    /// Forwards until `shutdown` resolves, then sends nothing new, waits up to its grace period
    /// for what is in flight, commits the acks of what was confirmed, and returns. What is not
    /// confirmed stays in the buffer. Returns early, with an error, only if the buffer cannot
    /// be read at all.
    fn run(self: Box<Self>, shutdown: Shutdown) -> RunFuture;
}

/// What every uplink gets besides its own config.
#[derive(Debug, Clone)]
pub struct Common {
    /// The uplink's name (its buffer consumer name).
    pub name: String,
    /// `gateway.id`, part of every `ferry-id`.
    pub gateway_id: Arc<str>,
    /// The readings it takes.
    pub topics: TopicFilter,
    /// The buffer.
    pub buffer: Buffer,
    /// How long `run` waits for in-flight deliveries at shutdown.
    pub grace: Duration,
    /// Where commands from the cloud go, for an uplink with a `downlink` ([`downlink`]).
    pub local: Option<Arc<dyn downlink::Local>>,
}

impl Common {
    /// An uplink named `name` that takes every reading, with the default grace period.
    pub fn new(name: &str, gateway_id: &str, buffer: Buffer) -> Self {
        Common {
            name: name.to_owned(),
            gateway_id: gateway_id.into(),
            topics: TopicFilter::all(),
            buffer,
            grace: DEFAULT_SHUTDOWN_GRACE,
            local: None,
        }
    }

    /// The same, handing commands to `local`.
    pub fn local(mut self, local: Option<Arc<dyn downlink::Local>>) -> Self {
        self.local = local;
        self
    }

    /// The downlink of an uplink that has one configured, with `status` showing its counters.
    /// Fails when commands would have nowhere to go (no MQTT listener).
    pub fn downlink(
        &self,
        configured: bool,
        status: &status::UplinkStatus,
    ) -> Result<Option<downlink::Downlink>, NoLocal> {
        match (configured, &self.local) {
            (false, _) => Ok(None),
            (true, Some(l)) => Ok(Some(downlink::Downlink::new(l.clone(), status.clone()))),
            (true, None) => Err(NoLocal),
        }
    }

    /// The same, with `topics`.
    pub fn topics(mut self, topics: TopicFilter) -> Self {
        self.topics = topics;
        self
    }

    /// The same, with `grace`.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// A reader of the uplink's cursor; fails if the buffer was opened without it.
    pub fn reader(&self) -> Result<Reader, ReadError> {
        self.buffer.reader(&self.name)
    }

    /// A fresh status handle for this uplink of type `kind`.
    pub fn status(&self, kind: &'static str, secrets: Vec<String>) -> status::UplinkStatus {
        status::UplinkStatus::new(self.name.clone(), kind, secrets).with_buffer(self.buffer.clone())
    }
}

/// An uplink with a `downlink` built without a local broker to hand commands to.
#[derive(Debug, thiserror::Error)]
#[error("a downlink needs the local MQTT broker (mqtt.enabled = true)")]
pub struct NoLocal;

/// An uplink that could not be built.
#[derive(Debug, thiserror::Error)]
#[error("uplinks.{name} (type {kind}): {source}")]
pub struct BuildError {
    /// The uplink's name.
    pub name: String,
    /// Its type.
    pub kind: &'static str,
    /// What went wrong.
    #[source]
    pub source: UplinkError,
}

/// The buffer consumers of `config`: the names of its enabled uplinks.
pub fn consumers(config: &Config) -> Vec<String> {
    config
        .enabled_uplinks()
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Builds every enabled uplink of `config` on `buffer` (opened with [`consumers`]), in name
/// order; those with a `downlink` hand commands to `local`. Nothing is contacted yet: that
/// happens in [`Uplink::run`]. Uplinks get 60 % of `gateway.shutdown_grace_ms` to flush at
/// shutdown: listeners drain before them and the buffer closes after them.
pub fn from_config(
    config: &Config,
    buffer: &Buffer,
    local: Option<Arc<dyn downlink::Local>>,
) -> Result<Vec<Box<dyn Uplink>>, BuildError> {
    let grace = Duration::from_millis(config.gateway.shutdown_grace_ms * 6 / 10);
    let mut out = Vec::new();
    for (name, settings) in config.enabled_uplinks() {
        let common = Common::new(name, &config.gateway.id, buffer.clone())
            .topics(TopicFilter::new(&settings.topics))
            .grace(grace)
            .local(local.clone());
        let kind = settings.kind.type_name();
        let built = match &settings.kind {
            #[cfg(feature = "kafka")]
            UplinkKind::Kafka(c) => boxed(kafka::KafkaSink::new(c, common)),
            #[cfg(not(feature = "kafka"))]
            UplinkKind::Kafka(_) => Err(UplinkError::from(
                "this build of ferry has no Kafka uplink (built without the `kafka` feature)",
            )),
            UplinkKind::Mqtt(c) => boxed(mqtt::MqttSink::new(
                c,
                &config.mqtt_client_id(name, c),
                common,
            )),
            UplinkKind::Kinesis(c) => boxed(kinesis::KinesisSink::new(c, common)),
            UplinkKind::Pubsub(c) => boxed(pubsub::PubsubSink::new(c, common)),
        };
        out.push(built.map_err(|source| BuildError {
            name: name.to_owned(),
            kind,
            source,
        })?);
    }
    Ok(out)
}

/// What each uplink of `config` will use, for `ferry check-config --explain`: its table with
/// every default filled in, then for Kafka uplinks what the `cloud` preset derived and the
/// librdkafka properties the producer gets. Secrets are shown as `***`. Call it on a
/// validated config.
pub fn explain(config: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if config.uplinks.is_empty() {
        out.push_str("No uplink is configured: ferry only buffers readings.\n");
    }
    for (name, settings) in &config.uplinks {
        if !settings.enabled {
            let _ = writeln!(out, "# enabled = false: not started");
        }
        let mut shown = settings.clone();
        let mut kafka_notes = String::new();
        if let UplinkKind::Kafka(k) = &mut shown.kind {
            match k.connection() {
                Err(problems) => {
                    for p in problems {
                        let _ = writeln!(kafka_notes, "# invalid: {} {}", p.key, p.message);
                    }
                }
                Ok(conn) => {
                    if let Some(cloud) = k.cloud {
                        let _ = writeln!(kafka_notes, "# derived by cloud = {:?}:", cloud.as_str());
                        for note in &conn.notes {
                            let _ = writeln!(kafka_notes, "#   {note}");
                        }
                    }
                    #[cfg(feature = "kafka")]
                    {
                        let cc = kafka::config::client_config(
                            k,
                            &conn,
                            &format!("ferry-{}", config.gateway.id),
                        );
                        let _ = writeln!(kafka_notes, "# librdkafka properties of the producer:");
                        for (key, value) in kafka::config::explain(&cc) {
                            let _ = writeln!(kafka_notes, "#   {key} = {value}");
                        }
                    }
                    // Show the effective values, not the defaults a preset replaced.
                    k.brokers = conn.brokers;
                    k.topic = conn.topic;
                    k.compression = conn.compression;
                    k.security_protocol = conn.security_protocol;
                    k.idempotent = Some(conn.idempotent);
                }
            }
        }
        out.push_str(&ferry_config::redacted_toml(name, &shown));
        if let UplinkKind::Mqtt(m) = &settings.kind {
            let _ = writeln!(out, "# client_id = {:?}", config.mqtt_client_id(name, m));
        }
        out.push_str(&kafka_notes);
        out.push('\n');
    }
    out
}

fn boxed<U, E>(built: Result<U, E>) -> Result<Box<dyn Uplink>, UplinkError>
where
    U: Uplink + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    built
        .map(|u| Box::new(u) as Box<dyn Uplink>)
        .map_err(UplinkError::from)
}

#[cfg(test)]
mod test_util;
