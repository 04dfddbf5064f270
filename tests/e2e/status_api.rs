//! End-to-end tests of the status endpoints against the real `ferry` binary: `/api/status` and
//! `/metrics` under MQTT and HTTP traffic, secrets never shown, the status token, the health
//! endpoints, `status.listen`, and `ferry status`.

use crate::support;
use ferry_tests::Ferry;
use serde_json::{Value, json};
use std::time::Duration;

const INGEST_TOKEN: &str = "ingest-secret-token-123";
const STATUS_TOKEN: &str = "status-secret-token-456";
const MQTT_PASSWORD: &str = "mqtt-secret-password-789";
const KAFKA_PASSWORD: &str = "kafka-sasl-secret-000";
const SECRETS: [&str; 4] = [INGEST_TOKEN, STATUS_TOKEN, MQTT_PASSWORD, KAFKA_PASSWORD];

fn config() -> String {
    format!(
        r#"
[mqtt]
allow_anonymous = false

[[mqtt.users]]
username = "fleet"
password = "{MQTT_PASSWORD}"

[[http.tokens]]
token = "{INGEST_TOKEN}"

[status]
token = "{STATUS_TOKEN}"

[uplinks.kafka]
type = "kafka"
# Nothing listens on the discard port: the uplink can never deliver, so readings wait.
brokers = "127.0.0.1:9"
security_protocol = "sasl_plaintext"
sasl_mechanism = "PLAIN"
sasl_username = "ferry"
sasl_password = "{KAFKA_PASSWORD}"
message_timeout_ms = 1500
initial_backoff_ms = 200
max_backoff_ms = 1000
"#
    )
}

async fn wait_status(base: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    support::wait_status(base, Some(STATUS_TOKEN), what, Duration::from_secs(20), f).await
}

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows the secret {s:?}:\n{text}");
    }
}

async fn mqtt_publish(addr: std::net::SocketAddr, client_id: &str, n: usize) {
    let mut opts = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials("fleet", MQTT_PASSWORD);
    opts.set_keep_alive(Duration::from_secs(10));
    let (c, mut ev) = rumqttc::AsyncClient::new(opts, 32);
    for i in 0..n {
        c.publish(
            "site/climate",
            rumqttc::QoS::AtLeastOnce,
            false,
            format!("{{\"t\":{i}}}"),
        )
        .await
        .unwrap();
    }
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("MQTT failed: {other:?}"),
        }
    }
    // Stay connected: the report counts connected clients.
    tokio::spawn(async move {
        let _c = c;
        while ev.poll().await.is_ok() {}
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_under_traffic_show_no_secret() {
    let ferry = Ferry::start(&config());
    let base = ferry.http_url();
    let http = support::http();
    for batch in 0..3 {
        let items: Vec<Value> = (0..5)
            .map(|i| json!({"topic": "site/power", "device": format!("meter-{batch}"), "payload": {"w": i}}))
            .collect();
        let resp = http
            .post(format!("{base}/v1/readings"))
            .bearer_auth(INGEST_TOKEN)
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    // One refused request, counted as a rejection.
    let resp = http
        .post(format!("{base}/v1/readings/site/power"))
        .bearer_auth("not-the-token")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    mqtt_publish(ferry.addr("mqtt"), "thermo-1", 10).await;

    let v = wait_status(
        &base,
        "25 readings are counted and the uplink has failed",
        |v| {
            v["ingest"]["total"] == 25
                && v["uplinks"][0]["retried_total"].as_u64().unwrap_or(0) >= 1
                && v["mqtt"]["connected_clients"] == 1
        },
    )
    .await;
    assert_eq!(v["gateway"]["id"], "test-gw");
    assert!(v["gateway"]["uptime_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(v["ready"], true);
    assert_eq!(v["ingest"]["total_by_source"]["http"], 15);
    assert_eq!(v["ingest"]["total_by_source"]["mqtt"], 10);
    assert!(!v["ingest"]["history"].as_array().unwrap().is_empty());
    let u = &v["uplinks"][0];
    assert_eq!(u["name"], "kafka");
    assert!(
        matches!(u["state"].as_str(), Some("backing_off" | "offline")),
        "{u}"
    );
    assert_eq!(u["lag_readings"], 25);
    assert!(u["lag_bytes"].as_u64().unwrap() > 0);
    assert!(u["oldest_unsent_age_ms"].is_u64());
    assert!(u["last_error"].is_string(), "{u}");
    assert_eq!(u["last_ack_ms"], Value::Null);
    assert_eq!(v["summary"]["level"], "down");
    assert_eq!(v["summary"]["data_out"], false);
    assert_eq!(v["summary"]["waiting_readings"], 25);
    assert!(v["summary"]["not_out_since_ms"].is_u64());
    assert_eq!(v["buffer"]["readings"], 25);
    assert!(v["buffer"]["used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["buffer"]["writable"], true);
    assert!(v["buffer"]["oldest_reading_age_ms"].is_u64());
    assert_eq!(v["losses"]["rejected"]["http.unauthorized"], 1);
    assert_eq!(v["dead_letters"]["count"], 0);
    let ids: Vec<&str> = v["devices"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    for d in ["meter-0", "meter-1", "meter-2", "thermo-1"] {
        assert!(ids.contains(&d), "{d} not in {ids:?}");
    }
    assert_eq!(v["devices"]["tracked"], 4);
    assert!(v["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["quarantine"]["flagged"], false);
    assert!(v["listeners"]["http"].is_string() && v["listeners"]["mqtt"].is_string());
    assert_eq!(v["clock"]["source"], "kernel", "{:#}", v["clock"]);
    assert!(v["clock"]["synchronized"].is_boolean(), "{:#}", v["clock"]);
    assert_no_secret("/api/status", &v.to_string());

    let (code, text) = support::get(&format!("{base}/metrics"), Some(STATUS_TOKEN)).await;
    assert_eq!(code, 200);
    for needle in [
        "ferry_readings_received_total{source=\"http\"} 15",
        "ferry_readings_received_total{source=\"mqtt\",qos=\"1\"} 10",
        "ferry_buffer_bytes ",
        "ferry_buffer_readings 25",
        "ferry_buffer_max_bytes ",
        "ferry_uplink_state{uplink=\"kafka\"} ",
        "ferry_uplink_retries_total{uplink=\"kafka\"} ",
        "ferry_uplink_lag_readings{uplink=\"kafka\"} 25",
        "ferry_uplink_lag_bytes{uplink=\"kafka\"} ",
        "ferry_uplink_oldest_unsent_age_seconds{uplink=\"kafka\"} ",
        "ferry_uplink_stalled{uplink=\"kafka\"} 0",
        "ferry_mqtt_connections 1",
        "ferry_http_rejections_total{reason=\"unauthorized\"} 1",
        "ferry_devices_tracked 4",
        "ferry_disk_free_bytes ",
        "ferry_uptime_seconds ",
        "ferry_clock_synchronized ",
        "ferry_gateway_info{gateway=\"test-gw\",version=\"",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }
    assert_no_secret("/metrics", &text);

    // The page, the health endpoints and the refusals show no secret either.
    for (path, token, want) in [
        ("/", None, 200),
        ("/healthz", None, 200),
        ("/readyz", None, 200),
        ("/api/status", None, 401),
        ("/api/status", Some("status-secret-token-45"), 401),
        ("/metrics", None, 401),
        ("/metrics", Some(INGEST_TOKEN), 401),
    ] {
        let (code, body) = support::get(&format!("{base}{path}"), token).await;
        assert_eq!(code, want, "{path} with {token:?}: {body}");
        assert_no_secret(path, &body);
    }
    assert_no_secret("the log", &ferry.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_listen_gives_the_status_its_own_listener_and_ferry_status_reads_it() {
    let ferry = Ferry::start(
        r#"
[gateway]
clock_sync = "assume"

[status]
listen = "127.0.0.1:0"

"#,
    );
    let status_base = format!("http://{}", ferry.addr("status"));
    let (code, body) = support::get(&format!("{status_base}/api/status"), None).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["uplinks"].as_array().unwrap().len(), 0);
    assert_eq!(v["summary"]["level"], "idle");
    assert_eq!(v["clock"]["synchronized"], true, "{:#}", v["clock"]);
    assert_eq!(v["clock"]["source"], "assume", "{:#}", v["clock"]);
    assert!(v["clock"]["since_boot_ms"].as_u64().unwrap() > 0);
    let (code, _) = support::get(&format!("{status_base}/readyz"), None).await;
    assert_eq!(code, 200);
    // Not on the ingest listener any more.
    let (code, _) = support::get(&format!("{}/api/status", ferry.http_url()), None).await;
    assert_eq!(code, 404);

    let url = status_base.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || Ferry::cli(&["status", "--url", &url]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("IDLE: No uplink is enabled"), "{out}");
    assert!(out.contains("buffer   0 readings"), "{out}");
    assert!(out.contains("disk     "), "{out}");
    assert!(
        out.contains("clock    synchronized") && out.contains("(assumed: gateway.clock_sync)"),
        "{out}"
    );

    let (code, out, err) = tokio::task::spawn_blocking(|| {
        Ferry::cli(&["status", "--url", "http://127.0.0.1:9", "--json"])
    })
    .await
    .unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_status_needs_the_token_when_one_is_set() {
    let ferry = Ferry::start(&config());
    let url = ferry.http_url();
    let u = url.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || Ferry::cli(&["status", "--url", &u]))
            .await
            .unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        Ferry::cli(&["status", "--url", &url, "--token", STATUS_TOKEN])
    })
    .await
    .unwrap();
    // Exit 2: data is not getting out (the uplink points nowhere), but the report was read.
    assert!(code == 2 || code == 0, "{code} {out}{err}");
    assert!(out.contains("kafka"), "{out}");
    assert_no_secret("ferry status", &out);
}

/// Every metric explains itself: Debian's `promtool check metrics` finds nothing to say about
/// `/metrics` (every series has HELP text, counters end in `_total`, units in names), and the
/// alert rules and their unit tests in deploy/prometheus pass `promtool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_alert_rules_pass_promtool() {
    if !ferry_tests::require_tool("promtool", "metrics_and_alert_rules_pass_promtool") {
        return;
    }
    let ferry = Ferry::start(
        "[uplinks.kafka]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ninitial_backoff_ms = 100\n",
    );
    let base = ferry.http_url();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v1/readings"))
        .json(&serde_json::json!([{"topic": "a/b", "payload": 1}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let helps = text
        .lines()
        .filter(|l| l.starts_with("# HELP ferry_"))
        .count();
    assert!(helps >= 30, "{helps} HELP lines:\n{text}");
    let run = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write as _;
        let mut child = std::process::Command::new("promtool")
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = run(&["check", "metrics"], Some(&text));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    let (ok, out) = run(
        &["check", "rules", "deploy/prometheus/ferry-alerts.yml"],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(
        &["test", "rules", "deploy/prometheus/ferry-alerts.test.yml"],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");

    // The Grafana dashboard is JSON and asks only for metrics that exist (described in code).
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let described: String = [
        "gateway/src/status/metrics.rs",
        "buffer/src/lib.rs",
        "uplink/src/status.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(format!("{root}/{f}")).unwrap())
    .collect();
    let dash =
        std::fs::read_to_string(format!("{root}/deploy/grafana/ferry-dashboard.json")).unwrap();
    let _: Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/ferry-alerts.yml")).unwrap();
    for text in [&dash, &rules] {
        for (i, _) in text.match_indices("ferry_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
            if base.len() > "ferry_".len() {
                assert!(
                    described.contains(&format!("\"{base}\"")),
                    "{base} is queried but no metric of that name is described"
                );
            }
        }
    }
}
