//! `GET /metrics`: Prometheus text from `metrics-exporter-prometheus` (no HTTP listener, no
//! push gateway).
//!
//! The crates emit their counters and gauges through the `metrics` facade where things happen
//! (`ferry_readings_received_total{source}`, `ferry_buffer_bytes`, `ferry_uplink_acked_total`,
//! …, see each crate's docs). The figures that only exist as a computation at read time are set
//! here, just before each render, from the same report as `/api/status`, so every figure of the
//! status page has a series:
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `ferry_gateway_info{gateway,version}` | gauge | always 1 |
//! | `ferry_uptime_seconds` | gauge | since the gateway started |
//! | `ferry_ready` | gauge | 1 when `/readyz` answers 200 |
//! | `ferry_buffer_readings`, `ferry_buffer_bytes`, `ferry_buffer_max_bytes`, `ferry_buffer_dead_letters` | gauge | buffer fill (also set by the writer per commit) |
//! | `ferry_buffer_oldest_reading_age_seconds` | gauge | age of the oldest buffered reading (0 when empty) |
//! | `ferry_buffer_writable` | gauge | 1 if the last commit succeeded |
//! | `ferry_buffer_quarantined_files` | gauge | corrupt buffer files moved aside |
//! | `ferry_uplink_info{uplink,type}` | gauge | 1 for each enabled uplink: its name and type |
//! | `ferry_uplink_lag_readings{uplink}`, `ferry_uplink_lag_bytes{uplink}` | gauge | unsent backlog |
//! | `ferry_uplink_oldest_unsent_age_seconds{uplink}` | gauge | age of the oldest unsent reading |
//! | `ferry_uplink_drain_readings_per_second{uplink}` | gauge | acks per second over 10 s |
//! | `ferry_uplink_eta_seconds{uplink}` | gauge | time to drain at that rate (0 when empty, NaN when unknown) |
//! | `ferry_uplink_last_ack_timestamp_seconds{uplink}` | gauge | Unix time of the last ack |
//! | `ferry_uplink_stalled{uplink}` | gauge | 1 when connected, data waits, no ack for `status.stalled_after_secs` |
//! | `ferry_devices_tracked` | gauge | devices in the status table |
//! | `ferry_disk_free_bytes`, `ferry_disk_total_bytes` | gauge | file system of `gateway.data_dir` |
//!
//! The recorder is installed once per process ([`install`]); later calls return the same
//! handle, so unit tests and several gateways in one process are fine.

use super::api::StatusReport;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder, once. If another recorder
/// was installed first (only possible when ferry is embedded), `/metrics` still answers, empty.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| match PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "Another metrics recorder was installed first; /metrics stays empty in this process.");
            PrometheusBuilder::new().build_recorder().handle()
        }
    })
}

/// Housekeeping for histograms; the sampler calls it every few seconds.
pub fn upkeep() {
    if let Some(h) = HANDLE.get() {
        h.run_upkeep();
    }
}

fn secs(ms: Option<u64>) -> f64 {
    ms.unwrap_or(0) as f64 / 1000.0
}

/// Sets the read-time gauges from `report`, then renders the exposition text.
pub fn render(report: &StatusReport) -> String {
    let handle = install();
    let g = &report.gateway;
    metrics::gauge!("ferry_gateway_info", "gateway" => g.id.clone(), "version" => g.version.clone())
        .set(1.0);
    metrics::gauge!("ferry_uptime_seconds").set(g.uptime_secs);
    metrics::gauge!("ferry_ready").set(if report.ready { 1.0 } else { 0.0 });
    let b = &report.buffer;
    metrics::gauge!("ferry_buffer_readings").set(b.readings as f64);
    metrics::gauge!("ferry_buffer_bytes").set(b.used_bytes as f64);
    metrics::gauge!("ferry_buffer_max_bytes").set(b.max_bytes as f64);
    metrics::gauge!("ferry_buffer_dead_letters").set(report.dead_letters.count as f64);
    metrics::gauge!("ferry_buffer_oldest_reading_age_seconds").set(secs(b.oldest_reading_age_ms));
    metrics::gauge!("ferry_buffer_writable").set(if b.writable { 1.0 } else { 0.0 });
    metrics::gauge!("ferry_buffer_quarantined_files").set(report.quarantine.files.len() as f64);
    for u in &report.uplinks {
        let l = || u.name.clone();
        metrics::gauge!("ferry_uplink_info", "uplink" => l(), "type" => u.kind.clone()).set(1.0);
        metrics::gauge!("ferry_uplink_lag_readings", "uplink" => l()).set(u.lag_readings as f64);
        metrics::gauge!("ferry_uplink_lag_bytes", "uplink" => l()).set(u.lag_bytes as f64);
        metrics::gauge!("ferry_uplink_oldest_unsent_age_seconds", "uplink" => l())
            .set(secs(u.oldest_unsent_age_ms));
        metrics::gauge!("ferry_uplink_drain_readings_per_second", "uplink" => l())
            .set(u.drain_rate_per_sec);
        // 0 when nothing waits; NaN while unknown (not connected, or nothing drains), so a
        // stale figure is never left behind.
        let eta = match (u.lag_readings, u.eta_secs) {
            (0, _) => 0.0,
            (_, Some(eta)) => eta,
            (_, None) => f64::NAN,
        };
        metrics::gauge!("ferry_uplink_eta_seconds", "uplink" => l()).set(eta);
        if let Some(ms) = u.last_ack_ms {
            metrics::gauge!("ferry_uplink_last_ack_timestamp_seconds", "uplink" => l())
                .set(ms as f64 / 1000.0);
        }
        metrics::gauge!("ferry_uplink_stalled", "uplink" => l()).set(if u.stalled {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!("ferry_devices_tracked").set(report.devices.tracked as f64);
    if let Some(d) = &report.disk {
        metrics::gauge!("ferry_disk_free_bytes").set(d.free_bytes as f64);
        metrics::gauge!("ferry_disk_total_bytes").set(d.total_bytes as f64);
    }
    handle.render()
}
