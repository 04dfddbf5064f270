//! The retry policy every uplink shares.
//!
//! After a transient failure an uplink drops what its client still holds, waits, and sends
//! again from the last ack. The wait is drawn from [`Backoff`] (exponential, full jitter, from
//! the uplink's `initial_backoff_ms` up to `max_backoff_ms`).
//!
//! - **State.** Each failure sets the uplink `backing_off`; after [`OFFLINE_AFTER_FAILURES`]
//!   failures in a row, or when the client itself reports the upstream unreachable (Kafka's
//!   "all brokers down"), it is `offline`.
//! - **Reset rule.** The backoff and the failure count start over only after progress: an ack
//!   committed in the buffer for something the upstream confirmed, or a connection that stayed
//!   up for [`STABLE_AFTER`] without failing (an uplink with nothing to send confirms nothing,
//!   yet its link is fine). A connection that fails sooner without confirming anything keeps
//!   backing off, so wrong credentials, or an upstream that accepts and then drops every
//!   connection, never cause a tight reconnect loop.
//! - **Log.** The first failure is logged with its reason, the next ones only when the reason
//!   changes, or once per summary period ([`crate::fold`], `status.log_summary_secs`) with
//!   how often they came, how long the upstream has been failing and how many readings wait
//!   in the buffer; the first progress
//!   after failures is logged once with how long it took. Each failure is still counted
//!   (`retried_total`) and shown on the status page.

use crate::backoff::Backoff;
use crate::fold::{Fold, Say};
use crate::status::{LinkState, UplinkStatus};
use std::time::{Duration, Instant};

/// After this many failures in a row the state is `offline` rather than `backing_off`.
pub const OFFLINE_AFTER_FAILURES: u32 = 3;

/// While an upstream fails (from the first failure to the next progress), an uplink keeps at
/// most this many readings in flight: enough to find out that the link is back, and little
/// memory however long the outage lasts. The first ack opens the full window again.
pub const FAILING_WINDOW_READINGS: u64 = 500;

/// Whether the uplink of `status` is failing (backing off or offline): its window is then
/// [`FAILING_WINDOW_READINGS`], and its buffer task reads no more than that at a time.
pub(crate) fn failing(status: &UplinkStatus) -> bool {
    matches!(status.state(), LinkState::BackingOff | LinkState::Offline)
}

/// The most readings in flight for a window of `max_readings` (see [`failing`]).
pub(crate) fn window_readings(status: &UplinkStatus, max_readings: u64) -> u64 {
    if failing(status) {
        max_readings.min(FAILING_WINDOW_READINGS)
    } else {
        max_readings
    }
}

/// A connection that stayed up this long counts as progress even if it confirmed nothing.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Failures in a row and the backoff of one uplink.
#[derive(Debug)]
pub(crate) struct Retry {
    backoff: Backoff,
    failures: u32,
    /// When the current run of failures began (none since the last progress).
    failing_since: Option<Instant>,
    log: Fold,
}

impl Retry {
    pub(crate) fn new(initial_ms: u64, max_ms: u64) -> Self {
        Retry {
            backoff: Backoff::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(max_ms),
            ),
            failures: 0,
            failing_since: None,
            log: Fold::default(),
        }
    }

    /// Progress, as the reset rule defines it: the next failure waits the shortest time again.
    pub(crate) fn progress(&mut self) {
        self.backoff.reset();
        self.failures = 0;
        self.failing_since = None;
    }

    /// Progress reported by `status`'s uplink: as [`Retry::progress`], and logs once that the
    /// upstream is back after failing.
    pub(crate) fn progress_on(&mut self, status: &UplinkStatus) {
        if let Some(since) = self.failing_since {
            tracing::info!(uplink = %status.name(), r#type = status.kind(),
                failed_for_secs = since.elapsed().as_secs(),
                "The upstream takes readings again.");
            self.log = Fold::default();
        }
        self.progress();
    }

    /// A connection ended after `lasted`: progress if it lasted [`STABLE_AFTER`].
    pub(crate) fn connection_lasted(&mut self, lasted: Duration) {
        if lasted >= STABLE_AFTER {
            self.progress();
        }
    }

    /// Failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure, records it on `status` (with `offline` as the rule above says, or
    /// when `unreachable`) and returns how long to wait before the next try.
    pub(crate) fn fail(
        &mut self,
        status: &UplinkStatus,
        message: &str,
        unreachable: bool,
    ) -> Duration {
        self.failures += 1;
        let delay = self.backoff.next_delay();
        let offline = unreachable || self.failures >= OFFLINE_AFTER_FAILURES;
        status.record_retry(message, delay, offline);
        let now = Instant::now();
        let since = *self.failing_since.get_or_insert(now);
        let text = status.scrub(message);
        let retry_in_ms = delay.as_millis() as u64;
        match self.log.note(&text, now) {
            Say::New => tracing::warn!(uplink = %status.name(), r#type = status.kind(),
                error = %text, retry_in_ms, attempt = self.failures,
                "The upstream failed; unconfirmed readings stay in the buffer and are sent again after the backoff."),
            Say::Again(n) => tracing::warn!(uplink = %status.name(), r#type = status.kind(),
                error = %text, retry_in_ms, repeats = n,
                failing_for_secs = now.duration_since(since).as_secs(),
                waiting_readings = status.buffer_readings(),
                "The upstream keeps failing; readings wait in the buffer."),
            Say::Quiet => {}
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::LinkState;

    #[tokio::test]
    async fn offline_after_three_failures_and_progress_resets() {
        let status = UplinkStatus::new("u", "kafka", vec![]);
        let mut r = Retry::new(100, 10_000);
        for _ in 0..2 {
            assert!(r.fail(&status, "down", false) <= Duration::from_millis(200));
            assert_eq!(status.state(), LinkState::BackingOff);
        }
        r.fail(&status, "down", false);
        assert_eq!(status.state(), LinkState::Offline);
        assert_eq!(r.failures(), 3);
        r.connection_lasted(STABLE_AFTER / 2);
        assert_eq!(r.failures(), 3, "a short connection is not progress");
        r.connection_lasted(STABLE_AFTER);
        assert_eq!(r.failures(), 0);
        // The ceiling is back at the initial delay.
        assert!(r.fail(&status, "down", false) <= Duration::from_millis(100));
        r.fail(&status, "all brokers down", true);
        assert_eq!(
            status.state(),
            LinkState::Offline,
            "unreachable: offline at once"
        );
        r.progress();
        assert_eq!(r.failures(), 0);
    }
}
