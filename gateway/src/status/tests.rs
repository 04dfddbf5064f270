//! Handler tests with `Router::oneshot` (no socket).

use super::*;
use axum::body::Body;
use axum::http::Request as HttpRequest;
use ferry_buffer::{BufferOptions, Reading, Source};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Fixture {
    state: StatusState,
    _dir: tempfile::TempDir,
}

fn fixture(token: Option<&str>) -> Fixture {
    fixture_with(token, Vec::new(), None)
}

/// A status state whose hub holds `uplinks` and the MQTT counters `mqtt`.
fn fixture_with(
    token: Option<&str>,
    uplinks: Vec<UplinkStatus>,
    mqtt: Option<MqttStats>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.gateway.id = "gw-test".into();
    config.gateway.data_dir = dir.path().to_path_buf();
    config.status.token = token.map(Into::into);
    config.status.max_devices = 3;
    let buffer = Buffer::open(
        dir.path(),
        BufferOptions {
            consumers: vec!["kafka".into()],
            flush_interval: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    let hub = Hub::new(HubParts {
        started: Instant::now(),
        devices: DeviceTable::new(config.status.max_devices),
        mqtt,
        http: None,
        uplinks,
        listeners: BTreeMap::new(),
    });
    Fixture {
        state: StatusState::new(hub, buffer, Arc::new(config)),
        _dir: dir,
    }
}

async fn get(
    st: &StatusState,
    path: &str,
    auth: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = HttpRequest::get(path);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = router(st.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn ingest(st: &StatusState, devices: &[&str]) {
    let readings: Vec<Reading> = devices
        .iter()
        .map(|d| {
            Reading::new(
                Source::Http,
                d.to_string(),
                "t/x".to_string(),
                vec![7u8; 40],
            )
        })
        .collect();
    let seen = DeviceBatch::of(&readings);
    st.buffer.append(readings).await.unwrap();
    st.hub.devices.record(&seen);
}

#[tokio::test]
async fn status_json_under_traffic() {
    let kafka = UplinkStatus::new("kafka", "kafka", vec!["kafka-secret-pw".into()]);
    let mqtt = MqttStats::default();
    for _ in 0..4 {
        mqtt.connected();
    }
    mqtt.rejected("bad_credentials", 2);
    let f = fixture_with(None, vec![kafka.clone()], Some(mqtt));
    let st = &f.state;
    ingest(st, &["a", "b", "a"]).await;
    ingest(st, &["c", "d"]).await;
    kafka.record_retry(
        "SASL authentication failed with password kafka-secret-pw",
        Duration::from_secs(5),
        true,
    );

    let (code, _, body) = get(st, "/api/status", None).await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["gateway"]["id"], "gw-test");
    assert_eq!(v["gateway"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["ingest"]["total"], 5);
    assert_eq!(v["ingest"]["total_by_source"]["http"], 5);
    assert_eq!(v["buffer"]["readings"], 5);
    assert!(v["buffer"]["used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["buffer"]["writable"], true);
    let u = &v["uplinks"][0];
    assert_eq!(u["name"], "kafka");
    assert_eq!(u["type"], "kafka");
    assert_eq!(u["state"], "offline");
    assert_eq!(u["lag_readings"], 5);
    assert_eq!(u["stalled"], false, "offline is not stalled");
    assert!(u["oldest_unsent_age_ms"].is_u64());
    assert_eq!(v["summary"]["level"], "down");
    assert_eq!(v["summary"]["waiting_readings"], 5);
    assert!(
        v["summary"]["headline"]
            .as_str()
            .unwrap()
            .starts_with("Data is not getting out to kafka since"),
        "{}",
        v["summary"]["headline"]
    );
    assert_eq!(v["mqtt"]["connected_clients"], 4);
    assert_eq!(v["losses"]["rejected"]["mqtt.bad_credentials"], 2);
    // Bounded device table: 4 devices seen, 3 kept, the least recent ("b"... then "a") gone.
    assert_eq!(v["devices"]["tracked"], 3);
    assert_eq!(v["devices"]["evicted_total"], 1);
    assert_eq!(v["devices"]["list"][0]["id"], "d");
    assert!(v["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["quarantine"]["flagged"], false);
    assert!(!body.contains("kafka-secret-pw"), "{body}");
    assert!(body.contains("***"), "the scrubbed error is shown");

    let (_, _, body) = get(st, "/api/status?devices=1", None).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["devices"]["list"].as_array().unwrap().len(), 1);

    // The report round-trips through its own schema (what `ferry status` relies on).
    let r: api::StatusReport = serde_json::from_str(&body).unwrap();
    assert!(client::render(&r).contains("OFFLINE"));
}

#[tokio::test]
async fn stalled_means_connected_with_data_waiting_and_no_ack() {
    let kafka = UplinkStatus::new("kafka", "kafka", vec![]);
    let f = fixture_with(None, vec![kafka.clone()], None);
    let mut config = (*f.state.config).clone();
    config.status.stalled_after_secs = 1;
    let st = StatusState::new(
        f.state.hub.clone(),
        f.state.buffer.clone(),
        Arc::new(config),
    );
    kafka.set_state(ferry_uplink::LinkState::Connected);
    ingest(&st, &["a"]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = api::collect(&st, 10).await;
    assert_eq!(r.uplinks[0].state, api::UplinkState::Connected);
    assert!(r.uplinks[0].stalled);
    assert_eq!(r.summary.level, api::Level::Warn);
    assert!(
        r.summary
            .headline
            .contains("connected but nothing is acknowledged")
    );
}

#[tokio::test]
async fn metrics_cover_the_page() {
    // The gateway installs the recorder before it creates uplinks (their state gauge is set
    // on creation); so does this test, which may be the first of the process to run.
    metrics::install();
    let kafka = UplinkStatus::new("kafka", "kafka", vec![]);
    let f = fixture_with(Some("s3cret-status-token"), vec![kafka.clone()], None);
    let st = &f.state;
    ingest(st, &["a"]).await;
    let (code, headers, body) = get(st, "/metrics", Some("Bearer s3cret-status-token")).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    for name in [
        "ferry_gateway_info",
        "ferry_uptime_seconds",
        "ferry_buffer_bytes",
        "ferry_buffer_readings",
        "ferry_buffer_max_bytes",
        "ferry_buffer_oldest_reading_age_seconds",
        "ferry_buffer_writable",
        "ferry_uplink_lag_readings{uplink=\"kafka\"}",
        "ferry_uplink_lag_bytes{uplink=\"kafka\"}",
        "ferry_uplink_drain_readings_per_second",
        "ferry_uplink_stalled",
        "ferry_uplink_eta_seconds{uplink=\"kafka\"} NaN",
        "ferry_uplink_state",
        "type=\"kafka\"",
        "ferry_uplink_info{",
        "ferry_disk_free_bytes",
        "ferry_devices_tracked",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(!body.contains("s3cret-status-token"));
    assert!(!body.contains("kafka-secret-pw"));
}

#[test]
fn installing_the_recorder_twice_is_fine() {
    let a = metrics::install() as *const _;
    let b = metrics::install() as *const _;
    assert_eq!(a, b);
}

#[tokio::test]
async fn the_token_guards_data_but_not_the_page_or_probes() {
    let f = fixture(Some("s3cret-status-token"));
    let st = &f.state;
    st.hub.set_ready(true);
    for path in ["/api/status", "/metrics"] {
        let (code, headers, body) = get(st, path, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        assert!(!body.contains("s3cret"));
        let (code, _, _) = get(st, path, Some("Bearer wrong-token-of-other-len")).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        let (code, _, _) = get(st, path, Some("Bearer s3cret-status-tokem")).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        let (code, _, _) = get(st, path, Some("Basic s3cret-status-token")).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        let (code, _, body) = get(st, path, Some("Bearer s3cret-status-token")).await;
        assert_eq!(code, StatusCode::OK, "{path}");
        assert!(!body.contains("s3cret"), "{path}");
    }
    let (code, _, _) = get(st, "/favicon.ico", None).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    for path in ["/", "/healthz", "/readyz"] {
        let (code, _, body) = get(st, path, None).await;
        assert_eq!(code, StatusCode::OK, "{path}");
        assert!(!body.contains("s3cret"), "{path}");
    }
}

#[tokio::test]
async fn readiness_follows_the_listeners_and_the_buffer() {
    let f = fixture(None);
    let st = &f.state;
    let (code, _, body) = get(st, "/healthz", None).await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "ok\n"));
    let (code, _, body) = get(st, "/readyz", None).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("listeners"), "{body}");
    st.hub.set_ready(true);
    let (code, _, body) = get(st, "/readyz", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    st.buffer.close().await;
    let (code, _, body) = get(st, "/readyz", None).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("buffer"), "{body}");
}

#[tokio::test]
async fn the_page_is_small_self_contained_and_embedded() {
    let f = fixture(None);
    let (code, headers, body) = get(&f.state, "/", None).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(body.len() < 30 * 1024, "{} bytes", body.len());
    for external in ["http://", "https://", "//cdn", "@import", "<link", "src=\""] {
        assert!(!body.contains(external), "the page references {external}");
    }
    for needed in [
        "prefers-color-scheme",
        "name=\"viewport\"",
        "api/status",
        "<svg",
    ] {
        assert!(body.contains(needed), "{needed}");
    }
}

#[tokio::test]
async fn the_openapi_document_has_the_status_paths() {
    let mut config = Config::default();
    let v: serde_json::Value =
        serde_json::from_str(&crate::http::openapi_document(&config)).unwrap();
    for p in ["/api/status", "/healthz", "/readyz", "/v1/readings"] {
        assert!(v["paths"][p].is_object(), "{p} missing");
    }
    assert!(v["components"]["schemas"]["StatusReport"].is_object());
    assert!(v["components"]["schemas"]["SenmlRecord"].is_object());
    // Without status.token, /api/status needs no Authorization header.
    assert!(v["components"]["securitySchemes"]["status_token"].is_null());
    assert!(v["paths"]["/api/status"]["get"]["security"].is_null());
    assert_eq!(
        v["paths"]["/api/status"]["get"]["parameters"][0]["in"],
        "query"
    );

    config.status.token = Some("t0k".to_string().into());
    let v: serde_json::Value =
        serde_json::from_str(&crate::http::openapi_document(&config)).unwrap();
    assert!(v["components"]["securitySchemes"]["status_token"].is_object());
    assert_eq!(
        v["paths"]["/api/status"]["get"]["security"][0]["status_token"],
        serde_json::json!([])
    );
}
