//! The Kafka uplink task: buffer segments in, acks out.

use super::config::client_config;
use super::routing::{Router, key_for};
use crate::backoff::Backoff;
use crate::status::{LinkState, UplinkStatus};
use ferry_buffer::{AckError, Buffer, ReadError, Reader, Reading, Segment};
use ferry_config::{Delivery, KafkaUplink};
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use futures_util::{FutureExt, future::BoxFuture};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The buffer consumer name of the Kafka uplink.
pub const CONSUMER: &str = "kafka";

/// How long [`KafkaSink::run`] waits for in-flight deliveries at shutdown, unless
/// [`KafkaSink::shutdown_grace`] says otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After this many failed tries in a row the state is `offline` rather than `backing_off`.
const OFFLINE_AFTER_FAILURES: u32 = 3;

/// Why the Kafka uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaSinkError {
    /// librdkafka refused the configuration (for example an unknown passthrough property).
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] KafkaError),
    /// The buffer has no `kafka` consumer, or could not be read.
    #[error("cannot read the buffer for the Kafka uplink: {0}")]
    Read(#[from] ReadError),
}

/// Receives librdkafka's client-level events: logs go to `tracing`, "all brokers down" sets
/// the state to `offline`.
struct SinkContext {
    status: UplinkStatus,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let msg = self.status.scrub(log_message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, message = %msg, "librdkafka reported an error.")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(facility = fac, message = %msg, "librdkafka reported a warning.")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, message = %msg, "librdkafka reported an event.")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(facility = fac, message = %msg, "librdkafka debug output.")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.status.scrub(reason);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_state(LinkState::Offline);
            self.status.set_error(&format!("{error}: {reason}"));
        }
        tracing::warn!(error = %error, reason = %reason, "The Kafka client reported an error.");
    }
}

type Kp = FutureProducer<SinkContext>;

fn create_producer(cc: &ClientConfig, status: &UplinkStatus) -> Result<Kp, KafkaError> {
    cc.create_with_context(SinkContext {
        status: status.clone(),
    })
}

/// Drops a producer off the async workers: librdkafka's destroy purges and may block briefly.
async fn retire(producer: Kp) {
    producer.purge(PurgeConfig::default().queue().inflight());
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
}

/// What the uplink does with an error from the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// This reading can never be delivered as is: dead-letter it.
    Permanent,
    /// Keep the segment and try again later.
    Transient,
    /// The producer instance is unusable: rebuild it, then try again.
    Fatal,
}

/// Classifies a producer error by its librdkafka error code.
///
/// Permanent: message too large, invalid record/message/timestamp, topic authorization
/// failed, policy violation, unsupported message format, and `_UNKNOWN_TOPIC` (librdkafka's
/// own verdict that the topic does not exist in the cluster, after its metadata refresh; a
/// broker's `UNKNOWN_TOPIC_OR_PARTITION` is left transient, it happens during leader moves).
pub fn classify(e: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidMessage
            | C::InvalidTimestamp
            | C::TopicAuthorizationFailed
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::UnknownTopic,
        ) => ErrorClass::Permanent,
        Some(C::Fatal) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// A transient failure of one segment.
#[derive(Debug)]
struct Failure {
    message: String,
    fatal: bool,
}

/// What became of one segment's deliveries.
#[derive(Debug)]
struct Outcome {
    id: u64,
    count: u64,
    delivered: u64,
    dead: Vec<(Reading, String)>,
    failure: Option<Failure>,
}

async fn tagged(
    i: usize,
    f: rdkafka::producer::DeliveryFuture,
) -> (usize, <rdkafka::producer::DeliveryFuture as Future>::Output) {
    (i, f.await)
}

/// Everything a segment delivery needs, cheap to clone.
#[derive(Clone)]
struct Ctx {
    producer: Kp,
    router: Arc<Router>,
    gateway_id: Arc<str>,
    delivery: Delivery,
}

fn reading_headers(gateway_id: &str, r: &Reading) -> OwnedHeaders {
    let id = format!("{gateway_id}-{}", r.id);
    let at = r.received_at_ms.to_string();
    let h = OwnedHeaders::new_with_capacity(6)
        .insert(Header {
            key: "ferry-id",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "ferry-topic",
            value: Some(r.topic.as_str()),
        })
        .insert(Header {
            key: "ferry-device",
            value: Some(r.device.as_str()),
        })
        .insert(Header {
            key: "ferry-received-at",
            value: Some(at.as_str()),
        })
        .insert(Header {
            key: "ferry-source",
            value: Some(r.source.as_str()),
        });
    match &r.content_type {
        Some(ct) => h.insert(Header {
            key: "content-type",
            value: Some(ct.as_str()),
        }),
        None => h,
    }
}

fn segment_headers(gateway_id: &str, seg: &Segment) -> OwnedHeaders {
    let gzip = ferry_buffer::segment::decode_header(&seg.stored)
        .map(|h| h.gzip)
        .unwrap_or(true);
    let id = seg.id.to_string();
    let first = seg.readings.first().map_or(0, |r| r.id).to_string();
    let count = seg.readings.len().to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "content-encoding",
            value: Some(if gzip { "gzip" } else { "identity" }),
        })
        .insert(Header {
            key: "ferry-segment",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "ferry-first-id",
            value: Some(first.as_str()),
        })
        .insert(Header {
            key: "ferry-count",
            value: Some(count.as_str()),
        })
        .insert(Header {
            key: "ferry-gateway",
            value: Some(gateway_id),
        })
}

impl Ctx {
    /// Produces one segment and waits for its delivery reports. Returns early on the first
    /// transient failure: the whole segment will be sent again.
    async fn deliver(self, seg: Segment) -> Outcome {
        let count = seg.readings.len() as u64;
        let mut out = Outcome {
            id: seg.id,
            count,
            delivered: 0,
            dead: Vec::new(),
            failure: None,
        };
        // Index into seg.readings of each permanent failure, with its reason; usize::MAX for
        // the whole segment (segment delivery).
        let mut dead: Vec<(usize, String)> = Vec::new();
        let mut pending = FuturesUnordered::new();
        match self.delivery {
            Delivery::Segment => {
                let rec = FutureRecord::to(self.router.default_topic())
                    .key(&*self.gateway_id)
                    .payload(seg.stored.as_slice())
                    .headers(segment_headers(&self.gateway_id, &seg));
                match self.enqueue(rec).await {
                    Ok(f) => pending.push(tagged(usize::MAX, f)),
                    Err(Err(reason)) => dead.push((usize::MAX, reason)),
                    Err(Ok(failure)) => {
                        out.failure = Some(failure);
                        return out;
                    }
                }
            }
            _ => {
                for (i, r) in seg.readings.iter().enumerate() {
                    let (topic, rule) = self.router.route(&r.topic);
                    let mut rec = FutureRecord::to(topic)
                        .payload(r.payload.as_ref())
                        .headers(reading_headers(&self.gateway_id, r));
                    if let Some(k) = key_for(rule, r) {
                        rec = rec.key(k);
                    }
                    match self.enqueue(rec).await {
                        Ok(f) => pending.push(tagged(i, f)),
                        Err(Err(reason)) => dead.push((i, reason)),
                        Err(Ok(failure)) => {
                            out.failure = Some(failure);
                            return out;
                        }
                    }
                }
            }
        }
        while let Some((i, report)) = pending.next().await {
            match report {
                Ok(Ok(_)) => out.delivered += 1,
                Ok(Err((e, _))) => match classify(&e) {
                    ErrorClass::Permanent => dead.push((i, e.to_string())),
                    class => {
                        out.failure = Some(Failure {
                            message: format!("delivery failed: {e}"),
                            fatal: class == ErrorClass::Fatal,
                        });
                        return out;
                    }
                },
                Err(_canceled) => {
                    out.failure = Some(Failure {
                        message: "the producer was shut down before confirming delivery".into(),
                        fatal: false,
                    });
                    return out;
                }
            }
        }
        if self.delivery == Delivery::Segment {
            // One record carries every reading of the segment.
            out.delivered = if dead.is_empty() { count } else { 0 };
            if let Some((_, reason)) = dead.pop() {
                out.dead = seg
                    .readings
                    .into_iter()
                    .map(|r| (r, reason.clone()))
                    .collect();
            }
        } else if !dead.is_empty() {
            dead.sort_by_key(|d| d.0);
            let mut readings = seg.readings.into_iter().enumerate().peekable();
            for (i, reason) in dead {
                for (j, r) in readings.by_ref() {
                    if j == i {
                        out.dead.push((r, reason));
                        break;
                    }
                }
            }
        }
        out
    }

    /// Hands one record to librdkafka, waiting while its queue is full. `Err(Err(reason))` is
    /// a permanent failure of this record, `Err(Ok(failure))` a transient one.
    #[allow(clippy::type_complexity)]
    async fn enqueue<'a>(
        &self,
        mut rec: FutureRecord<'a, str, [u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture, Result<Failure, String>> {
        loop {
            match self.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((e, back)) => match (e.rdkafka_error_code(), classify(&e)) {
                    (Some(RDKafkaErrorCode::QueueFull), _) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (_, ErrorClass::Permanent) => return Err(Err(e.to_string())),
                    (_, class) => {
                        return Err(Ok(Failure {
                            message: format!("cannot enqueue: {e}"),
                            fatal: class == ErrorClass::Fatal,
                        }));
                    }
                },
            }
        }
    }
}

/// The Kafka uplink: forwards the buffer's `kafka` consumer to Kafka and acks what Kafka
/// confirmed. Build it with [`KafkaSink::new`], keep [`KafkaSink::status`], then spawn
/// [`KafkaSink::run`].
pub struct KafkaSink {
    cfg: KafkaUplink,
    client_config: ClientConfig,
    producer: Kp,
    ctx_router: Arc<Router>,
    gateway_id: Arc<str>,
    buffer: Buffer,
    status: UplinkStatus,
    grace: Duration,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.cfg.brokers)
            .field("gateway_id", &self.gateway_id)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Builds the producer (librdkafka validates the configuration here; brokers are contacted
    /// later) and checks that the buffer has a `kafka` consumer.
    pub fn new(
        cfg: &KafkaUplink,
        gateway_id: &str,
        buffer: Buffer,
    ) -> Result<KafkaSink, KafkaSinkError> {
        // Fails early when the buffer was opened without the consumer.
        drop(buffer.reader(CONSUMER)?);
        let secrets = cfg
            .sasl_password
            .iter()
            .map(|p| p.expose().to_string())
            .collect();
        let status = UplinkStatus::new(CONSUMER, secrets);
        let client_config = client_config(cfg, &format!("ferry-{gateway_id}"));
        let producer =
            create_producer(&client_config, &status).map_err(KafkaSinkError::Producer)?;
        Ok(KafkaSink {
            cfg: cfg.clone(),
            client_config,
            producer,
            ctx_router: Arc::new(Router::new(cfg)),
            gateway_id: gateway_id.into(),
            buffer,
            status,
            grace: DEFAULT_SHUTDOWN_GRACE,
        })
    }

    /// How long [`KafkaSink::run`] waits for in-flight deliveries once shutdown starts.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The status handle (clone it before calling [`KafkaSink::run`]).
    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Forwards until `shutdown` resolves, then stops reading, waits up to the grace period for
    /// what is in flight, acks what was confirmed, and returns. Unconfirmed readings stay in
    /// the buffer. Returns early, with an error, only if the buffer cannot be read at all.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), KafkaSinkError> {
        let KafkaSink {
            cfg,
            client_config,
            producer,
            ctx_router,
            gateway_id,
            buffer,
            status,
            grace,
        } = self;
        let mut reader = buffer.reader(CONSUMER)?;
        let mut ctx = Ctx {
            producer,
            router: ctx_router,
            gateway_id,
            delivery: cfg.delivery,
        };
        let max_inflight = cfg.max_inflight_segments.max(1);
        let mut backoff = Backoff::new(
            Duration::from_millis(cfg.initial_backoff_ms),
            Duration::from_millis(cfg.max_backoff_ms),
        );
        let mut run = Run {
            inflight: FuturesOrdered::new(),
            in_flight_readings: 0,
            sent_upto: reader.acked(),
            failures: 0,
            status: status.clone(),
        };
        tokio::pin!(shutdown);
        tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, "The Kafka uplink is starting.");

        enum Ev {
            Shutdown,
            Done(Outcome),
            Read(Result<Vec<Segment>, ReadError>),
        }
        loop {
            let room = max_inflight.saturating_sub(run.inflight.len());
            let ev = tokio::select! {
                biased;
                () = &mut shutdown => Ev::Shutdown,
                Some(o) = run.inflight.next(), if !run.inflight.is_empty() => Ev::Done(o),
                r = reader.next(room), if room > 0 => Ev::Read(r),
            };
            let failure = match ev {
                Ev::Shutdown => break,
                Ev::Read(Ok(segs)) => {
                    run.start(&ctx, segs);
                    None
                }
                Ev::Read(Err(ReadError::Closed)) => {
                    tracing::info!("The buffer closed; the Kafka uplink stops reading.");
                    break;
                }
                Ev::Read(Err(e)) => Some(Failure {
                    message: format!("cannot read the buffer: {e}"),
                    fatal: false,
                }),
                Ev::Done(first) => run.settle(&mut reader, first).await,
            };
            let Some(failure) = failure else {
                if run.failures == 0 {
                    // Reset only after an ack: reading again after a rewind is no success.
                    backoff.reset();
                }
                continue;
            };
            // A transient failure: nothing after the last ack counts any more. Stop what
            // librdkafka still holds (its queue is never our storage), wait, and send again
            // from the last acked segment.
            run.abandon();
            let fatal = failure.fatal || ctx.producer.client().fatal_error().is_some();
            let old = ctx.producer.clone();
            let delay = backoff.next_delay();
            run.failures += 1;
            let offline =
                run.failures >= OFFLINE_AFTER_FAILURES || status.state() == LinkState::Offline;
            status.record_retry(&failure.message, delay, offline);
            tracing::warn!(
                error = %status.scrub(&failure.message),
                retry_in_ms = delay.as_millis() as u64,
                attempt = run.failures,
                "Kafka delivery failed; the unconfirmed segments stay in the buffer and will be sent again."
            );
            if fatal {
                tracing::error!("The Kafka producer hit a fatal error and is rebuilt.");
                retire(old).await;
            } else {
                old.purge(PurgeConfig::default().queue().inflight());
                drop(old);
            }
            let mut sleep = std::pin::pin!(tokio::time::sleep(delay));
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    retire(ctx.producer).await;
                    return Ok(());
                }
                () = &mut sleep => {}
            }
            if fatal {
                loop {
                    match create_producer(&client_config, &status) {
                        Ok(p) => {
                            ctx.producer = p;
                            break;
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            status.record_retry(
                                &format!("cannot rebuild the Kafka producer: {e}"),
                                delay,
                                true,
                            );
                            tokio::select! {
                                biased;
                                () = &mut shutdown => return Ok(()),
                                () = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                }
            }
            reader.rewind();
        }

        // Shutdown: no new segments; settle what completes within the grace period.
        let deadline = tokio::time::Instant::now() + grace;
        while !run.inflight.is_empty() {
            match tokio::time::timeout_at(deadline, run.inflight.next()).await {
                Ok(Some(o)) => {
                    if run.settle(&mut reader, o).await.is_some() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        if !run.inflight.is_empty() {
            tracing::warn!(
                segments = run.inflight.len(),
                readings = run.in_flight_readings,
                "Shutdown grace ran out; unconfirmed Kafka deliveries stay in the buffer."
            );
        }
        run.abandon();
        retire(ctx.producer).await;
        tracing::info!("The Kafka uplink stopped.");
        Ok(())
    }
}

/// The mutable state of one run.
struct Run {
    inflight: FuturesOrdered<BoxFuture<'static, Outcome>>,
    in_flight_readings: u64,
    /// Highest segment id handed to the producer; sending one at or below it again is a re-send.
    sent_upto: u64,
    failures: u32,
    status: UplinkStatus,
}

impl Run {
    fn start(&mut self, ctx: &Ctx, segs: Vec<Segment>) {
        let mut resent = 0;
        for seg in segs {
            let n = seg.readings.len() as u64;
            if seg.id <= self.sent_upto {
                resent += n;
            }
            self.sent_upto = self.sent_upto.max(seg.id);
            self.in_flight_readings += n;
            self.inflight.push_back(ctx.clone().deliver(seg).boxed());
        }
        self.status.record_resent(resent);
        self.status.set_in_flight(self.in_flight_readings);
    }

    fn abandon(&mut self) {
        self.inflight = FuturesOrdered::new();
        self.in_flight_readings = 0;
        self.status.set_in_flight(0);
    }

    /// Settles `first` and any further outcomes already complete, in segment order: dead
    /// letters, then one ack for the highest fully confirmed segment. Returns the first
    /// transient failure met, after settling the segments before it.
    async fn settle(&mut self, reader: &mut Reader, first: Outcome) -> Option<Failure> {
        let mut done = vec![first];
        while done.last().is_some_and(|o| o.failure.is_none()) {
            match self.inflight.next().now_or_never() {
                Some(Some(o)) => done.push(o),
                _ => break,
            }
        }
        let mut failure = None;
        let mut ack_to = None;
        let (mut delivered, mut dead) = (0u64, Vec::new());
        for o in done {
            self.in_flight_readings -= o.count;
            if let Some(f) = o.failure {
                failure = Some(f);
                break;
            }
            ack_to = Some(o.id);
            delivered += o.delivered;
            dead.extend(o.dead);
        }
        self.status.set_in_flight(self.in_flight_readings);
        let Some(ack_to) = ack_to else {
            return failure;
        };
        let dead_n = dead.len() as u64;
        let reason = dead.first().map(|d| d.1.clone());
        if !dead.is_empty() {
            for (r, why) in &dead {
                tracing::warn!(reading = r.id, device = %r.device, topic = %r.topic, reason = %why,
                    "Kafka refused a reading permanently; it moves to the dead-letter table.");
            }
            if let Err(e) = reader.dead_letter(dead).await {
                return Some(ack_failure(e));
            }
        }
        if let Err(e) = reader.ack(ack_to).await {
            return Some(ack_failure(e));
        }
        if let Some(reason) = reason {
            self.status.record_dead_lettered(dead_n, &reason);
        }
        self.status.record_acked(delivered);
        self.failures = 0;
        failure
    }
}

fn ack_failure(e: AckError) -> Failure {
    Failure {
        message: format!("cannot record the ack in the buffer: {e}"),
        fatal: false,
    }
}
