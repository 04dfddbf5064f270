//! Test scaffolding shared by the uplinks' tests.

use crate::status::UplinkStatus;
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
