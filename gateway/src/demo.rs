//! `ferry demo`: ferry in one command, for a newcomer right after `git clone`.
//!
//! It starts a real gateway (the same [`Gateway`] as `ferry run`) on a temporary data
//! directory, with librdkafka's in-process mock cluster (`rdkafka::mocking::MockCluster`) as
//! the Kafka upstream, MQTT on 127.0.0.1:1883 and HTTP on 127.0.0.1:8080 (or free ports when
//! those are taken), and a handful of simulated sensors that publish over real MQTT (rumqttc)
//! and HTTP. It prints the status page URL; the page shows data flowing out within seconds.
//!
//! Pressing Enter (or every `--outage-every` seconds) takes the mock broker down for
//! `--outage-secs` (15 s): the uplink goes offline, the buffer fills, and after recovery it
//! drains. A one-line summary is printed every 5 s for those without a browser.

use crate::app::{Gateway, StartError};
use crate::cli::DemoArgs;
use crate::status::api;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The mock Kafka cluster could not be created.
    #[error("cannot start the in-process Kafka mock cluster: {0}")]
    Mock(String),
    /// The temporary directory could not be created.
    #[error("cannot create a temporary data directory: {0}")]
    TempDir(#[from] std::io::Error),
    /// The generated config is invalid (a bug).
    #[error("the demo config is invalid: {0}")]
    Config(#[from] ferry_config::ConfigErrors),
    /// The gateway could not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// The Kafka topic the demo forwards to.
pub const TOPIC: &str = "ferry.readings";

fn port_or_free(port: u16) -> SocketAddr {
    let want = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    match std::net::TcpListener::bind(want) {
        Ok(l) => {
            drop(l);
            want
        }
        Err(_) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
    }
}

/// The demo's config: everything default except the listeners, the data directory, the
/// upstream, and retries short enough to see an outage and its recovery.
pub fn config(data_dir: &std::path::Path, brokers: &str) -> ferry_config::Config {
    let mut c = ferry_config::Config::default();
    c.gateway.id = "demo".into();
    c.gateway.data_dir = data_dir.to_path_buf();
    c.gateway.shutdown_grace_ms = 3000;
    c.mqtt.listen = port_or_free(1883);
    c.http.listen = port_or_free(8080);
    c.uplinks.insert(
        "kafka".into(),
        ferry_config::UplinkSettings {
            enabled: true,
            topics: vec!["#".into()],
            kind: ferry_config::UplinkKind::Kafka(ferry_config::KafkaUplink {
                brokers: brokers.to_string(),
                topic: TOPIC.into(),
                message_timeout_ms: 4000,
                initial_backoff_ms: 500,
                max_backoff_ms: 3000,
                ..Default::default()
            }),
        },
    );
    c.status.stalled_after_secs = 20;
    c
}

/// A tiny HTTP/1.1 POST (no client library for a demo sensor).
async fn post(addr: SocketAddr, path: &str, device: &str, body: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Ferry-Device: {device}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let code = std::str::from_utf8(&buf)
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(code)
}

/// A plausible temperature and humidity for sensor `i` at step `n`.
fn sample(i: usize, n: u64) -> String {
    let t = 20.0 + i as f64 + 2.0 * ((n as f64) / 20.0 + i as f64).sin();
    let rh = 45.0 + 10.0 * ((n as f64) / 35.0 + i as f64).cos();
    format!("{{\"temperature_c\":{t:.2},\"humidity_pct\":{rh:.1},\"seq\":{n}}}")
}

/// Publishes every 500 ms over MQTT QoS 1 until aborted. Reconnects on its own.
async fn mqtt_sensor(i: usize, addr: SocketAddr) {
    let id = format!("sensor-{i:02}");
    let mut opts = rumqttc::MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(15));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let topic = format!("sensors/{id}/climate");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for n in 0u64.. {
        tick.tick().await;
        let _ = client
            .publish(&topic, rumqttc::QoS::AtLeastOnce, false, sample(i, n))
            .await;
    }
}

/// Posts every second over HTTP until aborted.
async fn http_sensor(i: usize, addr: SocketAddr) {
    let id = format!("sensor-{i:02}");
    let path = format!("/v1/readings/sensors/{id}/climate");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0u64.. {
        tick.tick().await;
        let _ = post(addr, &path, &id, &sample(i, n)).await;
    }
}

fn one_line(r: &api::StatusReport) -> String {
    let ups: Vec<String> = r
        .uplinks
        .iter()
        .map(|u| {
            let state = serde_json::to_value(u.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!(
                "{} {}{}, waiting {}, drained {:.1}/s",
                u.name,
                state.replace('_', " "),
                if u.stalled { " (stalled)" } else { "" },
                u.lag_readings,
                u.drain_rate_per_sec
            )
        })
        .collect();
    format!(
        "in {:.1}/s from {} devices | {} | buffer {} readings",
        r.ingest.rate,
        r.devices.tracked,
        ups.join(" | "),
        r.buffer.readings
    )
}

/// Runs the demo until Ctrl-C (or `--duration`).
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).map_err(|e| DemoError::Mock(e.to_string()))?;
    mock.create_topic(TOPIC, 3, 1)
        .map_err(|e| DemoError::Mock(e.to_string()))?;
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let config = config(dir.path(), &mock.bootstrap_servers());
    config.validate()?;
    let mut quiet = config.gateway.clone();
    quiet.log_level = "warn".into();
    crate::telemetry::init(&quiet);

    let gw = Gateway::start(config).await?;
    let st = gw.status_state();
    let addrs = gw.addrs().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(gw.run(async {
        let _ = stop_rx.await;
    }));

    let mqtt = addrs.get("mqtt").copied();
    let http = addrs.get("http").copied();
    let mut sensors = Vec::new();
    for i in 0..args.sensors.max(1) {
        match (i % 3 == 2, mqtt, http) {
            (true, _, Some(h)) | (false, None, Some(h)) => {
                sensors.push(tokio::spawn(http_sensor(i + 1, h)))
            }
            (_, Some(m), _) => sensors.push(tokio::spawn(mqtt_sensor(i + 1, m))),
            _ => {}
        }
    }

    let page = http.map_or_else(
        || "(no HTTP listener)".to_string(),
        |h| format!("http://{h}/"),
    );
    println!();
    println!("ferry demo is running.");
    println!("  Status page:   {page}");
    if let Some(m) = mqtt {
        println!(
            "  MQTT ingest:   mqtt://{m}  (e.g. mosquitto_pub -h {} -p {} -t sensors/me/t -m 21.5)",
            m.ip(),
            m.port()
        );
    }
    if let Some(h) = http {
        println!("  HTTP ingest:   http://{h}/v1/readings/<topic>");
    }
    println!(
        "  Upstream:      an in-process Kafka mock cluster at {} (topic {TOPIC})",
        mock.bootstrap_servers()
    );
    println!(
        "  Data dir:      {} (removed on exit)",
        dir.path().display()
    );
    println!(
        "  `ferry status --url http://{}` prints the same facts in a terminal.",
        http.map(|h| h.to_string()).unwrap_or_default()
    );
    println!();
    println!(
        "Press Enter to simulate a {} s Kafka outage{}; Ctrl-C to stop.",
        args.outage_secs,
        args.outage_every
            .map(|s| format!(" (one also starts every {s} s)"))
            .unwrap_or_default()
    );

    // Enter on stdin; a closed stdin (no terminal) just means no key presses.
    let (key_tx, mut key_rx) = mpsc::channel::<()>(4);
    std::thread::spawn(move || {
        let mut line = String::new();
        while matches!(std::io::stdin().read_line(&mut line), Ok(n) if n > 0) {
            line.clear();
            if key_tx.blocking_send(()).is_err() {
                break;
            }
        }
    });

    let outage = Duration::from_secs(args.outage_secs.max(1));
    let mut outage_until: Option<tokio::time::Instant> = None;
    let mut every = args.outage_every.map(|s| {
        let p = Duration::from_secs(s.max(outage.as_secs() + 5));
        tokio::time::interval_at(tokio::time::Instant::now() + p, p)
    });
    let mut report = tokio::time::interval(Duration::from_secs(5));
    let end = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let start_outage = tokio::select! {
            _ = &mut ctrl_c => break,
            _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => break,
            Some(()) = key_rx.recv() => true,
            _ = async { match every.as_mut() { Some(i) => { i.tick().await; }, None => std::future::pending().await } } => true,
            _ = async { match outage_until { Some(u) => tokio::time::sleep_until(u).await, None => std::future::pending().await } } => {
                outage_until = None;
                if let Err(e) = mock.broker_up(1) {
                    eprintln!("Could not bring the mock broker back: {e}");
                }
                println!(">>> Kafka is back. Watch the backlog drain on the status page.");
                false
            }
            _ = report.tick() => {
                println!("{}", one_line(&api::collect(&st, 0).await));
                false
            }
        };
        if start_outage && outage_until.is_none() {
            if let Err(e) = mock.broker_down(1) {
                eprintln!("Could not take the mock broker down: {e}");
                continue;
            }
            outage_until = Some(tokio::time::Instant::now() + outage);
            println!(
                ">>> Kafka is down for {} s: readings keep being accepted and wait in the buffer.",
                outage.as_secs()
            );
        }
    }
    println!("Stopping the demo.");
    for s in &sensors {
        s.abort();
    }
    if outage_until.is_some() {
        let _ = mock.broker_up(1);
    }
    let _ = stop_tx.send(());
    match gateway.await {
        Ok(r) => r?,
        Err(e) => eprintln!("The gateway task failed: {e}"),
    }
    drop(mock);
    Ok(())
}
