//! `GET /metrics`: Prometheus text from `metrics-exporter-prometheus` (no HTTP listener, no
//! push gateway).
//!
//! The crates emit their counters and gauges through the `metrics` facade where things happen
//! (`ferry_readings_received_total{source}`, `ferry_buffer_bytes`, `ferry_uplink_acked_total`,
//! …, see each crate's docs). The figures that only exist as a computation at read time are set
//! here, just before each render, from the same report as `/api/status`, so every figure of the
//! status page has a series:
//!
//! What each metric means is its `HELP` text, written once in [`describe`] (and in
//! `ferry_buffer::describe_metrics` and `ferry_uplink::status::describe_metrics` for theirs).
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
        Ok(h) => {
            describe();
            ferry_buffer::describe_metrics();
            ferry_uplink::status::describe_metrics();
            h
        }
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
        metrics::gauge!("ferry_disk_reserve_bytes").set(d.reserve_bytes as f64);
    }
    handle.render()
}

/// The `HELP` text and unit of every metric the gateway emits itself.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "ferry_gateway_info",
        "Always 1; labels gateway (the gateway id) and version."
    );
    describe_gauge!(
        "ferry_uptime_seconds",
        Unit::Seconds,
        "Time since the gateway started."
    );
    describe_gauge!(
        "ferry_ready",
        "1 when /readyz answers 200 (listeners bound, buffer writable)."
    );
    describe_gauge!(
        "ferry_buffer_oldest_reading_age_seconds",
        Unit::Seconds,
        "Age of the oldest buffered reading; 0 when the buffer is empty."
    );
    describe_gauge!(
        "ferry_buffer_writable",
        "1 if the buffer's last commit succeeded, 0 if it failed (full disk, I/O error)."
    );
    describe_gauge!(
        "ferry_buffer_quarantined_files",
        Unit::Count,
        "Corrupt buffer files moved aside into quarantine and still there."
    );
    describe_gauge!(
        "ferry_uplink_info",
        "1 for each enabled uplink; labels uplink (its name) and type."
    );
    describe_gauge!(
        "ferry_uplink_lag_readings",
        Unit::Count,
        "Readings in the buffer the uplink has not yet had confirmed."
    );
    describe_gauge!(
        "ferry_uplink_lag_bytes",
        Unit::Bytes,
        "Stored bytes of the readings the uplink has not yet had confirmed."
    );
    describe_gauge!(
        "ferry_uplink_oldest_unsent_age_seconds",
        Unit::Seconds,
        "Age of the oldest reading the uplink has not yet had confirmed."
    );
    describe_gauge!(
        "ferry_uplink_drain_readings_per_second",
        "Readings the uplink had confirmed per second, over the last 10 s."
    );
    describe_gauge!(
        "ferry_uplink_eta_seconds",
        Unit::Seconds,
        "Time to drain the uplink's backlog at its drain rate; 0 when empty, NaN when unknown."
    );
    describe_gauge!(
        "ferry_uplink_last_ack_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the uplink's last confirmed reading (absent before the first)."
    );
    describe_gauge!(
        "ferry_uplink_stalled",
        "1 when the uplink is connected, readings wait, and none was confirmed for status.stalled_after_secs."
    );
    describe_gauge!(
        "ferry_devices_tracked",
        Unit::Count,
        "Devices in the status page's device table."
    );
    describe_gauge!(
        "ferry_disk_free_bytes",
        Unit::Bytes,
        "Free bytes of the file system of gateway.data_dir."
    );
    describe_gauge!(
        "ferry_disk_total_bytes",
        Unit::Bytes,
        "Size of the file system of gateway.data_dir."
    );
    describe_gauge!(
        "ferry_disk_reserve_bytes",
        Unit::Bytes,
        "Space ferry keeps free on the file system of gateway.data_dir (buffer.min_free_bytes); 0: no reserve."
    );
    describe_counter!(
        "ferry_readings_received_total",
        Unit::Count,
        "Readings committed to the buffer and acknowledged to the device, by source (mqtt with qos, mqtt-will, http)."
    );
    describe_gauge!(
        "ferry_mqtt_connections",
        Unit::Count,
        "MQTT clients connected now."
    );
    describe_counter!(
        "ferry_mqtt_connects_total",
        Unit::Count,
        "MQTT connections accepted."
    );
    describe_counter!(
        "ferry_mqtt_rejected_total",
        Unit::Count,
        "MQTT publishes or connections refused, by reason."
    );
    describe_counter!(
        "ferry_mqtt_delivered_total",
        Unit::Count,
        "PUBLISHes written to local MQTT subscribers."
    );
    describe_counter!(
        "ferry_mqtt_subscriber_dropped_total",
        Unit::Count,
        "Messages that did not reach a local MQTT subscriber, by reason (qos0_queue_full, queue_full, expired, too_large_for_client, retained_full)."
    );
    describe_gauge!(
        "ferry_mqtt_subscriptions",
        Unit::Count,
        "Subscriptions of connected local MQTT clients."
    );
    describe_gauge!(
        "ferry_mqtt_retained_messages",
        Unit::Count,
        "Topics with a retained MQTT message (kept in the buffer file)."
    );
    describe_counter!(
        "ferry_mqtt_read_pauses_total",
        Unit::Count,
        "Times an MQTT connection stopped reading because uncommitted readings reached buffer.max_pending_bytes."
    );
    describe_histogram!(
        "ferry_mqtt_ack_latency_seconds",
        Unit::Seconds,
        "From an MQTT publish's arrival to its PUBACK/PUBREC (after the commit)."
    );
    describe_counter!(
        "ferry_http_requests_total",
        Unit::Count,
        "HTTP requests answered, by status class."
    );
    describe_counter!(
        "ferry_http_rejections_total",
        Unit::Count,
        "HTTP requests refused, by reason."
    );
    describe_histogram!(
        "ferry_http_request_duration_seconds",
        Unit::Seconds,
        "From an HTTP request's arrival to its answer (after the commit for accepted readings)."
    );
}
