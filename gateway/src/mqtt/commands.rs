//! Commands from the cloud, handed to the local broker: the gateway's side of
//! [`ferry_uplink::downlink`], whose module doc holds the rules (hand-over before the upstream
//! ack, no echo, refusals).
//!
//! ## What a hand-over is here
//! - **Checked first**, refused for good when it fails: the topic must be a valid topic name
//!   not beginning with `$`; the payload at most `mqtt.max_payload_bytes`; with
//!   `[[mqtt.acl]]` rules, the user (and client id) `uplink:NAME` must be allowed to publish
//!   to the topic (a rule with `user = "uplink:NAME"`, or one without `user` and `cert_cn`).
//! - **Then published like a device's publish, without the reading**: the broker's `prepare`
//!   ([`super::broker::Broker::prepare`]) gives the rows of a retained command and of its queue entries for persistent sessions;
//!   they are written in one buffer commit (state only: a command is not a reading), and
//!   after that commit returned its `route` queues it for every subscriber and applies
//!   the retained message. A command that needs no row (QoS 0, or no persistent session and
//!   not retained) is queued at once.
//! - The work runs in a task of its own, so that an uplink dropping the future (its link
//!   failed) never leaves rows written and not routed.

use super::broker::{self, FROM_CLOUD, Message};
use super::session::Ctx;
use bytes::Bytes;
use ferry_config::topic;
use ferry_uplink::downlink::{
    Command, HandOverError, HandOverFuture, HandedOver, Local, Refusal, acl_user,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The local broker, as uplinks with a downlink see it.
#[derive(Debug, Clone)]
pub struct LocalBroker {
    ctx: Arc<Ctx>,
}

impl LocalBroker {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        LocalBroker { ctx }
    }

    /// Whether `cmd` may be handed over for `uplink` (see the module doc).
    fn check(&self, uplink: &str, cmd: &Command) -> Result<(), HandOverError> {
        if let Err(why) = topic::check_name(&cmd.topic) {
            return Err(HandOverError::refused(
                Refusal::InvalidTopic,
                format!(
                    "the local topic {:?} is not a valid MQTT topic name: {why}",
                    cmd.topic
                ),
            ));
        }
        if cmd.topic.starts_with('$') {
            return Err(HandOverError::refused(
                Refusal::InvalidTopic,
                format!(
                    "the local topic {:?} begins with '$', which is reserved for the broker",
                    cmd.topic
                ),
            ));
        }
        let max = self.ctx.settings.max_payload_bytes;
        if cmd.payload.len() > max {
            return Err(HandOverError::refused(
                Refusal::TooLarge,
                format!(
                    "the command for {:?} has {} bytes, more than mqtt.max_payload_bytes ({max})",
                    cmd.topic,
                    cmd.payload.len()
                ),
            ));
        }
        let user = acl_user(uplink);
        if let Some(acl) = self.ctx.acl.for_client(Some(&user), None, &user)
            && !acl.may_publish(&cmd.topic)
        {
            return Err(HandOverError::refused(
                Refusal::Forbidden,
                format!(
                    "no [[mqtt.acl]] rule lets the user {user:?} publish to {:?}; add it to the publish filters of a rule with user = {user:?}",
                    cmd.topic
                ),
            ));
        }
        Ok(())
    }
}

impl Local for LocalBroker {
    fn hand_over(&self, uplink: &str, cmd: Command) -> HandOverFuture {
        let checked = self.check(uplink, &cmd);
        let ctx = self.ctx.clone();
        let task = checked.map(|()| tokio::spawn(async move { publish(&ctx, cmd).await }));
        Box::pin(async move {
            match task?.await {
                Ok(outcome) => outcome,
                Err(e) => Err(HandOverError::Failed(format!(
                    "the hand-over task ended: {e}"
                ))),
            }
        })
    }
}

/// The message local subscribers get for `cmd`.
fn message(cmd: Command) -> Message {
    let p = cmd.props;
    Message {
        topic: Arc::from(cmd.topic.as_str()),
        topic_bytes: Bytes::from(cmd.topic.into_bytes()),
        payload: cmd.payload,
        qos: cmd.qos.min(2),
        retain: cmd.retain,
        keep: false,
        props: broker::passed_on(
            p.payload_format_indicator,
            p.content_type,
            p.response_topic,
            p.correlation_data,
            p.user_properties,
        ),
        expires: p
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
        from: FROM_CLOUD,
        n: 0,
    }
}

/// Commits what must be durable, then routes (see the module doc).
async fn publish(ctx: &Ctx, cmd: Command) -> Result<HandedOver, HandOverError> {
    let p = ctx.broker.prepare(message(cmd));
    if !p.writes.is_empty() {
        ctx.buffer
            .submit_with_state(Vec::new(), p.writes)
            .await
            .map_err(|e| HandOverError::Failed(format!("the buffer did not commit it: {e}")))?;
    }
    let retained = p.msg.keep;
    let queued = ctx.broker.route(&[p.msg], p.durable);
    Ok(HandedOver { queued, retained })
}
