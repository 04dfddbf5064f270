//! The Kafka downlink (`[uplinks.NAME.downlink]`): commands for local devices, read from a
//! Kafka topic. The rules every downlink keeps (hand-over before the ack, no echo, refusals)
//! are in [`crate::downlink`]; this module says how a record becomes a command.
//!
//! - **Consumer group** `group_id`, by default `ferry-<gateway.id>`: one group per gateway, so
//!   every gateway reads every record. The member is static (`group.instance.id`
//!   `ferry-<gateway.id>-<NAME>-downlink`), so a gateway that restarts, even after a crash,
//!   gets its partitions back at once (a broker without static membership assigns them
//!   after the old member's 10 s session timeout). A gateway's first start (no committed offset) begins
//!   at the end of the topic: commands sent before it ever ran are not replayed.
//! - **Offsets**: a record's offset is stored only after its command was handed over (or
//!   refused for good, or is for another gateway); the consumer commits the stored offsets
//!   every second and once more at shutdown. A crash replays at most the records handed over
//!   in the last second (at least once).
//! - **Headers**: `ferry-gateway` (the gateway the command is for; absent: every gateway; a
//!   record for another gateway is skipped before its payload is copied), `ferry-topic` (the
//!   local MQTT topic; absent: refused), `ferry-retain` (`true` or `1`: kept as the topic's
//!   retained message), `content-type` (the MQTT 5 content type). Other headers become MQTT 5
//!   user properties, and `ferry-command-id` = `<topic>/<partition>/<offset>` is added: the
//!   same id when a command is delivered again, for devices to de-duplicate.
//! - **Order**: one record at a time; a hand-over that fails for a reason that may pass (disk
//!   error) is tried again, with backoff, before the next record.
//! - Commands are published locally at `qos` (default 1).

use super::config::connection_config;
use super::sink::oauth_token;
use crate::Common;
use crate::aws::msk::TokenSource;
use crate::backoff::Backoff;
use crate::downlink::{Command, Downlink, HandOverError, Properties, Refusal};
use crate::fold::{Fold, Say};
use crate::status::UplinkStatus;
use bytes::Bytes;
use ferry_config::kafka_cloud::KafkaConnection;
use ferry_config::{KafkaDownlink, KafkaUplink};
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedMessage};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The header naming the gateway a command is for.
pub const GATEWAY_HEADER: &str = "ferry-gateway";
/// The header naming a command's local MQTT topic.
pub const TOPIC_HEADER: &str = "ferry-topic";
/// The header asking for a retained local publish.
pub const RETAIN_HEADER: &str = "ferry-retain";
/// The user property ferry adds: where the command was read.
pub const ID_PROPERTY: &str = "ferry-command-id";

/// The consumer's librdkafka events: logs and errors (folded), the token for MSK IAM, and
/// the assignment (the downlink is ready while partitions are assigned).
pub(crate) struct CommandContext {
    status: UplinkStatus,
    oauth: Option<Arc<TokenSource>>,
    logs: Fold,
}

impl ClientContext for CommandContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _oauthbearer_config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(self.oauth.as_deref())
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) > (RDKafkaLogLevel::Warning as i32) {
            tracing::debug!(facility = fac, message = %log_message, "librdkafka (downlink consumer).");
            return;
        }
        let msg = self.status.scrub(log_message);
        match self.logs.note(&msg, Instant::now()) {
            Say::New => tracing::warn!(uplink = %self.status.name(), facility = fac,
                message = %msg, "The downlink's Kafka consumer reported a problem."),
            Say::Again(n) => tracing::warn!(uplink = %self.status.name(), facility = fac,
                message = %msg, repeats = n, "The downlink's Kafka consumer keeps reporting the same problem."),
            Say::Quiet => {}
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log(
            RDKafkaLogLevel::Error,
            "ERROR",
            &format!("{error}: {reason}"),
        );
    }
}

impl ConsumerContext for CommandContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(parts) => self.status.set_downlink_ready(
                parts.count() > 0,
                &format!("the consumer group assigned {} partitions", parts.count()),
            ),
            Rebalance::Revoke(_) => self
                .status
                .set_downlink_ready(false, "the consumer group revoked the partitions"),
            Rebalance::Error(e) => self
                .status
                .set_downlink_ready(false, &format!("the consumer group failed: {e}")),
        }
    }
}

/// What a record is.
#[derive(Debug, PartialEq)]
enum Record {
    /// For another gateway: skipped.
    Other,
    /// Refused for good.
    Refused(Refusal, String),
    /// A command for this gateway.
    Command(Command),
}

/// The downlink's consumer and what it hands commands to.
pub(crate) struct Commands {
    consumer: StreamConsumer<CommandContext>,
    downlink: Downlink,
    gateway_id: Arc<str>,
    qos: u8,
    status: UplinkStatus,
    grace: Duration,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("gateway_id", &self.gateway_id)
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// The consumer of `d.topic`, subscribed (nothing is fetched before [`Commands::run`]).
    pub(crate) fn new(
        cfg: &KafkaUplink,
        d: &KafkaDownlink,
        conn: &KafkaConnection,
        oauth: Option<Arc<TokenSource>>,
        downlink: Downlink,
        common: &Common,
        status: &UplinkStatus,
    ) -> Result<Commands, KafkaError> {
        let group = d
            .group_id
            .clone()
            .unwrap_or_else(|| format!("ferry-{}", common.gateway_id));
        let member = format!("ferry-{}-{}-downlink", common.gateway_id, common.name);
        let mut c = connection_config(cfg, conn, &member);
        // Static membership: a restarted (or crashed) gateway takes its partitions back at
        // once instead of waiting for its old member's session to time out.
        c.set("group.id", &group)
            .set("group.instance.id", &member)
            // A broker without static membership (or a changed member id) waits this long for
            // the old member before it assigns the partitions again.
            .set("session.timeout.ms", "10000")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "false");
        let ctx = CommandContext {
            status: status.clone(),
            oauth,
            logs: Fold::default(),
        };
        let consumer: StreamConsumer<CommandContext> = c.create_with_context(ctx)?;
        consumer.subscribe(&[d.topic.as_str()])?;
        tracing::info!(uplink = %common.name, topic = %d.topic, group = %group,
            "The Kafka uplink reads commands for local devices.");
        Ok(Commands {
            consumer,
            downlink,
            gateway_id: common.gateway_id.clone(),
            qos: d.qos.unwrap_or(1).min(2),
            status: status.clone(),
            grace: common.grace,
        })
    }

    /// What `m` is for this gateway.
    fn record(&self, m: &OwnedMessage) -> Record {
        let mut topic = None;
        let mut retain = false;
        let mut content_type = None;
        let mut user_properties = Vec::new();
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                let value = || String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                match h.key {
                    GATEWAY_HEADER => {
                        if h.value != Some(self.gateway_id.as_bytes()) {
                            return Record::Other;
                        }
                    }
                    TOPIC_HEADER => topic = Some(value()),
                    RETAIN_HEADER => retain = matches!(value().as_str(), "true" | "1"),
                    "content-type" => content_type = Some(value()),
                    key => user_properties.push((key.to_owned(), value())),
                }
            }
        }
        let id = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
        let Some(topic) = topic else {
            return Record::Refused(
                Refusal::NoTopic,
                format!("the record {id} has no {TOPIC_HEADER} header naming its local MQTT topic"),
            );
        };
        user_properties.push((ID_PROPERTY.to_owned(), id));
        Record::Command(Command {
            topic,
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            qos: self.qos,
            retain,
            props: Properties {
                content_type,
                user_properties,
                ..Properties::default()
            },
        })
    }

    /// Reads and hands over commands until `shutdown` resolves, then commits the stored
    /// offsets (within the uplink's grace period).
    pub(crate) async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut failures = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        'records: loop {
            let m = tokio::select! {
                biased;
                () = &mut shutdown => break,
                m = self.consumer.recv() => m,
            };
            let m = match m {
                Ok(m) => m.detach(),
                Err(e) => {
                    // librdkafka retries on its own; the context has logged it. A pause, so
                    // that errors coming back to back cannot spin this task.
                    self.status
                        .set_error(&format!("the downlink's consumer: {e}"));
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            };
            match self.record(&m) {
                Record::Other => self.status.record_other_gateways(1),
                Record::Refused(why, detail) => self.downlink.refuse(why, detail),
                Record::Command(cmd) => loop {
                    let outcome = tokio::select! {
                        biased;
                        () = &mut shutdown => break 'records,
                        o = self.downlink.hand_over(cmd.clone()) => o,
                    };
                    if self.downlink.record(&outcome) {
                        failures.reset();
                        break;
                    }
                    let delay = failures.next_delay();
                    if let Err(e @ HandOverError::Failed(_)) = &outcome {
                        tracing::warn!(uplink = %self.status.name(), error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            "A command could not be handed over; it is tried again.");
                    }
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break 'records,
                        () = tokio::time::sleep(delay) => {}
                    }
                },
            }
            if let Err(e) = self
                .consumer
                .store_offset(m.topic(), m.partition(), m.offset())
            {
                // The partition was revoked meanwhile: its new owner reads the record again.
                tracing::debug!(error = %e, "The downlink's offset could not be stored.");
            }
        }
        let (consumer, name, grace) = (self.consumer, self.status.name().to_owned(), self.grace);
        let commit = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => tracing::warn!(uplink = %name, error = %e,
                    "The downlink's last offsets could not be committed; those commands may be handed over again."),
            }
        });
        let _ = tokio::time::timeout(grace, commit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn message(headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        OwnedMessage::new(
            Some(b"on".to_vec()),
            None,
            "ferry.commands".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(h),
        )
    }

    #[tokio::test]
    async fn headers_pick_the_gateway_the_topic_and_the_properties() {
        #[derive(Debug)]
        struct Nobody;
        impl crate::downlink::Local for Nobody {
            fn hand_over(&self, _: &str, _: Command) -> crate::downlink::HandOverFuture {
                Box::pin(async { Ok(Default::default()) })
            }
        }
        let status = UplinkStatus::new("k", "kafka", Vec::new());
        let ctx = CommandContext {
            status: status.clone(),
            oauth: None,
            logs: Fold::default(),
        };
        let consumer: StreamConsumer<CommandContext> = rdkafka::ClientConfig::new()
            .set("group.id", "g")
            .set("bootstrap.servers", "127.0.0.1:1")
            .create_with_context(ctx)
            .unwrap();
        let c = Commands {
            consumer,
            downlink: Downlink::new(Arc::new(Nobody), status.clone()),
            gateway_id: "gw1".into(),
            qos: 1,
            status,
            grace: Duration::from_secs(1),
        };
        assert_eq!(
            c.record(&message(&[("ferry-gateway", "gw2"), ("ferry-topic", "a")])),
            Record::Other
        );
        assert!(matches!(
            c.record(&message(&[("ferry-gateway", "gw1")])),
            Record::Refused(Refusal::NoTopic, d) if d.contains("ferry.commands/3/42")
        ));
        let Record::Command(cmd) = c.record(&message(&[
            ("ferry-gateway", "gw1"),
            ("ferry-topic", "cmd/pump-1"),
            ("ferry-retain", "true"),
            ("content-type", "application/json"),
            ("trace", "t1"),
        ])) else {
            panic!("a command");
        };
        assert_eq!(cmd.topic, "cmd/pump-1");
        assert_eq!(&cmd.payload[..], b"on");
        assert!(cmd.retain);
        assert_eq!(cmd.qos, 1);
        assert_eq!(cmd.props.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            cmd.props.user_properties,
            [
                ("trace".to_owned(), "t1".to_owned()),
                (ID_PROPERTY.to_owned(), "ferry.commands/3/42".to_owned())
            ]
        );
        let Record::Command(all) = c.record(&message(&[("ferry-topic", "cmd/all")])) else {
            panic!("no ferry-gateway header: for every gateway");
        };
        assert!(!all.retain);
    }
}
