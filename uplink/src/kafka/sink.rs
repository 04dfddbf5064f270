//! The Kafka uplink task: buffer segments in, acks out.
//!
//! Three parts run at once, so none of them waits for another's slow step:
//! - the buffer task ([`super::feed`]) owns the buffer's reader: it reads and decodes
//!   segments ahead into a small bounded channel and commits dead letters and acks (an fsync
//!   each) strictly in the order the run loop sends them;
//! - the producer thread ([`super::pump`]) hands each segment's records to librdkafka and
//!   serves the delivery reports, which it counts per segment ([`super::track`]); a record's
//!   delivery opaque is its sequence number, so no future, channel or box is allocated per
//!   record;
//! - the run loop ([`KafkaSink::run`]) passes segments from the buffer task to the producer
//!   thread, settles them in order as their delivery reports complete and sends their ack to
//!   the buffer task without waiting for the commit; it handles failures and shutdown.

use super::config::client_config;
use super::diagnose;
use super::pump::{Gate, Job, Layout, Pump};
use super::routing::Router;
use super::track::Tracker;
use crate::Common;
use crate::aws::credentials::Configured;
use crate::aws::msk::TokenSource;
use crate::aws::sigv4::Credentials;
use crate::feed::{self, Acked};
use crate::fold::{Fold, Say};
use crate::retry::Retry;
use crate::settle::{Failure, Settled};
use crate::status::{LinkState, UplinkStatus};
use crate::topics::Selection;
use ferry_buffer::{AckError, ReadError, Segment};
use ferry_config::kafka_cloud::KafkaAuth;
use ferry_config::{Delivery, KafkaUplink};
use rdkafka::ClientConfig;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The type name of the Kafka uplink.
pub const KIND: &str = "kafka";

/// Why the Kafka uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaSinkError {
    /// librdkafka refused the configuration (for example an unknown passthrough property).
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] KafkaError),
    /// The buffer has no consumer of the uplink's name, or could not be read.
    #[error("cannot read the buffer for the Kafka uplink: {0}")]
    Read(#[from] ReadError),
    /// librdkafka refused the downlink consumer's configuration.
    #[error("cannot create the Kafka consumer of the downlink: {0}")]
    Consumer(#[source] KafkaError),
    /// It has a `downlink` and there is no local broker.
    #[error(transparent)]
    NoLocal(#[from] crate::NoLocal),
    /// The producer thread could not be started.
    #[error("cannot start the Kafka producer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The `cloud` preset's keys are invalid (`validate()` reports this first).
    #[error("invalid Kafka connection settings: {0}")]
    Connection(String),
    /// The MSK IAM token source could not be set up.
    #[error("cannot set up MSK IAM authentication: {0}")]
    Token(#[source] crate::aws::msk::TokenError),
}

/// Receives librdkafka's client-level events (logs go to `tracing`, "all brokers down" sets
/// the state to `offline`) and its delivery reports (counted in the [`Tracker`]). Its errors
/// and warnings repeat while a link is down (several a second): they are folded
/// ([`crate::fold`]), logged when they change and then once per summary period with a count.
pub(crate) struct SinkContext {
    status: UplinkStatus,
    tracker: Arc<Tracker>,
    /// librdkafka's log lines at error and warning level.
    logs: Fold,
    /// Its client-level errors.
    errors: Fold,
    /// Makes SASL OAUTHBEARER tokens (`cloud = "msk-iam"`).
    oauth: Option<Arc<TokenSource>>,
    /// `ssl_ca_path`, for naming TLS failures ([`super::diagnose`]).
    ca_path: Option<std::path::PathBuf>,
    /// The last readable cause, kept when "all brokers down" follows it.
    cause: Arc<std::sync::Mutex<Option<String>>>,
    /// The last look into a TLS failure (one a minute at most per broker).
    probe: Arc<std::sync::Mutex<Option<Probe>>>,
}

/// A look into a TLS failure with one broker ([`crate::tls::diagnose`]).
#[derive(Debug)]
struct Probe {
    at: Instant,
    target: (String, u16),
    /// Its readable line, once the handshake is done.
    line: Option<String>,
}

/// How long a probe's finding stands before a new failure is looked into again.
const PROBE_EVERY: Duration = Duration::from_secs(60);

impl SinkContext {
    fn set_cause(cause: &std::sync::Mutex<Option<String>>, status: &UplinkStatus, line: String) {
        status.set_error(&line);
        *cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
    }

    /// The line for a TLS failure with `host:port`: the finding of a recent probe of that
    /// broker, else librdkafka's `line` while a new probe runs on a thread of its own (one
    /// handshake, off the polling thread) and then puts its finding on the status page.
    fn tls_line(&self, host: String, port: u16, line: String) -> String {
        let target = (host, port);
        let mut g = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = g.as_ref()
            && p.target == target
            && p.at.elapsed() < PROBE_EVERY
        {
            return p.line.clone().unwrap_or(line);
        }
        *g = Some(Probe {
            at: Instant::now(),
            target: target.clone(),
            line: None,
        });
        drop(g);
        let (ca, cause, status, probe) = (
            self.ca_path.clone(),
            self.cause.clone(),
            self.status.clone(),
            self.probe.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("ferry-tls-probe".into())
            .spawn(move || {
                let Some(found) = crate::tls::diagnose(&target.0, target.1, ca.as_deref()) else {
                    return;
                };
                tracing::warn!(uplink = %status.name(), reason = %found,
                    "The Kafka brokers' TLS certificate is refused.");
                if let Some(p) = probe.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    && p.target == target
                {
                    p.line = Some(found.clone());
                }
                SinkContext::set_cause(&cause, &status, found);
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "Cannot start the TLS probe.");
        }
        line
    }
}

/// A SASL OAUTHBEARER token from `source` (`cloud = "msk-iam"`), for the producer and the
/// downlink's consumer.
pub(crate) fn oauth_token(
    source: Option<&TokenSource>,
) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    let Some(source) = source else {
        return Err("OAUTHBEARER is supported with cloud = \"msk-iam\" only".into());
    };
    let (token, principal_name) = source.generate()?;
    Ok(OAuthToken {
        token: token.value,
        principal_name,
        lifetime_ms: token.expires_at_ms,
    })
}

impl ClientContext for SinkContext {
    /// librdkafka asks for a token only with `sasl.mechanism = OAUTHBEARER`, which only the
    /// MSK IAM preset sets.
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _oauthbearer_config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(self.oauth.as_deref())
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let msg = self.status.scrub(log_message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => match self.logs.note(&msg, Instant::now()) {
                Say::New => {
                    tracing::error!(uplink = %self.status.name(), facility = fac, message = %msg,
                        "librdkafka reported an error.")
                }
                Say::Again(n) => {
                    tracing::error!(uplink = %self.status.name(), facility = fac, message = %msg,
                        repeats = n, "librdkafka keeps reporting the same error.")
                }
                Say::Quiet => {}
            },
            RDKafkaLogLevel::Warning => match self.logs.note(&msg, Instant::now()) {
                Say::New => {
                    tracing::warn!(uplink = %self.status.name(), facility = fac, message = %msg,
                        "librdkafka reported a warning.")
                }
                Say::Again(n) => {
                    tracing::warn!(uplink = %self.status.name(), facility = fac, message = %msg,
                        repeats = n, "librdkafka keeps reporting the same warning.")
                }
                Say::Quiet => {}
            },
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
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_state(LinkState::Offline);
            let cause = self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone();
            self.status.set_error(&match cause {
                Some(c) => format!("all brokers are down; last cause: {c}"),
                None => format!("{error}: {reason}"),
            });
        } else {
            let line = match diagnose::readable(code, &reason) {
                (diagnose::Cause::Tls(host, port), line) => self.tls_line(host, port, line),
                (diagnose::Cause::Other, line) => line,
            };
            SinkContext::set_cause(&self.cause, &self.status, line);
        }
        let text = format!("{error}: {reason}");
        match self.errors.note(&text, Instant::now()) {
            Say::New => tracing::warn!(uplink = %self.status.name(), error = %error,
                reason = %reason, "The Kafka client reported an error."),
            Say::Again(n) => tracing::warn!(uplink = %self.status.name(), error = %error,
                reason = %reason, repeats = n, "The Kafka client keeps reporting the same error."),
            Say::Quiet => {}
        }
    }
}

impl ProducerContext for SinkContext {
    /// The record's sequence number (see [`Tracker`]).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        self.tracker
            .report(seq, result.as_ref().map(|_| ()).map_err(|(e, _)| e));
    }
}

pub(crate) type Kp = BaseProducer<SinkContext>;

fn create_producer(
    cc: &ClientConfig,
    status: &UplinkStatus,
    tracker: &Arc<Tracker>,
    oauth: &Option<Arc<TokenSource>>,
) -> Result<Kp, KafkaError> {
    cc.create_with_context(SinkContext {
        status: status.clone(),
        tracker: tracker.clone(),
        logs: Fold::default(),
        errors: Fold::default(),
        oauth: oauth.clone(),
        ca_path: cc.get("ssl.ca.location").map(std::path::PathBuf::from),
        cause: Arc::default(),
        probe: Arc::default(),
    })
}

/// Drops a producer off the async workers: librdkafka's destroy purges and may block briefly.
/// Stops the producer thread first, so this is the last reference.
async fn retire(pump: Pump, producer: Arc<Kp>) {
    producer.purge(PurgeConfig::default().queue().inflight());
    pump.stop().await;
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
}

/// Starts the producer thread for `producer`.
fn start_pump(
    producer: &Arc<Kp>,
    tracker: &Arc<Tracker>,
    gate: &Arc<Gate>,
    layout: Layout,
) -> Result<Pump, Failure> {
    Pump::spawn(producer.clone(), tracker.clone(), gate.clone(), layout).map_err(|e| Failure {
        message: format!("cannot start the Kafka producer thread: {e}"),
        fatal: false,
    })
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
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat,
        ) => ErrorClass::Permanent,
        Some(C::Fatal) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// The Kafka uplink: forwards its buffer consumer to Kafka and acks what Kafka confirmed.
/// Build it with [`KafkaSink::new`], keep [`KafkaSink::status`], then spawn
/// [`KafkaSink::run`].
pub struct KafkaSink {
    cfg: KafkaUplink,
    client_config: ClientConfig,
    oauth: Option<Arc<TokenSource>>,
    producer: Kp,
    tracker: Arc<Tracker>,
    router: Arc<Router>,
    common: Common,
    status: UplinkStatus,
    /// The downlink's consumer, with `[uplinks.NAME.downlink]`.
    commands: Option<super::commands::Commands>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.cfg.brokers)
            .field("name", &self.common.name)
            .field("grace", &self.common.grace)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Builds the producer (librdkafka validates the configuration here; brokers are contacted
    /// later) and checks that the buffer has the uplink's consumer.
    pub fn new(cfg: &KafkaUplink, common: Common) -> Result<KafkaSink, KafkaSinkError> {
        // Fails early when the buffer was opened without the consumer.
        drop(common.reader()?);
        let conn = cfg.connection().map_err(|problems| {
            KafkaSinkError::Connection(
                problems
                    .iter()
                    .map(|p| format!("{} {}", p.key, p.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let mut secrets = Vec::new();
        let oauth = match &conn.auth {
            KafkaAuth::None => None,
            KafkaAuth::Password { password, .. } => {
                secrets.push(password.expose().to_owned());
                None
            }
            KafkaAuth::MskIam {
                region,
                keys,
                profile,
            } => {
                let keys = keys.as_ref().map(|(id, secret, token)| {
                    secrets.push(secret.expose().to_owned());
                    secrets.extend(token.iter().map(|t| t.expose().to_owned()));
                    Credentials {
                        access_key_id: id.clone(),
                        secret_access_key: secret.expose().to_owned(),
                        session_token: token.as_ref().map(|t| t.expose().to_owned()),
                    }
                });
                let configured = Configured {
                    keys,
                    profile: profile.clone(),
                };
                Some(Arc::new(
                    TokenSource::new(region, configured).map_err(KafkaSinkError::Token)?,
                ))
            }
        };
        let status = common.status(KIND, secrets);
        let commands = match (
            &cfg.downlink,
            common.downlink(cfg.downlink.is_some(), &status)?,
        ) {
            (Some(d), Some(downlink)) => Some(
                super::commands::Commands::new(
                    cfg,
                    d,
                    &conn,
                    oauth.clone(),
                    downlink,
                    &common,
                    &status,
                )
                .map_err(KafkaSinkError::Consumer)?,
            ),
            _ => None,
        };
        let client_config = client_config(cfg, &conn, &format!("ferry-{}", common.gateway_id));
        let tracker = Arc::new(Tracker::default());
        let producer = create_producer(&client_config, &status, &tracker, &oauth)
            .map_err(KafkaSinkError::Producer)?;
        // What the preset derived (brokers, topic, codec) is what routing and the logs use.
        let cfg = KafkaUplink {
            brokers: conn.brokers,
            topic: conn.topic,
            compression: conn.compression,
            ..cfg.clone()
        };
        Ok(KafkaSink {
            router: Arc::new(Router::new(&cfg)),
            cfg,
            client_config,
            oauth,
            producer,
            tracker,
            common,
            status,
            commands,
        })
    }

    /// The status handle (clone it before calling [`KafkaSink::run`]).
    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Forwards until `shutdown` resolves, then stops reading, waits up to the grace period for
    /// what is in flight, acks what was confirmed, and returns. Unconfirmed readings stay in
    /// the buffer. Returns early, with an error, only if the buffer cannot be read at all.
    /// With a downlink, its consumer runs beside, until the same shutdown.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), KafkaSinkError> {
        use futures_util::FutureExt;
        match self.commands.take() {
            None => self.forward(shutdown).await,
            Some(commands) => {
                let shutdown = shutdown.shared();
                let (forwarded, ()) =
                    tokio::join!(self.forward(shutdown.clone()), commands.run(shutdown));
                forwarded
            }
        }
    }

    /// The upward direction of [`KafkaSink::run`].
    async fn forward(self, shutdown: impl Future<Output = ()>) -> Result<(), KafkaSinkError> {
        let KafkaSink {
            cfg,
            client_config,
            oauth,
            producer,
            tracker,
            router,
            common,
            status,
            commands: _,
        } = self;
        let reader = common.reader()?;
        let (gateway_id, buffer, grace) = (common.gateway_id.clone(), &common.buffer, common.grace);
        let delivery = cfg.delivery;
        let layout = || Layout {
            router: router.clone(),
            gateway_id: gateway_id.clone(),
            delivery,
        };
        let gate = Arc::new(Gate::default());
        let mut producer = Arc::new(producer);
        let mut pump = Pump::spawn(producer.clone(), tracker.clone(), gate.clone(), layout())
            .map_err(KafkaSinkError::Thread)?;
        let max_segments = cfg.max_inflight_segments.max(1);
        let max_readings = cfg.max_inflight_readings.max(1) as u64;
        let max_bytes = feed::max_in_flight_bytes(buffer);
        let mut retry = Retry::new(cfg.initial_backoff_ms, cfg.max_backoff_ms);
        let sent_upto = reader.acked();
        let feed::Feed {
            segs: mut seg_rx,
            cmds: cmd_tx,
            acks: mut ack_rx,
            task: feed,
        } = feed::spawn(
            reader,
            buffer,
            // Each read brings about a quarter of the window: many small segments at once
            // (a slow site's backlog is made of them), a big one alone.
            ((max_readings / 4).max(1), (max_bytes / 4).max(1)),
            READ_AHEAD_SEGMENTS,
            status.clone(),
        );
        let mut run = Run {
            inflight: VecDeque::new(),
            in_flight_readings: 0,
            in_flight_bytes: 0,
            sent_upto,
            next_seq: 0,

            delivery,
            topics: common.topics.clone(),
            status: status.clone(),
            tracker: tracker.clone(),
            acks: feed::Acks::new(cmd_tx),
        };
        tokio::pin!(shutdown);
        tracing::info!(uplink = %common.name, brokers = %cfg.brokers, topic = %cfg.topic,
            "The Kafka uplink is starting.");

        enum Ev {
            Shutdown,
            Reports,
            Acked(Acked),
            Read(Option<feed::Batch>),
        }
        loop {
            // One segment may always be in flight, however large. While the upstream fails,
            // the window is a probe's ([`crate::retry::FAILING_WINDOW_READINGS`]): a long
            // outage must not keep a full window of readings (and librdkafka's copies of
            // them) in memory; the first ack opens it again.
            // (librdkafka says "all brokers down" at once, long before a message times out.)
            let max_readings = crate::retry::window_readings(&status, max_readings);
            let can_take = run.inflight.is_empty()
                || (run.inflight.len() < max_segments
                    && run.in_flight_readings < max_readings
                    && run.in_flight_bytes < max_bytes);
            let ev = tokio::select! {
                biased;
                () = &mut shutdown => Ev::Shutdown,
                () = tracker.wake.notified() => Ev::Reports,
                Some(a) = ack_rx.recv() => Ev::Acked(a),
                b = seg_rx.recv(), if can_take => Ev::Read(b),
            };
            let failure = match ev {
                Ev::Shutdown => break,
                Ev::Reports => run.settle(),
                Ev::Acked(a) => run.on_acked(a, &mut retry),
                Ev::Read(None) | Ev::Read(Some((_, Err(ReadError::Closed)))) => {
                    tracing::info!(uplink = %common.name, "The buffer closed; the Kafka uplink stops reading.");
                    break;
                }
                Ev::Read(Some((epoch, _))) if epoch != run.acks.epoch() => None,
                Ev::Read(Some((_, Ok(segs)))) => run.start(&pump, segs),
                Ev::Read(Some((_, Err(e)))) => Some(Failure {
                    message: format!("cannot read the buffer: {e}"),
                    fatal: false,
                }),
            };
            let Some(failure) = failure else {
                continue;
            };
            // A transient failure: nothing after the last ack counts any more. Stop what
            // librdkafka still holds (its queue is never our storage), wait, and send again
            // from the last acked segment.
            run.abandon();
            gate.abandon(run.acks.epoch(), &producer);
            let fatal = failure.fatal || producer.client().fatal_error().is_some();
            // librdkafka's "all brokers down" has already set the state to offline.
            let unreachable = status.state() == LinkState::Offline;
            let delay = retry.fail(&status, &failure.message, unreachable);
            if fatal {
                tracing::error!("The Kafka producer hit a fatal error and is rebuilt.");
            }
            // Acks already on their way still count while we wait.
            let mut sleep = std::pin::pin!(tokio::time::sleep(delay));
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        retire(pump, producer).await;
                        drop(run);
                        feed::finish(feed, tokio::time::Instant::now() + grace, &common.name).await;
                        return Ok(());
                    }
                    Some(a) = ack_rx.recv() => {
                        // A failed ack of this epoch is covered by the rewind to come.
                        let _ = run.on_acked(a, &mut retry);
                    }
                    () = &mut sleep => break,
                }
            }
            if fatal {
                retire(pump, producer).await;
                (producer, pump) = loop {
                    let started = create_producer(&client_config, &status, &tracker, &oauth)
                        .map_err(|e| format!("cannot rebuild the Kafka producer: {e}"))
                        .map(Arc::new)
                        .and_then(|p| {
                            start_pump(&p, &tracker, &gate, layout())
                                .map(|pump| (p, pump))
                                .map_err(|f| f.message)
                        });
                    match started {
                        Ok(started) => break started,
                        Err(message) => {
                            let delay = retry.fail(&status, &message, true);
                            tokio::select! {
                                biased;
                                () = &mut shutdown => {
                                    drop(run);
                                    feed::finish(feed, tokio::time::Instant::now() + grace, &common.name).await;
                                    return Ok(());
                                }
                                () = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                };
            }
            // Queued behind the acks sent before it, so it goes back to the last committed one.
            run.acks.rewind();
        }

        // Shutdown: no new segments; settle what completes within the grace period.
        let deadline = tokio::time::Instant::now() + grace;
        drop(seg_rx);
        while !run.inflight.is_empty() || run.acks.pending() > 0 {
            let failure = tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => break,
                () = tracker.wake.notified() => run.settle(),
                Some(a) = ack_rx.recv() => run.on_acked(a, &mut retry),
            };
            if failure.is_some() {
                break;
            }
        }
        if !run.inflight.is_empty() {
            tracing::warn!(
                uplink = %common.name,
                segments = run.inflight.len(),
                readings = run.in_flight_readings,
                "Shutdown grace ran out; unconfirmed Kafka deliveries stay in the buffer."
            );
        }
        run.abandon();
        gate.abandon(run.acks.epoch(), &producer);
        retire(pump, producer).await;
        drop(run);
        feed::finish(feed, deadline, &common.name).await;
        tracing::info!(uplink = %common.name, "The Kafka uplink stopped.");
        Ok(())
    }
}

impl_uplink!(KafkaSink, KIND);

/// Segments the buffer task reads ahead of the producer.
const READ_AHEAD_SEGMENTS: usize = 2;

/// One segment handed to the producer thread.
struct InFlight {
    seg: Arc<Segment>,
    sel: Selection,
}

/// The mutable state of one run.
struct Run {
    /// Segments in flight, oldest first; the tracker holds their reports in the same order.
    inflight: VecDeque<InFlight>,
    in_flight_readings: u64,
    /// Stored bytes of the segments in flight.
    in_flight_bytes: u64,
    /// Highest segment id handed to the producer; sending one at or below it again is a re-send.
    sent_upto: u64,
    /// Sequence number of the next record.
    next_seq: usize,
    delivery: Delivery,
    topics: crate::topics::TopicFilter,
    status: UplinkStatus,
    tracker: Arc<Tracker>,
    /// Acks to the buffer task, and the epoch (bumped at every abandon: segments read before
    /// it are not sent).
    acks: feed::Acks,
}

impl Run {
    fn start(&mut self, pump: &Pump, segs: Vec<Segment>) -> Option<Failure> {
        let mut resent = 0;
        let mut failure = None;
        for seg in segs {
            let n = seg.readings.len() as u64;
            if seg.id <= self.sent_upto {
                resent += n;
            }
            self.sent_upto = self.sent_upto.max(seg.id);
            self.in_flight_readings += n;
            self.in_flight_bytes += seg.stored.len() as u64;
            let sel = if self.delivery == Delivery::Segment {
                Selection::Whole
            } else {
                self.topics.select(&seg)
            };
            let len = sel.records(seg.readings.len());
            let first = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(len);
            self.tracker.register(first, len);
            let seg = Arc::new(seg);
            self.inflight.push_back(InFlight {
                seg: seg.clone(),
                sel: sel.clone(),
            });
            if len == 0 {
                // Nothing this uplink takes: settled already, no report will wake the loop.
                self.tracker.wake.notify_one();
                continue;
            }
            let job = Job {
                epoch: self.acks.epoch(),
                seg,
                sel,
                first,
                len,
            };
            if !pump.send(job) && failure.is_none() {
                failure = Some(Failure {
                    message: "the Kafka producer thread stopped".into(),
                    fatal: true,
                });
            }
        }
        self.status.record_resent(resent);
        self.status.set_in_flight(self.in_flight_readings);
        failure
    }

    fn abandon(&mut self) {
        self.tracker.clear();
        self.inflight.clear();
        self.in_flight_readings = 0;
        self.in_flight_bytes = 0;
        self.acks.abandon();
        self.status.set_in_flight(0);
    }

    /// Settles the oldest segments whose reports are complete, in segment order, and sends
    /// one ack (with their dead letters) for them to the buffer task. Returns the first
    /// transient failure met, after settling the segments before it.
    fn settle(&mut self) -> Option<Failure> {
        let mut done = Vec::new();
        let mut failure = None;
        {
            let mut segs = self.tracker.lock();
            while segs.front().is_some_and(|s| s.track.settled()) {
                let Some(s) = segs.pop_front() else { break };
                if s.track.failure.is_some() {
                    failure = s.track.failure;
                    break;
                }
                done.push(s.track);
            }
        }
        if done.is_empty() {
            return failure;
        }
        let mut settled = Settled::default();
        for track in done {
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            // The producer thread is done with a settled segment: this is the last reference.
            let seg = Arc::try_unwrap(f.seg).unwrap_or_else(|seg| (*seg).clone());
            self.in_flight_readings -= seg.readings.len() as u64;
            self.in_flight_bytes -= seg.stored.len() as u64;
            settled.add(seg, &f.sel, track);
        }
        self.status.set_in_flight(self.in_flight_readings);
        if let Err(e) = self.acks.send(&self.status, settled) {
            return Some(ack_failure(e));
        }
        failure
    }

    /// Notes an answer of the buffer task. Returns a failure when an ack of the current epoch
    /// could not be committed.
    fn on_acked(&mut self, a: Acked, retry: &mut Retry) -> Option<Failure> {
        match self.acks.answered(a) {
            Ok(true) => {
                retry.progress_on(&self.status);
                None
            }
            Ok(false) => None,
            Err(e) => Some(ack_failure(e)),
        }
    }
}

fn ack_failure(e: AckError) -> Failure {
    Failure {
        message: format!("cannot record the ack in the buffer: {e}"),
        fatal: false,
    }
}
