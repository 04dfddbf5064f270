//! One uplink driven against a real buffer: the helpers shared by the uplinks' end-to-end
//! tests (`uplink/tests/e2e/`) and the drain benchmarks (`bench/benches/uplink_drain.rs`).

use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, Source};
use ferry_uplink::{Uplink, UplinkError, UplinkSnapshot, UplinkStatus};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An uplink's `run` spawned by a test, with a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// The uplink's status handle.
    pub status: UplinkStatus,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), UplinkError>>,
}

impl Running {
    /// Spawns `uplink.run` on the current tokio runtime.
    pub fn start(uplink: Box<dyn Uplink>) -> Running {
        let status = uplink.status();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(uplink.run(Box::pin(async move {
            let _ = rx.await;
        })));
        Running { status, stop, task }
    }

    /// Triggers shutdown and waits (at most 10 s) for `run` to return Ok.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run() returns after shutdown")
            .expect("run() does not panic")
            .expect("run() returns Ok");
    }
}

/// A buffer in `dir` for the consumers `consumers`, committing at once (no flush interval).
pub fn open_buffer(dir: &Path, consumers: &[&str]) -> Buffer {
    open_buffer_compressed(dir, consumers, BufferOptions::default().compression)
}

/// [`open_buffer`] with segments compressed as `compression`.
pub fn open_buffer_compressed(dir: &Path, consumers: &[&str], compression: Compression) -> Buffer {
    Buffer::open(
        dir,
        BufferOptions {
            consumers: consumers.iter().map(|c| c.to_string()).collect(),
            flush_interval: Duration::ZERO,
            compression,
            ..Default::default()
        },
    )
    .expect("open the buffer")
}

/// An MQTT reading.
pub fn reading(device: &str, topic: &str, payload: impl Into<Vec<u8>>) -> Reading {
    Reading::new(Source::Mqtt, device, topic, payload.into())
}

/// Waits until `f` holds, polling every 10 ms; panics after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the buffer holds no reading; panics after `timeout` with the uplink's status.
pub async fn wait_empty(buffer: &Buffer, status: &UplinkStatus, timeout: Duration) {
    let start = Instant::now();
    while buffer.stats().readings != 0 {
        assert!(
            start.elapsed() < timeout,
            "buffer still holds {} readings; uplink status {:?}",
            buffer.stats().readings,
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the buffer is empty and the uplink's status counts every reading whose ack
/// emptied it (the status is updated just after the ack's commit lands).
pub async fn wait_settled(buffer: &Buffer, status: &UplinkStatus, timeout: Duration) {
    let counted = |s: &UplinkSnapshot| s.acked_total + s.skipped_total + s.dead_lettered_total;
    wait_until(
        "the buffer is empty and the status counts it",
        timeout,
        || {
            buffer.stats().readings == 0
                && counted(&status.snapshot()) >= buffer.stats().acked_total
        },
    )
    .await;
}

/// Waits (at most 2 s) until the status counts `acked` acked readings: the uplink updates it
/// right after the ack commit returns, which is a moment after the buffer's own counts change.
pub async fn wait_acked(status: &UplinkStatus, acked: u64) {
    wait_until(
        &format!("the status counts {acked} acked readings"),
        Duration::from_secs(2),
        || status.snapshot().acked_total >= acked,
    )
    .await;
}
