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
//!   read, or a persistent session whose client is away), the command goes on, and the full
//!   queue drops as its rule says, counted; later commands do not wait for that queue again
//!   until it moves.
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

use super::broker::{self, FROM_CLOUD, Message, Outbox, Prepared};
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
use std::sync::{Arc, Weak};
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
    let mut stalled = Stalled::default();
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
                    wait_for_room(&ctx, &cmd.topic, cost, &mut stalled).await;
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

/// Full queues that took nothing for [`STALLED`]: later commands do not wait for them again
/// until they move. By the queue's address, with the queue (to tell a new one at the same
/// address) and how many messages it had handed out then.
#[derive(Debug, Default)]
struct Stalled(HashMap<usize, (Weak<Outbox>, u64)>);

/// Forgotten beyond this many, all at once (they are only waits saved).
const STALLED_KEPT: usize = 10_000;

impl Stalled {
    /// Whether `outbox` stalled at `popped` and has not moved since.
    fn still(&mut self, outbox: &Arc<Outbox>, popped: u64) -> bool {
        let key = Arc::as_ptr(outbox) as usize;
        match self.0.get(&key) {
            Some((q, at)) if q.upgrade().is_some_and(|q| Arc::ptr_eq(&q, outbox)) => {
                if *at == popped {
                    return true;
                }
                self.0.remove(&key);
                false
            }
            Some(_) => {
                self.0.remove(&key);
                false
            }
            None => false,
        }
    }

    fn insert(&mut self, outbox: &Arc<Outbox>, popped: u64) {
        if self.0.len() >= STALLED_KEPT {
            self.0.clear();
        }
        self.0.insert(
            Arc::as_ptr(outbox) as usize,
            (Arc::downgrade(outbox), popped),
        );
    }
}

/// Waits while some queue `topic` goes to is full and those queues keep moving (see the
/// module doc); a queue that does not move for [`STALLED`] is remembered in `stalled` and not
/// waited for again until it moves.
async fn wait_for_room(ctx: &Ctx, topic: &str, cost: usize, stalled: &mut Stalled) {
    let mut seen: HashMap<usize, u64> = HashMap::new();
    let mut moved_at = tokio::time::Instant::now();
    loop {
        let mut full = ctx.broker.full_queues(topic, cost);
        full.retain(|(outbox, popped)| !stalled.still(outbox, *popped));
        if full.is_empty() {
            return;
        }
        for (outbox, popped) in &full {
            let before = seen.insert(Arc::as_ptr(outbox) as usize, *popped);
            if before.is_some_and(|b| b != *popped) {
                moved_at = tokio::time::Instant::now();
            }
        }
        if moved_at.elapsed() >= STALLED {
            for (outbox, popped) in &full {
                stalled.insert(outbox, *popped);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::broker::SubOpts;
    use ferry_buffer::{Buffer, BufferOptions};
    use ferry_config::MqttSettings;

    fn cmd(topic: &str, payload: &'static str) -> Command {
        Command {
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: 1,
            retain: false,
            props: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_waited_for_while_it_moves_and_once_when_it_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(dir.path(), BufferOptions::default()).unwrap();
        let settings = MqttSettings {
            subscriber_queue_messages: 1,
            ..MqttSettings::default()
        };
        let ctx = Arc::new(Ctx::new(settings, buffer, false).unwrap());
        let outbox = ctx.broker.outbox("dev".into());
        let o = SubOpts {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        };
        ctx.broker.subscribe("dev", 7, 7, &outbox, "cmd/#", o);
        let local = LocalBroker::new(ctx.clone());
        let go = |c| local.hand_over("cloud", c);

        // Room: queued at once.
        let h = go(cmd("cmd/a", "1")).await.unwrap();
        assert_eq!(h.queued, 1);
        // Full, and the device takes nothing: the command waits STALLED, then goes on and
        // the full queue drops it.
        let t = tokio::time::Instant::now();
        go(cmd("cmd/a", "2")).await.unwrap();
        assert!(t.elapsed() >= STALLED, "{:?}", t.elapsed());
        assert_eq!(outbox.dropped(), 1);
        // The next one does not wait for that queue again.
        let t = tokio::time::Instant::now();
        go(cmd("cmd/a", "3")).await.unwrap();
        assert!(t.elapsed() < STALLED, "{:?}", t.elapsed());
        // Once it moves, it is waited for: a device that takes one message a second gets
        // every command.
        assert!(outbox.pop(true).is_some());
        let (pop, popped) = (outbox.clone(), Arc::new(std::sync::Mutex::new(Vec::new())));
        let got = popped.clone();
        let reader = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(d) = pop.pop(true) {
                    got.lock().unwrap().push(d.msg.payload.clone());
                }
            }
        });
        for p in ["4", "5", "6"] {
            go(cmd("cmd/a", p)).await.unwrap();
        }
        reader.await.unwrap();
        let got: Vec<Bytes> = popped.lock().unwrap().clone();
        assert_eq!(
            got,
            ["4", "5", "6"].map(|p| Bytes::from_static(p.as_bytes()))
        );
        assert_eq!(outbox.dropped(), 2, "2 and 3 were dropped, not 4 to 6");
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(dir.path(), BufferOptions::default()).unwrap();
        let settings = MqttSettings {
            max_payload_bytes: 4,
            acl: vec![ferry_config::MqttAcl {
                user: Some("uplink:cloud".into()),
                publish: vec!["cmd/#".into()],
                ..Default::default()
            }],
            ..MqttSettings::default()
        };
        let local = LocalBroker::new(Arc::new(Ctx::new(settings, buffer, false).unwrap()));
        for (uplink, c, why) in [
            ("cloud", cmd("cmd/+", "1"), Refusal::InvalidTopic),
            ("cloud", cmd("$SYS/x", "1"), Refusal::InvalidTopic),
            ("cloud", cmd("cmd/a", "12345"), Refusal::TooLarge),
            ("cloud", cmd("cfg/a", "1"), Refusal::Forbidden),
            ("other", cmd("cmd/a", "1"), Refusal::Forbidden),
        ] {
            match local.hand_over(uplink, c.clone()).await {
                Err(HandOverError::Refused { why: w, detail }) => {
                    assert_eq!(w, why, "{c:?}: {detail}")
                }
                other => panic!("{c:?}: {other:?}"),
            }
        }
        let h = local.hand_over("cloud", cmd("cmd/a", "1")).await.unwrap();
        assert_eq!(h, HandedOver::default(), "no subscriber, not retained");
    }
}
