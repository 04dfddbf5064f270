//! A trivial axum server that does no work: the baseline for the HTTP ingest benchmark.
//!
//! `null_http [ADDR]` (default 127.0.0.1:8099) answers `POST /v1/readings/{*topic}` and
//! `POST /v1/readings` with `202 {"accepted":1}` after reading the body, on the same tokio
//! multi-threaded runtime and the same axum/hyper stack as ferry, with no buffer behind it.

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;

async fn accept(_body: Bytes) -> (StatusCode, &'static str) {
    (StatusCode::ACCEPTED, r#"{"accepted":1}"#)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8099".into());
    let app = Router::new()
        .route("/v1/readings", post(accept))
        .route("/v1/readings/{*topic}", post(accept));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("null_http listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
