//! `GET /healthz` (the process answers) and `GET /readyz` (the buffer is writable and every
//! listener is bound and running). Neither needs the status token, so probes work without it;
//! neither reveals more than ready or not and why.

use super::StatusState;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The body of `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// Whether ferry accepts readings.
    pub ready: bool,
    /// Why not, when not.
    pub reasons: Vec<String>,
}

/// Liveness: 200 while the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "status",
    responses((status = 200, description = "The process is alive.")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when the buffer is writable and the listeners are bound; else 503 with the
/// reasons.
#[utoipa::path(get, path = "/readyz", tag = "status",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready; `reasons` says why.", body = Readiness),
    ))]
pub async fn readyz(axum::extract::State(st): axum::extract::State<StatusState>) -> Response {
    let mut reasons = Vec::new();
    let stats = st.buffer.stats();
    if st.buffer.is_closed() {
        reasons.push("the buffer is closed (shutting down)".to_string());
    } else if !stats.writable() {
        reasons.push(format!(
            "the buffer cannot write: {}",
            stats.last_error.as_deref().unwrap_or("unknown error")
        ));
    }
    if !st.hub.is_ready() {
        reasons
            .push("the listeners are not all bound and running (starting or shutting down)".into());
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(Readiness { ready, reasons })).into_response()
}
