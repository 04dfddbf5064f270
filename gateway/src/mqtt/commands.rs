//! Commands from the cloud, handed to the local broker: the gateway's side of
//! [`ferry_uplink::downlink`], whose module doc holds the rules (hand-over before the upstream
//! ack, no echo, refusals).
//!
//! ## What a hand-over is here
//! - **Checked first**, refused for good when it fails: the topic must be a valid topic name
//!   not beginning with `$`; the payload at most `mqtt.max_payload_bytes`; with
//!   `[[mqtt.acl]]` rules, the user (and client id) `uplink:NAME` must be allowed to publish
//!   to the topic (a rule with `user = "uplink:NAME"`, or one without `user` and `cert_cn`).
//! - **In order, by one task** ([`LocalBroker`]'s): commands reach subscribers in the order
//!   they were handed over, whatever each one needs.
//! - **Room first.** A subscriber's queue is bounded (`mqtt.subscriber_queue_*`); a command
//!   that would overflow one waits while the full queues keep moving, so that a burst of
//!   commands holds the upstream back (its acks wait) instead of being dropped after its ack.
//!   Once none of the full queues took a message for [`STALLED`] (a subscriber that does not
//!   read), the command goes on, and the full queue drops as its rule says, counted.
//! - **Then published like a device's publish, without the reading**: the broker's `prepare`
//!   ([`super::broker::Broker::prepare`]) gives the rows of a retained command and of its
//!   queue entries for persistent sessions; they are written in one buffer commit (state
//!   only: a command is not a reading), and after that commit returned its `route` queues it
//!   for every subscriber and applies the retained message. A command that needs no row (QoS
//!   0, or no persistent session and not retained) needs no commit. Commits are pipelined:
//!   the next command is prepared and submitted while the one before waits for its commit,
//!   and they are routed in order as their commits return.
//! - The work is the task's, not the caller's: an uplink dropping the future (its link
//!   failed) never leaves rows written and not routed.

use super::broker::{self, FROM_CLOUD, Message, Prepared};
use super::session::Ctx;
use bytes::Bytes;
use ferry_config::topic;
use ferry_uplink::downlink::{
    Command, HandOverError, HandOverFuture, HandedOver, Local, Refusal, acl_user,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long a full subscriber queue may take no message before a command stops waiting for
/// room in it.
pub const STALLED: Duration = Duration::from_secs(1);

/// The local broker, as uplinks with a downlink see it.
#[derive(Debug, Clone)]
pub struct LocalBroker {
    ctx: Arc<Ctx>,
    jobs: mpsc::UnboundedSender<Job>,
}

/// A checked command and where its outcome goes.
#[derive(Debug)]
struct Job {
    cmd: Command,
    reply: Reply,
}

impl LocalBroker {
    /// Starts the task that hands commands over (on the current runtime).
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(ctx.clone(), rx));
        LocalBroker { ctx, jobs }
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
        let sent = self.check(uplink, &cmd).and_then(|()| {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .send(Job { cmd, reply })
                .map(|()| answer)
                .map_err(|_| HandOverError::Failed("the local broker has stopped".into()))
        });
        Box::pin(async move {
            sent?.await.unwrap_or_else(|_| {
                Err(HandOverError::Failed(
                    "the local broker stopped before the command was handed over".into(),
                ))
            })
        })
    }
}

/// Where a job's outcome goes.
type Reply = oneshot::Sender<Result<HandedOver, HandOverError>>;

/// A prepared command waiting for its commit, then routed.
type Committing = Pin<Box<dyn Future<Output = (Result<(), String>, Prepared, Reply)> + Send>>;

/// The task behind [`LocalBroker`]: takes jobs in order, waits for room, prepares and submits
/// each, and routes them in order as their commits return.
async fn run(ctx: Arc<Ctx>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut committing: FuturesOrdered<Committing> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some((committed, p, reply)) = committing.next(), if !committing.is_empty() => {
                route(&ctx, committed, p, reply);
            }
            job = jobs.recv() => {
                let Some(Job { cmd, reply }) = job else { break };
                let cost = cmd.topic.len() + cmd.payload.len();
                if cmd.qos > 0 && !ctx.broker.full_queues(&cmd.topic, cost).is_empty() {
                    // What was submitted before is routed first, so that the queues can move.
                    while let Some((committed, p, reply)) = committing.next().await {
                        route(&ctx, committed, p, reply);
                    }
                    wait_for_room(&ctx, &cmd.topic, cost).await;
                }
                let mut p = ctx.broker.prepare(message(cmd));
                let writes = std::mem::take(&mut p.writes);
                let commit = (!writes.is_empty())
                    .then(|| ctx.buffer.submit_with_state(Vec::new(), writes));
                committing.push_back(Box::pin(async move {
                    let committed = match commit {
                        Some(c) => c.await.map(drop).map_err(|e| e.to_string()),
                        None => Ok(()),
                    };
                    (committed, p, reply)
                }));
            }
        }
    }
    while let Some((committed, p, reply)) = committing.next().await {
        route(&ctx, committed, p, reply);
    }
}

/// Waits while some queue `topic` goes to is full and those queues keep moving (see the
/// module doc).
async fn wait_for_room(ctx: &Ctx, topic: &str, cost: usize) {
    let mut seen: HashMap<usize, u64> = HashMap::new();
    let mut moved_at = Instant::now();
    loop {
        let full = ctx.broker.full_queues(topic, cost);
        if full.is_empty() {
            return;
        }
        for (outbox, popped) in &full {
            let before = seen.insert(Arc::as_ptr(outbox) as usize, *popped);
            if before.is_some_and(|b| b != *popped) {
                moved_at = Instant::now();
            }
        }
        if moved_at.elapsed() >= STALLED {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Routes a committed command and answers for it.
fn route(ctx: &Ctx, committed: Result<(), String>, p: Prepared, reply: Reply) {
    let outcome = match committed {
        Ok(()) => {
            let retained = p.msg.keep;
            let queued = ctx.broker.route(&[p.msg], p.durable);
            Ok(HandedOver { queued, retained })
        }
        Err(e) => Err(HandOverError::Failed(format!(
            "the buffer did not commit it: {e}"
        ))),
    };
    // The uplink may have gone (its link failed): the command was handed over all the same.
    let _ = reply.send(outcome);
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
