//! Test scaffolding shared by the uplinks' tests.

use crate::status::UplinkStatus;
use ferry_buffer::{Reading, Segment, Source};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An uplink's `run` spawned by a test, with a way to stop it.
pub(crate) struct Running<E> {
    pub(crate) status: UplinkStatus,
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Debug> Running<E> {
    /// Triggers shutdown and waits (at most 10 s) for `run` to return Ok.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run() returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// A segment `id` with one reading per topic; reading `i` has id `id * 100 + i` and payload
/// `[i]`.
pub(crate) fn segment(id: u64, topics: &[&str]) -> Segment {
    Segment {
        id,
        readings: topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut r = Reading::new(Source::Mqtt, "d", *t, vec![i as u8]);
                r.id = id * 100 + i as u64;
                r
            })
            .collect(),
        stored: Vec::new(),
    }
}
