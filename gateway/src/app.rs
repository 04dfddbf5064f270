//! Composition, running and shutdown: open the buffer, bind every component, build the
//! status hub once, start the uplinks, wait for a signal, then drain in order within
//! `gateway.shutdown_grace_ms`.
//!
//! ## Composition
//! ```text
//! Gateway::start(config)
//!   buffer      = Buffer::open(data_dir, buffer_options(config))     consumers = uplink names
//!   mqtt        = mqtt::MqttListeners::bind(&config.mqtt, deps)        (when enabled)
//!   http        = http::HttpListener::bind(deps)                       (when enabled)
//!   status      = status::StatusListener::bind(&config.status)         (with status.listen)
//!   uplinks     = ferry_uplink::from_config(&config, &buffer, local)   Vec<Box<dyn Uplink>>
//!                 local = the MQTT broker (mqtt.local), where downlinks hand commands
//!   hub         = status::Hub::new(HubParts { listener stats, uplink statuses, addresses })
//! Gateway::run(shutdown)
//!   spawns every listener's run (HTTP with the status routes merged, unless status.listen),
//!   the status sampler, the systemd watchdog and every uplink's run
//! ```
//! Components know nothing of the gateway: each exposes `bind(settings, deps)` and
//! `run(self, shutdown)`, and only this module assembles them. A component that cannot
//! start stops the start-up with its own error as the source of [`StartError`].
//!
//! ## Shutdown order
//! 1. listeners stop accepting and finish the acks they owe (each listener's `run` returns
//!    once its connections have drained or been told to go);
//! 2. uplinks stop reading, flush what is in flight and ack what the upstream confirmed
//!    (the buffer is still open, so those acks are committed);
//! 3. the buffer commits whatever it was handed and closes the file.
//!
//! Each stage gets what is left of the grace period; a task still running at the end is
//! aborted and named in the log. Nothing acknowledged is at risk from an abort: it is on disk.

use crate::status::{DeviceTable, Hub, HubParts, StatusState};
use crate::{http, mqtt, status};
use ferry_buffer::{Buffer, BufferOptions, Compression, OpenError, WhenFull};
use ferry_config::Config;
use ferry_uplink::Uplink;
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

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The buffer could not be opened.
    #[error(transparent)]
    Buffer(#[from] OpenError),
    /// The task opening the buffer panicked.
    #[error("opening the buffer failed: {0}")]
    BufferTask(#[source] tokio::task::JoinError),
    /// The MQTT listener could not start.
    #[error("mqtt: {0}")]
    Mqtt(#[source] mqtt::BindError),
    /// The HTTP listener could not start.
    #[error("http: {0}")]
    Http(#[source] http::BindError),
    /// The status listener could not start.
    #[error("status: {0}")]
    Status(#[source] status::BindError),
    /// An uplink could not be built.
    #[error(transparent)]
    Uplink(#[from] ferry_uplink::BuildError),
}

/// Maps `[buffer]` to the buffer's options; the consumers are the enabled uplinks.
pub fn buffer_options(config: &Config) -> BufferOptions {
    let b = &config.buffer;
    BufferOptions {
        max_bytes: b.max_bytes,
        when_full: match b.when_full {
            ferry_config::WhenFull::Reject => WhenFull::Reject,
            ferry_config::WhenFull::DropOldest => WhenFull::DropOldest,
        },
        flush_interval: Duration::from_millis(b.flush_interval_ms),
        max_flush_delay: Duration::from_millis(b.max_flush_delay_ms),
        flush_target_bytes: b.flush_target_bytes,
        max_batch_readings: b.max_batch_readings,
        max_batch_bytes: b.max_batch_bytes,
        compression: match b.compression {
            ferry_config::Compression::None => Compression::None,
            ferry_config::Compression::Gzip => Compression::Gzip {
                level: b.compression_level,
            },
        },
        max_age: (b.max_age_secs > 0).then(|| Duration::from_secs(b.max_age_secs)),
        cache_bytes: b.cache_bytes as usize,
        consumers: ferry_uplink::consumers(config),
        quick_repair: false,
        max_pending_bytes: b.max_pending_bytes,
        gateway_id: Some(config.gateway.id.clone()),
        clock: Arc::new(ferry_buffer::SystemClock {
            assume_synced: config.gateway.clock_sync == ferry_config::ClockSync::Assume,
        }),
        min_free_bytes: b.min_free_bytes,
    }
}

/// A started gateway: buffer open, listeners bound, uplinks built, nothing running yet.
pub struct Gateway {
    /// The validated config.
    pub config: Arc<Config>,
    /// The buffer.
    pub buffer: Buffer,
    /// What the status page reads.
    pub status: Hub,
    addrs: BTreeMap<&'static str, SocketAddr>,
    mqtt: Option<mqtt::MqttListeners>,
    http: Option<http::HttpListener>,
    status_listener: Option<status::StatusListener>,
    uplinks: Vec<Box<dyn Uplink>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addrs", &self.addrs)
            .field("uplinks", &self.uplinks)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Opens the buffer, binds every enabled listener and builds every enabled uplink. Fails
    /// before anything runs.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        // First, so the figures the buffer and uplinks emit from the start are recorded.
        crate::status::metrics::install();
        let started = Instant::now();
        let config = Arc::new(config);
        let data_dir = config.gateway.data_dir.clone();
        let opts = buffer_options(&config);
        let buffer = tokio::task::spawn_blocking(move || Buffer::open(data_dir, opts))
            .await
            .map_err(StartError::BufferTask)??;
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

        let devices = DeviceTable::new(config.status.max_devices);
        let grace = Duration::from_millis(config.gateway.shutdown_grace_ms);
        let mut addrs = BTreeMap::new();
        let mqtt = if config.mqtt.enabled {
            let deps = mqtt::Deps {
                buffer: buffer.clone(),
                devices: devices.clone(),
                reject_when_full: matches!(config.buffer.when_full, ferry_config::WhenFull::Reject),
                grace,
            };
            let m = mqtt::MqttListeners::bind(&config.mqtt, deps)
                .await
                .map_err(StartError::Mqtt)?;
            addrs.insert("mqtt", m.tcp.local_addr());
            if let Some(t) = &m.tls {
                addrs.insert("mqtts", t.local_addr());
            }
            Some(m)
        } else {
            None
        };
        let http = if config.http.enabled {
            let deps = http::Deps {
                buffer: buffer.clone(),
                config: config.clone(),
                devices: devices.clone(),
            };
            let h = http::HttpListener::bind(deps)
                .await
                .map_err(StartError::Http)?;
            addrs.insert("http", h.local_addr());
            Some(h)
        } else {
            None
        };
        let status_listener = status::StatusListener::bind(&config.status)
            .await
            .map_err(StartError::Status)?;
        if let Some(s) = &status_listener {
            addrs.insert("status", s.local_addr());
        }
        let local = mqtt
            .as_ref()
            .map(|m| Arc::new(m.local.clone()) as Arc<dyn ferry_uplink::downlink::Local>);
        let uplinks = ferry_uplink::from_config(&config, &buffer, local)?;
        if uplinks.is_empty() {
            tracing::warn!(
                "No uplink is enabled: ferry buffers readings and forwards nothing. Add an [uplinks.NAME] table to forward them."
            );
        }
        for u in &uplinks {
            tracing::info!(
                uplink = u.name(),
                r#type = u.kind(),
                "An uplink is enabled."
            );
        }
        let hub = Hub::new(HubParts {
            started,
            devices,
            mqtt: mqtt.as_ref().map(|m| m.stats.clone()),
            http: http.as_ref().map(http::HttpListener::stats),
            uplinks: uplinks.iter().map(|u| u.status()).collect(),
            listeners: addrs.clone(),
        });
        Ok(Gateway {
            config,
            buffer,
            status: hub,
            addrs,
            mqtt,
            http,
            status_listener,
            uplinks,
        })
    }

    /// The state the status handlers read.
    pub fn status_state(&self) -> StatusState {
        StatusState::new(
            self.status.clone(),
            self.buffer.clone(),
            self.config.clone(),
        )
    }

    /// The bound addresses, by listener name.
    pub fn addrs(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.addrs
    }

    /// The listeners and background tasks, ready to be started.
    fn listener_tasks(&mut self) -> Vec<(&'static str, Starter)> {
        let mut out: Vec<(&'static str, Starter)> = Vec::new();
        let routes = status::router(self.status_state());
        if let Some(m) = self.mqtt.take() {
            let tcp = m.tcp;
            out.push(("mqtt", Box::new(move |sd| Box::pin(tcp.run(sd)))));
            if let Some(tls) = m.tls {
                out.push(("mqtts", Box::new(move |sd| Box::pin(tls.run(sd)))));
            }
        }
        match (self.status_listener.take(), self.http.take()) {
            (Some(s), http) => {
                tracing::info!(addr = %s.local_addr(), token = self.config.status.token.is_some(),
                    "The status page has its own listener.");
                let r = routes.clone();
                out.push(("status", Box::new(move |sd| Box::pin(s.run(r, sd)))));
                if let Some(h) = http {
                    out.push(("http", Box::new(move |sd| Box::pin(h.run(None, sd)))));
                }
            }
            (None, Some(h)) => {
                tracing::info!(
                    token = self.config.status.token.is_some(),
                    "The status page is served on the HTTP listener."
                );
                out.push((
                    "http",
                    Box::new(move |sd| Box::pin(h.run(Some(routes), sd))),
                ));
            }
            (None, None) => tracing::warn!(
                "The status page is not served: the HTTP listener is disabled and status.listen is not set."
            ),
        }
        let sampler = status::history::Sampler {
            hub: self.status.clone(),
            buffer: self.buffer.clone(),
        };
        out.push((
            "status-sampler",
            Box::new(move |sd| Box::pin(sampler.run(sd))),
        ));
        if let Some(wd) = crate::systemd::Watchdog::from_env(self.buffer.clone()) {
            out.push(("systemd-watchdog", Box::new(move |sd| Box::pin(wd.run(sd)))));
        }
        out
    }

    /// Runs every component until `shutdown` resolves, then drains in order.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let grace = Duration::from_millis(self.config.gateway.shutdown_grace_ms);
        let listen_token = CancellationToken::new();
        let uplink_token = CancellationToken::new();
        let mut listeners = JoinSet::new();
        for (name, start) in self.listener_tasks() {
            let task = start(listen_token.clone().cancelled_owned());
            listeners.spawn(async move {
                task.await;
                name.to_string()
            });
        }
        let mut uplinks = JoinSet::new();
        for uplink in std::mem::take(&mut self.uplinks) {
            let name = uplink.name().to_string();
            let kind = uplink.kind();
            let task = uplink.run(Box::pin(uplink_token.clone().cancelled_owned()));
            uplinks.spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(uplink = %name, r#type = kind, error = %e,
                        "The uplink stopped with an error; its readings stay in the buffer.");
                }
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

async fn drain(kind: &str, set: &mut JoinSet<String>, deadline: Instant) {
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(None) => return,
            Ok(Some(Ok(name))) => tracing::debug!(component = %name, "A {kind} stopped."),
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
