//! Live figures of the HTTP listener (atomics, for the status page) and the metrics emitted
//! per request: `ferry_http_requests_total{status}`, `ferry_http_request_duration_seconds`,
//! `ferry_http_rejections_total{reason}`. `ferry_readings_received_total{source="http"}` is
//! emitted where readings are committed (see `ingest`).

use super::problem::Rejection;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::time::Instant;

const STATUSES: [u16; 13] = [
    200, 202, 400, 401, 403, 404, 405, 408, 413, 415, 500, 503, 0,
];
const STATUS_LABELS: [&str; 13] = [
    "200", "202", "400", "401", "403", "404", "405", "408", "413", "415", "500", "503", "other",
];
const REASONS: [&str; 21] = [
    "malformed-json",
    "invalid-senml",
    "bad-topic",
    "bad-record",
    "bad-encoding",
    "body-read",
    "body-too-large",
    "decompressed-too-large",
    "too-many-readings",
    "larger-than-buffer",
    "body-timeout",
    "unsupported-media-type",
    "unauthorized",
    "forbidden",
    "buffer-full",
    "buffer-storage",
    "shutting-down",
    "not-found",
    "method-not-allowed",
    "unavailable",
    "other",
];
/// Upper bounds of the latency buckets, in microseconds (the last is unbounded).
const LATENCY_BOUNDS_US: [u64; 16] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
    u64::MAX,
];

/// Counters of the HTTP listener, since the process started.
#[derive(Debug, Default)]
pub struct HttpStats {
    by_status: [AtomicU64; 13],
    by_reason: [AtomicU64; 21],
    latency: [AtomicU64; 16],
    latency_sum_us: AtomicU64,
    readings_accepted: AtomicU64,
    requests_accepted: AtomicU64,
    connections: AtomicU64,
}

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len() - 1)
}

impl HttpStats {
    /// Counts readings committed by one request.
    pub fn accepted(&self, readings: usize) {
        self.readings_accepted.fetch_add(readings as u64, Relaxed);
        self.requests_accepted.fetch_add(1, Relaxed);
    }

    /// Counts a connection opened (`+1`) or closed (`-1`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections.fetch_add(1, Relaxed);
        } else {
            self.connections.fetch_sub(1, Relaxed);
        }
    }

    /// Records one finished request.
    pub fn request(&self, status: u16, reason: Option<&'static str>, took_us: u64) {
        let si = status_index(status);
        self.by_status[si].fetch_add(1, Relaxed);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|b| took_us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len() - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(took_us, Relaxed);
        metrics::counter!("ferry_http_requests_total", "status" => STATUS_LABELS[si]).increment(1);
        metrics::histogram!("ferry_http_request_duration_seconds").record(took_us as f64 / 1e6);
        if let Some(reason) = reason {
            let ri = REASONS
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(REASONS.len() - 1);
            self.by_reason[ri].fetch_add(1, Relaxed);
            metrics::counter!("ferry_http_rejections_total", "reason" => REASONS[ri]).increment(1);
        }
    }

    /// Readings committed so far.
    pub fn readings_accepted(&self) -> u64 {
        self.readings_accepted.load(Relaxed)
    }

    /// Requests answered with `status` so far (0 = any status not listed).
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.by_status[status_index(status)].load(Relaxed)
    }

    /// Requests rejected for `reason` so far.
    pub fn rejections(&self, reason: &str) -> u64 {
        REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.by_reason[i].load(Relaxed))
    }

    /// Requests rejected so far, by reason (reasons with none left out).
    pub fn rejections_by_reason(&self) -> std::collections::BTreeMap<&'static str, u64> {
        REASONS
            .iter()
            .zip(&self.by_reason)
            .filter_map(|(r, a)| {
                let n = a.load(Relaxed);
                (n > 0).then_some((*r, n))
            })
            .collect()
    }
}

/// Middleware: times every request and counts it by status and rejection reason.
pub async fn stats_layer(
    State(stats): State<Arc<HttpStats>>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let resp = next.run(req).await;
    let reason = resp.extensions().get::<Rejection>().map(|r| r.0);
    stats.request(
        resp.status().as_u16(),
        reason,
        start.elapsed().as_micros() as u64,
    );
    resp
}
