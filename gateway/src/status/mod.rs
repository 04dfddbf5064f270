//! # The status page, `/api/status`, `/metrics` and the health endpoints
//!
//! Operators open this to learn one thing fast: **is data getting out, and if not, since when
//! and how much waits**. The page must tell the truth: an uplink that is connected while
//! nothing is acknowledged and data waits is reported *stalled*.
//!
//! ## Endpoints
//! Served on the HTTP listener (merged onto [`crate::http::router`]'s routes), or on their own
//! listener, registered as `"status"`, when `status.listen` is set.
//!
//! | endpoint | token | answer |
//! |---|---|---|
//! | `GET /` | no (the page holds no data) | [`page`]: one self-contained HTML page |
//! | `GET /api/status` | yes | [`api::StatusReport`] as JSON (in the OpenAPI document) |
//! | `GET /metrics` | yes | Prometheus text, see [`metrics`] |
//! | `GET /healthz` | no | 200 `ok` while the process runs |
//! | `GET /readyz` | no | 200, or 503 with the reasons ([`health`]) |
//!
//! Everything is read-only. With `status.token` set, the endpoints marked "yes" need
//! `Authorization: Bearer <token>` (compared in constant time; 401 otherwise).
//!
//! ## Where the figures come from
//! - [`Hub`]: built once by the gateway after every component is bound ([`HubParts`]), shared
//!   with the handlers: the MQTT and HTTP listeners' counters ([`MqttStats`],
//!   [`HttpStats`]), the uplinks' [`ferry_uplink::status::UplinkStatus`] handles (name and
//!   type), the bound listeners, the ready flag, and the [`DeviceTable`] that the MQTT and
//!   HTTP ingest paths feed once per committed batch.
//! - [`history::Sampler`]: a background task that reads the ingest and forwarded counters every
//!   second into a ring of 10-second buckets over 15 minutes (the chart) and runs the
//!   Prometheus recorder's upkeep.
//! - The buffer's [`ferry_buffer::BufferStats`] and per-uplink `Buffer::lag`, read per request.
//!
//! ## Files
//! [`api`] (report and schema), [`page`] + `page.html`, [`metrics`], [`health`], [`devices`],
//! [`history`], [`client`] (`ferry status`), `tests`.

pub mod api;
pub mod client;
pub mod devices;
pub mod health;
pub mod history;
pub mod metrics;
pub mod page;
#[cfg(test)]
mod tests;

use crate::http::stats::HttpStats;
use crate::mqtt::MqttStats;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_buffer::{Buffer, now_ms};
use ferry_config::Config;
use ferry_uplink::status::UplinkStatus;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

pub use devices::{DeviceBatch, DeviceTable};

struct HubInner {
    started: Instant,
    mqtt: Option<MqttStats>,
    http: Option<Arc<HttpStats>>,
    uplinks: Vec<UplinkStatus>,
    listeners: BTreeMap<&'static str, SocketAddr>,
    ready: AtomicBool,
    history: Mutex<history::History>,
}

/// What the hub is built from, once every component is bound.
#[derive(Debug)]
pub struct HubParts {
    /// When the gateway started.
    pub started: Instant,
    /// The device table the listeners feed.
    pub devices: DeviceTable,
    /// The MQTT listener's counters, when it is enabled.
    pub mqtt: Option<MqttStats>,
    /// The HTTP listener's counters, when it is enabled.
    pub http: Option<Arc<HttpStats>>,
    /// The uplinks' status handles, in the order they are shown.
    pub uplinks: Vec<UplinkStatus>,
    /// The bound listeners: name to address.
    pub listeners: BTreeMap<&'static str, SocketAddr>,
}

/// What the status endpoints read. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
    /// The device table and ingest counters, fed by the listeners.
    pub devices: DeviceTable,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("devices", &self.devices.len())
            .field("uplinks", &self.inner.uplinks.len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// The hub of a gateway whose components are `parts`.
    pub fn new(parts: HubParts) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                started: parts.started,
                mqtt: parts.mqtt,
                http: parts.http,
                uplinks: parts.uplinks,
                listeners: parts.listeners,
                ready: AtomicBool::new(false),
                history: Mutex::new(history::History::default()),
            }),
            devices: parts.devices,
        }
    }

    /// The MQTT listener's counters, when it is enabled.
    pub fn mqtt(&self) -> Option<&MqttStats> {
        self.inner.mqtt.as_ref()
    }

    /// The HTTP listener's counters, when it is enabled.
    pub fn http(&self) -> Option<&HttpStats> {
        self.inner.http.as_deref()
    }

    /// The uplinks' status handles.
    pub fn uplinks(&self) -> &[UplinkStatus] {
        &self.inner.uplinks
    }

    /// The bound listeners.
    pub fn listeners(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.inner.listeners
    }

    /// Set when every listener runs; cleared when shutdown starts.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    /// See [`Hub::set_ready`].
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// When the gateway started, ms since the epoch.
    pub fn started_ms(&self) -> u64 {
        // From the monotonic start, so a step of the wall clock moves it with the clock.
        now_ms().saturating_sub(self.inner.started.elapsed().as_millis() as u64)
    }

    /// Time since the gateway started.
    pub fn uptime(&self) -> Duration {
        Instant::now().saturating_duration_since(self.inner.started)
    }

    pub(crate) fn history(&self) -> MutexGuard<'_, history::History> {
        self.inner.history.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the status handlers share. Cheap to clone.
#[derive(Clone)]
pub struct StatusState {
    /// The registered figures.
    pub hub: Hub,
    /// The buffer.
    pub buffer: Buffer,
    /// The config (for `[status]`, `[buffer]` and `gateway.data_dir`; never serialized).
    pub config: Arc<Config>,
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for StatusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusState")
            .field("hub", &self.hub)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl StatusState {
    /// State for the handlers.
    pub fn new(hub: Hub, buffer: Buffer, config: Arc<Config>) -> StatusState {
        let token = config
            .status
            .token
            .as_ref()
            .map(|t| Arc::from(t.expose().as_bytes()));
        StatusState {
            hub,
            buffer,
            config,
            token,
        }
    }
}

/// Whether `req` carries the status token (always true when none is configured).
fn authorized(st: &StatusState, req: &Request) -> bool {
    let Some(token) = &st.token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    // Constant-time in the contents; the length of the configured token is not a secret
    // worth hiding from someone who can already reach the port.
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token)))
}

async fn require_token(State(st): State<StatusState>, req: Request, next: Next) -> Response {
    if authorized(&st, &req) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ferry status\""),
        )],
        axum::Json(serde_json::json!({
            "error": "unauthorized",
            "detail": "status.token is set: send Authorization: Bearer <token>",
        })),
    )
        .into_response()
}

async fn metrics_text(State(st): State<StatusState>) -> Response {
    let report = api::collect(&st, 0).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics::render(&report),
    )
        .into_response()
}

/// The status routes.
pub fn router(st: StatusState) -> Router {
    let protected = Router::new()
        .route("/api/status", get(api::status))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(
            st.clone(),
            require_token,
        ));
    Router::new()
        .route("/", get(page::page))
        // Browsers ask for it; a 404 would show up as an HTTP rejection on the page.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(protected)
        .with_state(st)
}

/// The OpenAPI paths and schemas of the status endpoints, merged into `/v1/openapi.json`
/// (through [`StatusApiDoc::for_config`], which adds the token when one is configured).
#[derive(utoipa::OpenApi, Debug)]
#[openapi(
    paths(api::status, health::healthz, health::readyz),
    components(schemas(api::StatusReport, health::Readiness))
)]
pub struct StatusApiDoc;

impl StatusApiDoc {
    /// The document for `settings`: `/api/status` requires the `status_token` bearer scheme
    /// only when `status.token` is set (without it, no header is needed).
    pub fn for_config(settings: &ferry_config::StatusSettings) -> utoipa::openapi::OpenApi {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let mut doc = <StatusApiDoc as utoipa::OpenApi>::openapi();
        if settings.token.is_some() {
            doc.components
                .get_or_insert_with(Default::default)
                .add_security_scheme(
                    "status_token",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                );
            if let Some(op) = doc
                .paths
                .paths
                .get_mut("/api/status")
                .and_then(|item| item.get.as_mut())
            {
                op.security = Some(vec![SecurityRequirement::new(
                    "status_token",
                    Vec::<String>::new(),
                )]);
            }
        }
        doc
    }
}

/// Why the status listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// `status.listen` could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The status page's own listener (`status.listen`), bound, not yet serving.
#[derive(Debug)]
pub struct StatusListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl StatusListener {
    /// Binds `status.listen`; `None` when it is not set (the HTTP listener serves the status
    /// routes, or nothing does when HTTP is disabled too).
    pub async fn bind(settings: &ferry_config::StatusSettings) -> Result<Option<Self>, BindError> {
        let Some(addr) = settings.listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| BindError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| BindError::Listen { addr, source })?;
        Ok(Some(StatusListener { listener, addr }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `routes` ([`router`]) until `shutdown` resolves.
    pub async fn run(
        self,
        routes: Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if let Err(e) = axum::serve(self.listener, routes)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "The status listener failed.");
        }
    }
}
