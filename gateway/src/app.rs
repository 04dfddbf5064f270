//! Wiring and shutdown: open the buffer, bind the listeners, start the uplinks, wait for a
//! signal, then drain in order within `gateway.shutdown_grace_ms`.
//!
//! Shutdown order:
//! 1. listeners stop accepting and finish the acks they owe (each listener's `run` returns
//!    once its connections have drained or been told to go);
//! 2. uplinks stop reading, flush what is in flight and ack what the upstream confirmed
//!    (the buffer is still open, so those acks are committed);
//! 3. the buffer commits whatever it was handed and closes the file.
//!
//! Each stage gets what is left of the grace period; a task still running at the end is
//! aborted and named in the log. Nothing acknowledged is at risk from an abort: it is on disk.

use ferry_buffer::{Buffer, BufferOptions, Compression, OpenError, WhenFull};
use ferry_config::Config;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A long-lived task, boxed.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
/// The shutdown future handed to each component's `run`.
pub type Shutdown = WaitForCancellationFutureOwned;
type Starter = Box<dyn FnOnce(Shutdown) -> Task + Send>;
/// A component's live figures as JSON, for `/api/status` and the status page.
pub type StatusSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The buffer could not be opened.
    #[error(transparent)]
    Buffer(#[from] OpenError),
    /// A listener could not bind or load its TLS material.
    #[error("{component}: {message}")]
    Component {
        /// Which component.
        component: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Maps `[buffer]` to the buffer's options.
pub fn buffer_options(config: &Config) -> BufferOptions {
    let b = &config.buffer;
    let mut consumers = Vec::new();
    if config.uplink.kafka.enabled {
        consumers.push("kafka".to_string());
    }
    if config.uplink.mqtt.enabled {
        consumers.push("mqtt".to_string());
    }
    BufferOptions {
        max_bytes: b.max_bytes,
        when_full: match b.when_full {
            ferry_config::WhenFull::Reject => WhenFull::Reject,
            _ => WhenFull::DropOldest,
        },
        flush_interval: Duration::from_millis(b.flush_interval_ms),
        max_flush_delay: Duration::from_millis(b.max_flush_delay_ms),
        flush_target_bytes: b.flush_target_bytes,
        max_batch_readings: b.max_batch_readings,
        max_batch_bytes: b.max_batch_bytes,
        compression: match b.compression {
            ferry_config::Compression::None => Compression::None,
            _ => Compression::Gzip {
                level: b.compression_level,
            },
        },
        max_age: (b.max_age_secs > 0).then(|| Duration::from_secs(b.max_age_secs)),
        cache_bytes: b.cache_bytes as usize,
        consumers,
        quick_repair: false,
        max_pending_bytes: b.max_pending_bytes,
    }
}

/// A started gateway: buffer open, listeners bound, nothing running yet.
pub struct Gateway {
    /// The validated config.
    pub config: Arc<Config>,
    /// The buffer.
    pub buffer: Buffer,
    /// When the gateway started.
    pub started: Instant,
    addrs: BTreeMap<&'static str, SocketAddr>,
    listeners: Vec<(&'static str, Starter)>,
    uplinks: Vec<(&'static str, Starter)>,
    /// What the status page reads: components' figures, uplink handles, listeners, devices.
    pub status: crate::status::Hub,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Opens the buffer and binds every enabled listener. Fails before anything runs.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        // First, so the figures the buffer and uplinks emit from the start are recorded.
        crate::status::metrics::install();
        let started = Instant::now();
        let config = Arc::new(config);
        let data_dir = config.gateway.data_dir.clone();
        let opts = buffer_options(&config);
        let buffer = tokio::task::spawn_blocking(move || Buffer::open(data_dir, opts))
            .await
            .map_err(|e| StartError::Component {
                component: "buffer",
                message: e.to_string(),
            })??;
        let st = buffer.stats();
        if !st.quarantined.is_empty() {
            tracing::error!(
                files = ?st.quarantined,
                "Corrupt buffer files were moved to the quarantine folder; their readings were not forwarded. Remove them once inspected to clear this flag."
            );
        }
        tracing::info!(
            data_dir = %config.gateway.data_dir.display(),
            readings = st.readings,
            bytes = st.used_bytes(),
            "The buffer is open."
        );
        let gw = Gateway {
            status: crate::status::Hub::new(config.status.max_devices, started),
            config,
            buffer,
            started,
            addrs: BTreeMap::new(),
            listeners: Vec::new(),
            uplinks: Vec::new(),
        };
        Ok(gw)
    }

    /// Registers a bound listener; its `run` starts in [`Gateway::run`].
    pub fn add_listener(
        &mut self,
        name: &'static str,
        addr: SocketAddr,
        start: impl FnOnce(Shutdown) -> Task + Send + 'static,
    ) {
        self.addrs.insert(name, addr);
        self.status.listener_bound(name, addr);
        self.listeners.push((name, Box::new(start)));
    }

    /// Registers a background task with no address (e.g. the status sampler); it starts and
    /// stops with the listeners.
    pub fn add_task(
        &mut self,
        name: &'static str,
        start: impl FnOnce(Shutdown) -> Task + Send + 'static,
    ) {
        self.listeners.push((name, Box::new(start)));
    }

    /// Registers an uplink; its `run` starts in [`Gateway::run`].
    pub fn add_uplink(
        &mut self,
        name: &'static str,
        start: impl FnOnce(Shutdown) -> Task + Send + 'static,
    ) {
        self.uplinks.push((name, Box::new(start)));
    }

    /// Registers a component's live figures for the status page.
    pub fn add_status_source(&mut self, name: &'static str, source: StatusSource) {
        self.status.add_source(name, source);
    }

    /// Registers an uplink's status handle (state, acks, errors) for the status page; its
    /// buffer lag is read per request.
    pub fn add_uplink_status(&mut self, status: ferry_uplink::status::UplinkStatus) {
        self.status.add_uplink(status);
    }

    /// The registered status sources.
    pub fn status_sources(&self) -> Vec<(&'static str, StatusSource)> {
        self.status.sources()
    }

    /// Binds and registers every enabled component from the config: the MQTT listener, the
    /// HTTP listener (and with it the status page), the uplinks, and the status sampler (and
    /// the status listener, with `status.listen`).
    pub async fn build(&mut self) -> Result<(), StartError> {
        crate::mqtt::register(self).await?;
        crate::http::register(self).await?;
        crate::uplinks::register(self).await?;
        crate::status::register(self).await?;
        if let Some(wd) = crate::systemd::Watchdog::from_env(self.buffer.clone()) {
            self.add_task("systemd-watchdog", move |shutdown| {
                Box::pin(wd.run(shutdown))
            });
        }
        Ok(())
    }

    /// The bound addresses, by listener name.
    pub fn addrs(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.addrs
    }

    /// Runs every component until `shutdown` resolves, then drains in order.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let grace = Duration::from_millis(self.config.gateway.shutdown_grace_ms);
        let listen_token = CancellationToken::new();
        let uplink_token = CancellationToken::new();
        let mut listeners = JoinSet::new();
        for (name, start) in self.listeners {
            let task = start(listen_token.clone().cancelled_owned());
            listeners.spawn(async move {
                task.await;
                name
            });
        }
        let mut uplinks = JoinSet::new();
        for (name, start) in self.uplinks {
            let task = start(uplink_token.clone().cancelled_owned());
            uplinks.spawn(async move {
                task.await;
                name
            });
        }
        // Every listener is bound and its task spawned: /readyz may say so (before the line
        // below, so whoever reads it finds ferry ready).
        self.status.set_ready(true);
        // One machine-readable line on stdout once everything is bound: tests and scripts
        // read the real ports from it (listen addresses may use port 0).
        let ready: BTreeMap<&str, String> = self
            .addrs
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        println!(
            "ready {}",
            serde_json::to_string(&ready).unwrap_or_else(|_| "{}".into())
        );
        tracing::info!(addresses = ?ready, version = env!("CARGO_PKG_VERSION"), "ferry is ready.");
        crate::systemd::notify_ready();

        shutdown.await;
        self.status.set_ready(false);
        crate::systemd::notify_stopping();
        let deadline = Instant::now() + grace;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "ferry is shutting down: listeners stop accepting."
        );
        listen_token.cancel();
        drain("listener", &mut listeners, deadline).await;
        tracing::info!("Listeners are closed; uplinks flush what is in flight.");
        uplink_token.cancel();
        drain("uplink", &mut uplinks, deadline).await;
        let close = self.buffer.close();
        if tokio::time::timeout_at(deadline.max(Instant::now() + Duration::from_secs(1)), close)
            .await
            .is_err()
        {
            tracing::error!(
                "The buffer did not close within the grace period; everything acknowledged is already on disk."
            );
        }
        tracing::info!("ferry stopped.");
        Ok(())
    }
}

async fn drain(kind: &str, set: &mut JoinSet<&'static str>, deadline: Instant) {
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(None) => return,
            Ok(Some(Ok(name))) => tracing::debug!(component = name, "A {kind} stopped."),
            Ok(Some(Err(e))) => tracing::error!(error = %e, "A {kind} task failed."),
            Err(_) => {
                tracing::warn!(
                    remaining = set.len(),
                    "Grace period over: aborting the {kind}s still running."
                );
                set.abort_all();
                while set.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received."),
                    _ = int.recv() => tracing::info!("SIGINT received."),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
