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

use crate::backoff::Backoff;
use crate::status::UplinkStatus;
use std::time::Duration;

/// After this many failures in a row the state is `offline` rather than `backing_off`.
pub const OFFLINE_AFTER_FAILURES: u32 = 3;

/// A connection that stayed up this long counts as progress even if it confirmed nothing.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Failures in a row and the backoff of one uplink.
#[derive(Debug)]
pub(crate) struct Retry {
    backoff: Backoff,
    failures: u32,
}

impl Retry {
    pub(crate) fn new(initial_ms: u64, max_ms: u64) -> Self {
        Retry {
            backoff: Backoff::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(max_ms),
            ),
            failures: 0,
        }
    }

    /// Progress, as the reset rule defines it: the next failure waits the shortest time again.
    pub(crate) fn progress(&mut self) {
        self.backoff.reset();
        self.failures = 0;
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
