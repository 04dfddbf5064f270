//! systemd integration for `Type=notify` units: `READY=1` once every listener is bound,
//! `STOPPING=1` when the drain starts, and a watchdog that is fed only while the buffer's
//! writer thread answers — a gateway whose writer is wedged (a hung disk, say) stops feeding
//! it and systemd restarts it. Outside systemd (no `NOTIFY_SOCKET`) all of this does nothing.

use ferry_buffer::Buffer;
use std::future::Future;
use std::time::Duration;

fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells systemd the gateway is ready.
pub fn notify_ready() {
    if under_systemd()
        && let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready])
    {
        tracing::warn!(error = %e, "Could not tell systemd that ferry is ready.");
    }
}

/// Tells systemd the gateway is stopping.
pub fn notify_stopping() {
    if under_systemd() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
}

/// Feeds the systemd watchdog at half its interval, but only after the buffer writer has
/// answered a ping within that half interval.
#[derive(Debug)]
pub struct Watchdog {
    buffer: Buffer,
    interval: Duration,
}

impl Watchdog {
    /// A watchdog if the unit has `WatchdogSec=` set (systemd passes `WATCHDOG_USEC`).
    pub fn from_env(buffer: Buffer) -> Option<Watchdog> {
        if !under_systemd() {
            return None;
        }
        let interval = sd_notify::watchdog_enabled()?;
        Some(Watchdog { buffer, interval })
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let half = (self.interval / 2).max(Duration::from_millis(100));
        tracing::info!(
            interval_ms = self.interval.as_millis() as u64,
            "The systemd watchdog is armed."
        );
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(half);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            if self.buffer.ping(half).await {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "The buffer writer did not answer within {} ms; the systemd watchdog is not fed.",
                    half.as_millis()
                );
            }
        }
    }
}
