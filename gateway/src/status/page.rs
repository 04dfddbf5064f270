//! `GET /`: the status page, one self-contained HTML file (`page.html`, embedded at build
//! time): inline CSS and JS, no fonts, no CDN, no external requests. It polls `/api/status`
//! every 1.5 s, draws the 15-minute ingest chart as inline SVG, follows `prefers-color-scheme`,
//! and fits a phone. With `status.token` set, the page asks for the token once (or reads it
//! from `#token=…` in the URL, which never reaches the server) and keeps it in
//! `sessionStorage`. The page itself holds no data, so it is served without the token.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// Serves the page.
pub async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                ),
            ),
        ],
        PAGE,
    )
        .into_response()
}
