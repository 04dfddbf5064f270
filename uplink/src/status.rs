//! The status handle every uplink updates and the status page reads.
//!
//! [`UplinkStatus`] is cheap to clone (an `Arc`); the uplink task records events on it and the
//! status page calls [`UplinkStatus::snapshot`], or [`report`] to add the buffer lag, an ETA
//! and the stalled decision. Counters are also emitted as metrics, per event batch:
//!
//! | metric                                   | kind    | meaning                                   |
//! |------------------------------------------|---------|-------------------------------------------|
//! | `ferry_uplink_acked_total{uplink}`       | counter | readings confirmed upstream and acked     |
//! | `ferry_uplink_retries_total{uplink}`     | counter | transient failures that led to a retry    |
//! | `ferry_uplink_dead_lettered_total{uplink}` | counter | readings moved to the dead-letter table |
//! | `ferry_uplink_resent_total{uplink}`      | counter | readings sent again after a retry         |
//! | `ferry_uplink_in_flight_readings{uplink}`| gauge   | readings handed to the producer, unacked  |
//! | `ferry_uplink_state{uplink}`             | gauge   | 0 connecting, 1 connected, 2 backing_off, 3 offline |

use ferry_buffer::{Buffer, ReadError, now_ms};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// The drain rate is averaged over this sliding window.
pub const DRAIN_WINDOW: Duration = Duration::from_secs(10);

/// An uplink with unsent readings that has acked nothing for this long is reported stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(60);

/// The connection state of an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
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
    /// Transient failures that led to a backoff and a retry.
    pub retried_total: u64,
    /// Readings moved to the dead-letter table.
    pub dead_lettered_total: u64,
    /// Readings sent again after a retry. Each may or may not be a duplicate upstream
    /// (consumers de-duplicate by `ferry-id`).
    pub resent_total: u64,
    /// Readings handed to the upstream client and not yet acked.
    pub in_flight_readings: u64,
    /// Readings acked per second over the last [`DRAIN_WINDOW`].
    pub drain_rate: f64,
    /// Milliseconds since the last ack (or since the uplink started, if none yet). The input of
    /// the stalled decision in [`report`].
    pub ms_since_progress: u64,
}

/// A snapshot plus the buffer lag, as shown on the status page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UplinkReport {
    /// The uplink's own status.
    #[serde(flatten)]
    pub status: UplinkSnapshot,
    /// Readings not yet acked by this uplink.
    pub lag_readings: u64,
    /// Their stored bytes.
    pub lag_bytes: u64,
    /// When the oldest unsent reading was received, in ms since the epoch.
    pub oldest_unsent_ms: Option<u64>,
    /// Its age in ms.
    pub oldest_unsent_age_ms: Option<u64>,
    /// Seconds to drain the lag at the current drain rate, when the rate is positive.
    pub eta_secs: Option<f64>,
    /// Unsent readings and no progress for [`STALL_AFTER`].
    pub stalled: bool,
}

#[derive(Debug)]
struct State {
    state: LinkState,
    last_error: Option<String>,
    last_ack_ms: Option<u64>,
    next_retry_ms: Option<u64>,
    acked_total: u64,
    retried_total: u64,
    dead_lettered_total: u64,
    resent_total: u64,
    in_flight: u64,
    started: Instant,
    last_progress: Instant,
    window: VecDeque<(Instant, u64)>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    secrets: Vec<String>,
    state: Mutex<State>,
}

/// A cloneable handle on one uplink's status.
#[derive(Debug, Clone)]
pub struct UplinkStatus {
    inner: Arc<Inner>,
}

impl UplinkStatus {
    /// A fresh status in state `connecting`. `secrets` (passwords, tokens) are replaced by
    /// `***` in every recorded error.
    pub fn new(name: impl Into<String>, secrets: Vec<String>) -> Self {
        let now = Instant::now();
        let s = UplinkStatus {
            inner: Arc::new(Inner {
                name: name.into(),
                secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
                state: Mutex::new(State {
                    state: LinkState::Connecting,
                    last_error: None,
                    last_ack_ms: None,
                    next_retry_ms: None,
                    acked_total: 0,
                    retried_total: 0,
                    dead_lettered_total: 0,
                    resent_total: 0,
                    in_flight: 0,
                    started: now,
                    last_progress: now,
                    window: VecDeque::new(),
                }),
            }),
        };
        s.gauge_state(LinkState::Connecting);
        s
    }

    /// The uplink's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gauge_state(&self, s: LinkState) {
        metrics::gauge!("ferry_uplink_state", "uplink" => self.inner.name.clone())
            .set(s.gauge_value());
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
                g.next_retry_ms = None;
            }
            changed
        };
        if changed {
            self.gauge_state(state);
        }
    }

    /// Records an error without changing the state (e.g. a client-level warning).
    pub fn set_error(&self, error: &str) {
        let e = self.scrub(error);
        self.lock().last_error = Some(e);
    }

    /// Records that `readings` were confirmed upstream and acked in the buffer.
    pub fn record_acked(&self, readings: u64) {
        let now = Instant::now();
        let changed = {
            let mut g = self.lock();
            g.acked_total += readings;
            g.last_ack_ms = Some(now_ms());
            g.last_progress = now;
            g.window.push_back((now, readings));
            prune(&mut g.window, now);
            let changed = g.state != LinkState::Connected;
            g.state = LinkState::Connected;
            g.next_retry_ms = None;
            changed
        };
        if changed {
            self.gauge_state(LinkState::Connected);
        }
        metrics::counter!("ferry_uplink_acked_total", "uplink" => self.inner.name.clone())
            .increment(readings);
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
            g.next_retry_ms = Some(now_ms() + retry_in.as_millis() as u64);
            let changed = g.state != state;
            g.state = state;
            changed
        };
        if changed {
            self.gauge_state(state);
        }
        metrics::counter!("ferry_uplink_retries_total", "uplink" => self.inner.name.clone())
            .increment(1);
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
            state: g.state,
            last_error: g.last_error.clone(),
            last_ack_ms: g.last_ack_ms,
            next_retry_ms: g.next_retry_ms,
            acked_total: g.acked_total,
            retried_total: g.retried_total,
            dead_lettered_total: g.dead_lettered_total,
            resent_total: g.resent_total,
            in_flight_readings: g.in_flight,
            drain_rate: sum as f64 / span.as_secs_f64(),
            ms_since_progress: now.duration_since(g.last_progress).as_millis() as u64,
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

/// The status snapshot combined with the uplink's lag in `buffer` (the status name is the
/// buffer consumer name), the ETA and the stalled decision.
pub async fn report(status: &UplinkStatus, buffer: &Buffer) -> Result<UplinkReport, ReadError> {
    let lag = buffer.lag(status.name()).await?;
    let snap = status.snapshot();
    Ok(combine(snap, lag, now_ms()))
}

fn combine(snap: UplinkSnapshot, lag: ferry_buffer::Lag, now: u64) -> UplinkReport {
    let eta_secs = (snap.drain_rate > 0.0).then(|| lag.readings as f64 / snap.drain_rate);
    let stalled = lag.readings > 0 && snap.ms_since_progress >= STALL_AFTER.as_millis() as u64;
    UplinkReport {
        lag_readings: lag.readings,
        lag_bytes: lag.bytes,
        oldest_unsent_ms: lag.oldest_received_ms,
        oldest_unsent_age_ms: lag.oldest_received_ms.map(|o| now.saturating_sub(o)),
        eta_secs,
        stalled,
        status: snap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_rate_is_a_sliding_window() {
        let s = UplinkStatus::new("kafka", vec![]);
        assert_eq!(s.snapshot().drain_rate, 0.0);
        // 1000 readings per second for 20 s.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            s.record_acked(1000);
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
        let s = UplinkStatus::new("kafka", vec![]);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.record_acked(500);
        let r = s.snapshot().drain_rate;
        assert!((r - 250.0).abs() < 1.0, "{r}");
    }

    #[tokio::test]
    async fn states_errors_and_secrets() {
        let s = UplinkStatus::new("kafka", vec!["hunter2".into(), String::new()]);
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
        s.record_acked(3);
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

    #[test]
    fn snapshot_serializes_snake_case() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _g = rt.enter();
        let s = UplinkStatus::new("kafka", vec![]);
        s.record_retry("x", Duration::from_secs(1), false);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["state"], "backing_off");
        assert_eq!(v["name"], "kafka");
        s.record_retry("x", Duration::from_secs(1), true);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["state"], "offline");
    }

    #[test]
    fn stalled_and_eta() {
        let snap = |rate: f64, since: u64| UplinkSnapshot {
            name: "kafka".into(),
            state: LinkState::Offline,
            last_error: None,
            last_ack_ms: None,
            next_retry_ms: None,
            acked_total: 0,
            retried_total: 0,
            dead_lettered_total: 0,
            resent_total: 0,
            in_flight_readings: 0,
            drain_rate: rate,
            ms_since_progress: since,
        };
        let lag = ferry_buffer::Lag {
            readings: 1000,
            bytes: 10,
            segments: 1,
            oldest_received_ms: Some(1_000),
        };
        let r = combine(snap(0.0, 61_000), lag, 5_000);
        assert!(r.stalled);
        assert_eq!(r.eta_secs, None);
        assert_eq!(r.oldest_unsent_age_ms, Some(4_000));
        let r = combine(snap(100.0, 1_000), lag, 5_000);
        assert!(!r.stalled);
        assert_eq!(r.eta_secs, Some(10.0));
        let r = combine(snap(0.0, 600_000), ferry_buffer::Lag::default(), 5_000);
        assert!(!r.stalled, "nothing to send is not a stall");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["lag_readings"], 0);
        assert_eq!(v["state"], "offline");
    }
}
