//! The status handle every uplink updates and the status page reads.
//!
//! [`UplinkStatus`] is cheap to clone (an `Arc`); the uplink task records events on it and the
//! status page calls [`UplinkStatus::snapshot`] (and adds the buffer lag, the ETA and the
//! stalled decision itself, in the gateway's status module). Counters are also emitted as
//! metrics, per event batch; [`describe_metrics`] holds what each one means (the `HELP` text
//! on `/metrics`).

use ferry_buffer::clock;
#[cfg(test)]
use ferry_buffer::now_ms;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// The drain rate is averaged over this sliding window.
pub const DRAIN_WINDOW: Duration = Duration::from_secs(10);

/// The connection state of an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Started, nothing confirmed yet.
    Connecting,
    /// The last delivery was confirmed.
    Connected,
    /// A delivery failed; waiting before the next try.
    BackingOff,
    /// Repeated failures, or the client reports every broker down.
    Offline,
}

impl LinkState {
    /// The value of the `ferry_uplink_state` gauge.
    pub fn gauge_value(self) -> f64 {
        match self {
            LinkState::Connecting => 0.0,
            LinkState::Connected => 1.0,
            LinkState::BackingOff => 2.0,
            LinkState::Offline => 3.0,
        }
    }
}

/// A point-in-time copy of an uplink's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UplinkSnapshot {
    /// The uplink's name (also its buffer consumer name), e.g. `"kafka"`.
    pub name: String,
    /// The uplink's type, e.g. `"kafka"` or `"mqtt"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Connection state.
    pub state: LinkState,
    /// The most recent error, with secrets removed.
    pub last_error: Option<String>,
    /// When a delivery was last confirmed, in ms since the epoch.
    pub last_ack_ms: Option<u64>,
    /// When the next retry is due, in ms since the epoch, while backing off.
    pub next_retry_ms: Option<u64>,
    /// Readings confirmed upstream and acked in the buffer.
    pub acked_total: u64,
    /// Readings the uplink's `topics` do not take, acked without sending.
    pub skipped_total: u64,
    /// Transient failures that led to a backoff and a retry.
    pub retried_total: u64,
    /// Records the upstream did not take because it was over its rate (sent again).
    pub throttled_total: u64,
    /// Readings moved to the dead-letter table.
    pub dead_lettered_total: u64,
    /// Readings sent again after a retry. Each may or may not be a duplicate upstream
    /// (consumers de-duplicate by `ferry-id`).
    pub resent_total: u64,
    /// Readings handed to the upstream client and not yet acked.
    pub in_flight_readings: u64,
    /// Readings acked per second (confirmed or skipped: the speed of the buffer cursor) over
    /// the last [`DRAIN_WINDOW`].
    pub drain_rate: f64,
    /// Milliseconds since the last ack (or since the uplink started, if none yet): the input
    /// of the status page's stalled decision.
    pub ms_since_progress: u64,
    /// Commands from the cloud, for an uplink with a `downlink`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downlink: Option<DownlinkSnapshot>,
}

/// What came down an uplink ([`crate::downlink`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DownlinkSnapshot {
    /// Whether commands can come down now: MQTT, the broker accepted the subscriptions;
    /// Kafka, the consumer group assigned partitions to this gateway.
    pub ready: bool,
    /// Commands received and settled: handed over or refused.
    pub received_total: u64,
    /// Commands handed over to the local broker.
    pub handed_over_total: u64,
    /// Of those, commands that reached no subscriber and were not retained.
    pub unrouted_total: u64,
    /// Commands refused for good (acknowledged upstream and skipped).
    pub refused_total: u64,
    /// Refused commands by reason ([`crate::downlink::Refusal::label`]).
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// When the last command was received, in ms since the epoch.
    pub last_command_ms: Option<u64>,
    /// Kafka: records for other gateways, skipped.
    pub other_gateways_total: u64,
}

#[derive(Debug, Default)]
struct DownlinkCounts {
    snap: DownlinkSnapshot,
    /// Boot-clock instant of the last command.
    last_bt: Option<u64>,
}

#[derive(Debug)]
struct State {
    state: LinkState,
    last_error: Option<String>,
    /// Boot-clock instants (ferry_buffer::clock), so ages survive a step of the wall clock.
    last_ack_bt: Option<u64>,
    next_retry_bt: Option<u64>,
    acked_total: u64,
    skipped_total: u64,
    retried_total: u64,
    throttled_total: u64,
    dead_lettered_total: u64,
    resent_total: u64,
    in_flight: u64,
    started: Instant,
    last_progress: Instant,
    window: VecDeque<(Instant, u64)>,
    downlink: Option<DownlinkCounts>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    kind: &'static str,
    secrets: Vec<String>,
    state: Mutex<State>,
    /// The buffer, for how much waits ([`UplinkStatus::buffer_readings`]).
    buffer: std::sync::OnceLock<ferry_buffer::Buffer>,
}

/// A cloneable handle on one uplink's status.
#[derive(Debug, Clone)]
pub struct UplinkStatus {
    inner: Arc<Inner>,
}

impl UplinkStatus {
    /// A fresh status in state `connecting` for the uplink `name` of type `kind`. `secrets`
    /// (passwords, tokens) are replaced by `***` in every recorded error.
    pub fn new(name: impl Into<String>, kind: &'static str, secrets: Vec<String>) -> Self {
        let now = Instant::now();
        let s = UplinkStatus {
            inner: Arc::new(Inner {
                name: name.into(),
                kind,
                secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
                state: Mutex::new(State {
                    state: LinkState::Connecting,
                    last_error: None,
                    last_ack_bt: None,
                    next_retry_bt: None,
                    acked_total: 0,
                    skipped_total: 0,
                    retried_total: 0,
                    throttled_total: 0,
                    dead_lettered_total: 0,
                    resent_total: 0,
                    in_flight: 0,
                    started: now,
                    last_progress: now,
                    window: VecDeque::new(),
                    downlink: None,
                }),
                buffer: std::sync::OnceLock::new(),
            }),
        };
        s.gauge_state(LinkState::Connecting);
        s
    }

    /// The same status, telling how much waits in `buffer`.
    pub fn with_buffer(self, buffer: ferry_buffer::Buffer) -> Self {
        let _ = self.inner.buffer.set(buffer);
        self
    }

    /// Readings waiting in the buffer (for every uplink), if the buffer is known: what the
    /// failure summary says waits ([`crate::retry`]).
    pub fn buffer_readings(&self) -> Option<u64> {
        self.inner.buffer.get().map(|b| b.stats().readings)
    }

    /// The uplink's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The uplink's type.
    pub fn kind(&self) -> &'static str {
        self.inner.kind
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gauge_state(&self, s: LinkState) {
        metrics::gauge!("ferry_uplink_state", "uplink" => self.inner.name.clone())
            .set(s.gauge_value());
    }

    /// A state change: its gauge, and for a change to `backing_off` or `offline` one log line
    /// with the error (changes come at most once per retry, which backs off; the recovery is
    /// logged by [`crate::retry`]).
    fn changed_to(&self, s: LinkState) {
        self.gauge_state(s);
        if matches!(s, LinkState::BackingOff | LinkState::Offline) {
            let error = self.lock().last_error.clone().unwrap_or_default();
            tracing::info!(uplink = %self.inner.name, r#type = self.inner.kind, state = ?s,
                error = %error, "The uplink's state changed.");
        }
    }

    /// Removes every registered secret from `msg`.
    pub fn scrub(&self, msg: &str) -> String {
        let mut out = msg.to_string();
        for s in &self.inner.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        self.lock().state
    }

    /// Sets the state (and its gauge).
    pub fn set_state(&self, state: LinkState) {
        let changed = {
            let mut g = self.lock();
            let changed = g.state != state;
            g.state = state;
            if state == LinkState::Connected {
                g.next_retry_bt = None;
            }
            changed
        };
        if changed {
            self.changed_to(state);
        }
    }

    /// Records an error without changing the state (e.g. a client-level warning).
    pub fn set_error(&self, error: &str) {
        let e = self.scrub(error);
        self.lock().last_error = Some(e);
    }

    /// Records an ack committed in the buffer: `delivered` readings the upstream confirmed and
    /// `skipped` ones the uplink does not take. Both move the cursor (the drain rate and the
    /// stalled decision count them); only a confirmation proves the link works (last ack,
    /// state `connected`).
    pub fn record_acked(&self, delivered: u64, skipped: u64) {
        let now = Instant::now();
        let changed = {
            let mut g = self.lock();
            g.acked_total += delivered;
            g.skipped_total += skipped;
            if delivered + skipped > 0 {
                g.last_progress = now;
                g.window.push_back((now, delivered + skipped));
                prune(&mut g.window, now);
            }
            if delivered == 0 {
                false
            } else {
                g.last_ack_bt = Some(clock::boottime_ms());
                let changed = g.state != LinkState::Connected;
                g.state = LinkState::Connected;
                g.next_retry_bt = None;
                changed
            }
        };
        if changed {
            self.changed_to(LinkState::Connected);
        }
        if delivered > 0 {
            metrics::counter!("ferry_uplink_acked_total", "uplink" => self.inner.name.clone())
                .increment(delivered);
        }
        if skipped > 0 {
            metrics::counter!("ferry_uplink_skipped_total", "uplink" => self.inner.name.clone())
                .increment(skipped);
        }
    }

    /// Records a transient failure: state `backing_off` (or `offline` when `offline`), the
    /// error, and the time of the next try.
    pub fn record_retry(&self, error: &str, retry_in: Duration, offline: bool) {
        let e = self.scrub(error);
        let state = if offline {
            LinkState::Offline
        } else {
            LinkState::BackingOff
        };
        let changed = {
            let mut g = self.lock();
            g.retried_total += 1;
            g.last_error = Some(e);
            g.next_retry_bt = Some(clock::boottime_ms() + retry_in.as_millis() as u64);
            let changed = g.state != state;
            g.state = state;
            changed
        };
        if changed {
            self.changed_to(state);
        }
        metrics::counter!("ferry_uplink_retries_total", "uplink" => self.inner.name.clone())
            .increment(1);
    }

    /// Records `n` records the upstream refused for its rate (they are sent again).
    pub fn record_throttled(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.lock().throttled_total += n;
        metrics::counter!("ferry_uplink_throttled_total", "uplink" => self.inner.name.clone())
            .increment(n);
    }

    /// Records readings moved to the dead-letter table.
    pub fn record_dead_lettered(&self, readings: u64, reason: &str) {
        if readings == 0 {
            return;
        }
        let e = self.scrub(reason);
        {
            let mut g = self.lock();
            g.dead_lettered_total += readings;
            g.last_error = Some(e);
            g.last_progress = Instant::now();
        }
        metrics::counter!("ferry_uplink_dead_lettered_total", "uplink" => self.inner.name.clone())
            .increment(readings);
    }

    /// Records readings sent again after a retry.
    pub fn record_resent(&self, readings: u64) {
        if readings == 0 {
            return;
        }
        self.lock().resent_total += readings;
        metrics::counter!("ferry_uplink_resent_total", "uplink" => self.inner.name.clone())
            .increment(readings);
    }

    /// Sets the number of readings in flight.
    pub fn set_in_flight(&self, readings: u64) {
        self.lock().in_flight = readings;
        metrics::gauge!("ferry_uplink_in_flight_readings", "uplink" => self.inner.name.clone())
            .set(readings as f64);
    }

    /// Shows downlink counters from now on (the uplink has a `downlink`), not ready yet.
    pub fn enable_downlink(&self) {
        self.lock().downlink.get_or_insert_with(Default::default);
        metrics::gauge!("ferry_downlink_ready", "uplink" => self.inner.name.clone()).set(0.0);
    }

    /// Whether commands can come down now ([`DownlinkSnapshot::ready`]); logged when it
    /// changes.
    pub fn set_downlink_ready(&self, ready: bool, why: &str) {
        let changed = {
            let mut g = self.lock();
            let d = g.downlink.get_or_insert_with(Default::default);
            let changed = d.snap.ready != ready;
            d.snap.ready = ready;
            changed
        };
        metrics::gauge!("ferry_downlink_ready", "uplink" => self.inner.name.clone())
            .set(if ready { 1.0 } else { 0.0 });
        if changed {
            tracing::info!(uplink = %self.inner.name, ready, detail = why,
                "The uplink's downlink changed state.");
        }
    }

    /// Records `n` Kafka records for other gateways, skipped.
    pub fn record_other_gateways(&self, n: u64) {
        let mut g = self.lock();
        g.downlink
            .get_or_insert_with(Default::default)
            .snap
            .other_gateways_total += n;
    }

    /// Records one command: handed over (`Ok`), or refused for good with its reason.
    pub fn record_command(
        &self,
        outcome: Result<&crate::downlink::HandedOver, crate::downlink::Refusal>,
    ) {
        let name = self.inner.name.clone();
        let now_bt = clock::boottime_ms();
        {
            let mut g = self.lock();
            let d = g.downlink.get_or_insert_with(Default::default);
            d.snap.received_total += 1;
            d.last_bt = Some(now_bt);
            match outcome {
                Ok(h) => {
                    d.snap.handed_over_total += 1;
                    if h.queued == 0 && !h.retained {
                        d.snap.unrouted_total += 1;
                    }
                }
                Err(why) => {
                    d.snap.refused_total += 1;
                    *d.snap.refused.entry(why.label()).or_default() += 1;
                }
            }
        }
        match outcome {
            Ok(h) => {
                metrics::counter!("ferry_downlink_commands_total", "uplink" => name.clone())
                    .increment(1);
                if h.queued == 0 && !h.retained {
                    metrics::counter!("ferry_downlink_unrouted_total", "uplink" => name.clone())
                        .increment(1);
                }
            }
            Err(why) => {
                metrics::counter!("ferry_downlink_refused_total", "uplink" => name.clone(),
                    "reason" => why.label())
                .increment(1);
            }
        }
        metrics::gauge!("ferry_downlink_last_command_timestamp_seconds", "uplink" => name)
            .set(clock::wall_of_boottime(now_bt) as f64 / 1000.0);
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> UplinkSnapshot {
        let now = Instant::now();
        let mut g = self.lock();
        prune(&mut g.window, now);
        let span = now
            .duration_since(g.started)
            .clamp(Duration::from_secs(1), DRAIN_WINDOW);
        let sum: u64 = g.window.iter().map(|e| e.1).sum();
        UplinkSnapshot {
            name: self.inner.name.clone(),
            kind: self.inner.kind,
            state: g.state,
            last_error: g.last_error.clone(),
            last_ack_ms: g.last_ack_bt.map(clock::wall_of_boottime),
            next_retry_ms: g.next_retry_bt.map(clock::wall_of_future_boottime),
            acked_total: g.acked_total,
            skipped_total: g.skipped_total,
            retried_total: g.retried_total,
            throttled_total: g.throttled_total,
            dead_lettered_total: g.dead_lettered_total,
            resent_total: g.resent_total,
            in_flight_readings: g.in_flight,
            drain_rate: sum as f64 / span.as_secs_f64(),
            ms_since_progress: now.duration_since(g.last_progress).as_millis() as u64,
            downlink: g.downlink.as_ref().map(|d| DownlinkSnapshot {
                last_command_ms: d.last_bt.map(clock::wall_of_boottime),
                ..d.snap.clone()
            }),
        }
    }
}

fn prune(window: &mut VecDeque<(Instant, u64)>, now: Instant) {
    while let Some((t, _)) = window.front() {
        if now.duration_since(*t) > DRAIN_WINDOW {
            window.pop_front();
        } else {
            break;
        }
    }
}

/// The `HELP` text and unit of every metric the uplinks emit (labels: `uplink`).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "ferry_uplink_acked_total",
        Unit::Count,
        "Readings the upstream confirmed and the uplink acked in the buffer."
    );
    describe_counter!(
        "ferry_uplink_skipped_total",
        Unit::Count,
        "Readings the uplink's topics filter does not take, acked without sending."
    );
    describe_counter!(
        "ferry_uplink_retries_total",
        Unit::Count,
        "Transient delivery failures that led to a retry."
    );
    describe_counter!(
        "ferry_uplink_throttled_total",
        Unit::Count,
        "Records the upstream refused for its rate and that were sent again."
    );
    describe_counter!(
        "ferry_uplink_dead_lettered_total",
        Unit::Count,
        "Readings the upstream refused for good, moved to the dead-letter table."
    );
    describe_counter!(
        "ferry_uplink_resent_total",
        Unit::Count,
        "Readings sent again after a retry (each may be a duplicate upstream)."
    );
    describe_gauge!(
        "ferry_uplink_in_flight_readings",
        Unit::Count,
        "Readings sent and not yet confirmed by the upstream."
    );
    describe_counter!(
        "ferry_downlink_commands_total",
        Unit::Count,
        "Commands from the cloud handed over to the local MQTT broker (then acknowledged upstream)."
    );
    describe_counter!(
        "ferry_downlink_unrouted_total",
        Unit::Count,
        "Commands handed over that reached no local subscriber and were not retained."
    );
    describe_counter!(
        "ferry_downlink_refused_total",
        Unit::Count,
        "Commands refused for good (no route, no or invalid topic, too large, forbidden by the ACL), acknowledged upstream and skipped."
    );
    describe_gauge!(
        "ferry_downlink_ready",
        "1 while commands can come down the uplink (MQTT: the broker accepted the downlink subscriptions; Kafka: the consumer group assigned partitions), else 0."
    );
    describe_gauge!(
        "ferry_downlink_last_command_timestamp_seconds",
        Unit::Seconds,
        "When the uplink last received a command, in seconds since the epoch."
    );
    describe_gauge!(
        "ferry_uplink_state",
        "Link state: 0 connecting, 1 connected, 2 backing off, 3 offline."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_rate_is_a_sliding_window() {
        let s = UplinkStatus::new("kafka", "kafka", vec![]);
        assert_eq!(s.snapshot().drain_rate, 0.0);
        // 1000 readings per second for 20 s.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            s.record_acked(1000, 0);
        }
        let snap = s.snapshot();
        assert_eq!(snap.acked_total, 20_000);
        assert!(
            (snap.drain_rate - 1000.0).abs() < 101.0,
            "{}",
            snap.drain_rate
        );
        // Nothing for 11 s: the window empties.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.snapshot().drain_rate, 0.0);
        assert_eq!(s.snapshot().ms_since_progress, 11_000);
    }

    #[tokio::test(start_paused = true)]
    async fn early_rate_uses_the_elapsed_time_not_the_whole_window() {
        let s = UplinkStatus::new("kafka", "kafka", vec![]);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.record_acked(500, 0);
        let r = s.snapshot().drain_rate;
        assert!((r - 250.0).abs() < 1.0, "{r}");
    }

    #[tokio::test]
    async fn states_errors_and_secrets() {
        let s = UplinkStatus::new("kafka", "kafka", vec!["hunter2".into(), String::new()]);
        assert_eq!(s.state(), LinkState::Connecting);
        s.record_retry(
            "SASL authentication failed for password hunter2",
            Duration::from_secs(5),
            false,
        );
        let snap = s.snapshot();
        assert_eq!(snap.state, LinkState::BackingOff);
        assert_eq!(snap.retried_total, 1);
        let err = snap.last_error.unwrap();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("***"));
        let due = snap.next_retry_ms.unwrap();
        assert!(due >= now_ms() + 4000 && due <= now_ms() + 5000);
        s.record_retry("all brokers down", Duration::from_secs(1), true);
        assert_eq!(s.state(), LinkState::Offline);
        s.record_acked(3, 0);
        let snap = s.snapshot();
        assert_eq!(snap.state, LinkState::Connected);
        assert_eq!(snap.next_retry_ms, None);
        assert!(snap.last_ack_ms.is_some());
        s.record_dead_lettered(2, "too big");
        s.record_resent(7);
        s.set_in_flight(11);
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.dead_lettered_total,
                snap.resent_total,
                snap.in_flight_readings
            ),
            (2, 7, 11)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn skipped_readings_move_the_cursor_but_prove_no_link() {
        let s = UplinkStatus::new("alarms", "mqtt", vec![]);
        tokio::time::advance(Duration::from_secs(5)).await;
        s.record_acked(0, 40);
        let snap = s.snapshot();
        assert_eq!((snap.acked_total, snap.skipped_total), (0, 40));
        assert_eq!(snap.state, LinkState::Connecting, "nothing was confirmed");
        assert_eq!(snap.last_ack_ms, None);
        assert_eq!(snap.ms_since_progress, 0, "the cursor moved");
        assert!((snap.drain_rate - 8.0).abs() < 0.01, "{}", snap.drain_rate);
        s.record_acked(2, 0);
        assert_eq!(s.snapshot().state, LinkState::Connected);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["skipped_total"].as_u64()),
            (Some("mqtt"), Some(40))
        );
    }

    #[test]
    fn snapshot_serializes_snake_case() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _g = rt.enter();
        let s = UplinkStatus::new("kafka", "kafka", vec![]);
        s.record_retry("x", Duration::from_secs(1), false);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["state"], "backing_off");
        assert_eq!(v["name"], "kafka");
        s.record_retry("x", Duration::from_secs(1), true);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["state"], "offline");
    }
}
