//! Upgrade safety: a new ferry reads the buffer an older one left behind, and a
//! buffer written by a *newer* ferry is refused clearly, never quarantined or overwritten.
//!
//! `tests/fixtures/buffer-format1.redb.gz` is a buffer file written by ferry 0.1.0 (buffer
//! format 1, redb 4): five HTTP readings (`{"k": "fixture-N", …}`, devices `dev-1`…`dev-5`),
//! nothing forwarded. If a dependency upgrade (redb's file format) or a change to the segment
//! layout makes this build unable to read it, this test fails: bump the format version and
//! write a migration instead.

use crate::support;

use ferry_tests::{Ferry, buffered_readings, mosquitto, require_tool};
use redb::ReadableDatabase;
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

fn install_fixture(data_dir: &Path) {
    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/buffer-format1.redb.gz"
    ))
    .unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(data_dir.join(ferry_buffer::FILE_NAME), raw).unwrap();
}

fn keys(data_dir: &Path) -> Vec<(u64, String)> {
    buffered_readings(data_dir, "kafka")
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            (r.id, v["k"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn this_build_reads_a_format_1_buffer_and_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    install_fixture(&data_dir);

    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "stats",
        "--json",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["format_version"], 1, "{stats:#}");
    assert_eq!(stats["readings"], 5, "{stats:#}");
    // Verified as it is, without upgrading it (the index still has format 1's row type).
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "verify",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let want: Vec<(u64, String)> = (1..=5).map(|i| (i, format!("fixture-{i}"))).collect();
    assert_eq!(keys(&data_dir), want);

    // The new binary runs on it: the old readings stay, ids continue after them.
    let mut ferry = Ferry::start_in("[mqtt]\nenabled = false\n", &[], Some(&data_dir));
    let st: Value = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v1/readings", ferry.http_url()))
            .json(&serde_json::json!([{"topic": "site/a/temp", "payload": {"k": "new-6"}}]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["first_id"], 6,
            "ids must continue after the old buffer's"
        );
        reqwest::get(format!("{}/api/status", ferry.http_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(st["quarantine"]["flagged"], false, "{:#}", st["quarantine"]);
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    let mut want = want;
    want.push((6, "new-6".into()));
    assert_eq!(keys(&data_dir), want);
    // The writer upgraded the file to this build's format; the old readings say that their
    // clock is unknown, the new one carries this boot's stamp.
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "stats",
        "--json",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        stats["format_version"],
        ferry_buffer::FORMAT_VERSION,
        "{stats:#}"
    );
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "verify",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "the upgraded file verifies: {out}{err}");
    let marks: Vec<(u64, ferry_buffer::ClockMark, bool)> = buffered_readings(&data_dir, "kafka")
        .iter()
        .map(|r| (r.id, r.clock.mark, r.clock.boot != 0))
        .collect();
    use ferry_buffer::ClockMark::Unknown;
    assert_eq!(
        &marks[..5],
        &(1..=5).map(|i| (i, Unknown, false)).collect::<Vec<_>>()[..]
    );
    assert_ne!(marks[5].1, Unknown, "{marks:?}");
    assert!(marks[5].2, "{marks:?}");
}

/// The cursors of a 0.1 buffer are those of uplinks named `kafka` and `mqtt`: configured
/// under those names, they pick up where 0.1 left off and drain it.
#[test]
fn a_format_1_buffer_drains_to_uplinks_named_kafka_and_mqtt() {
    let test = "a_format_1_buffer_drains_to_uplinks_named_kafka_and_mqtt";
    if !require_tool("mosquitto", test) {
        return;
    }
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    install_fixture(&data_dir);
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let broker = mosquitto();
    let mut ferry = Ferry::start_in(
        &format!(
            r#"
[mqtt]
enabled = false

[uplinks.kafka]
type = "kafka"
brokers = "{}"
topic = "readings"

[uplinks.mqtt]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
"#,
            mock.bootstrap_servers(),
            broker.port
        ),
        &[],
        Some(&data_dir),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Instant::now();
    let st = loop {
        let st = rt.block_on(support::status(&ferry.http_url()));
        let acked = |name: &str| {
            st["uplinks"]
                .as_array()
                .and_then(|a| a.iter().find(|u| u["name"] == name))
                .map(|u| u["acked_total"].as_u64().unwrap_or(0))
        };
        if st["buffer"]["readings"] == 0 && acked("kafka") == Some(5) && acked("mqtt") == Some(5) {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the 0.1 buffer did not drain: {st:#}\n{}",
            ferry.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["uplinks"][0]["type"], "kafka", "{st:#}");
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    // Kafka got the five readings of the 0.1 buffer, with the ids 0.1 gave them.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "upgrade")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["readings"]).unwrap();
    let mut got = std::collections::BTreeSet::new();
    let t = Instant::now();
    while got.len() < 5 && t.elapsed() < Duration::from_secs(15) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            use rdkafka::message::Headers;
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            // A format-1 reading's clock was never recorded: it says so.
            let clock = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ferry-clock")
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            });
            assert_eq!(clock.as_deref(), Some("unknown"), "{v}");
            got.insert(v["k"].as_str().unwrap_or_default().to_string());
        }
    }
    let want: std::collections::BTreeSet<String> =
        (1..=5).map(|i| format!("fixture-{i}")).collect();
    assert_eq!(got, want);
}

#[test]
fn a_buffer_from_a_newer_ferry_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    install_fixture(&data_dir);
    let file = data_dir.join(ferry_buffer::FILE_NAME);
    {
        let db = redb::Database::open(&file).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut t = txn.open_table(meta).unwrap();
            t.insert("format_version", ferry_buffer::FORMAT_VERSION + 1)
                .unwrap();
        }
        txn.commit().unwrap();
    }

    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "[mqtt]\nenabled = false\n").unwrap();
    let mut child = std::process::Command::new(ferry_tests::bin_path("ferry"))
        .args(["run", "--config"])
        .arg(&config)
        .env("FERRY_GATEWAY_DATA_DIR", &data_dir)
        .env("FERRY_HTTP_LISTEN", "127.0.0.1:0")
        .env("FERRY_GATEWAY_ID", "upgrade")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("ferry kept running on a buffer from a newer version");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(65),
        "ferry must refuse with exit code 65 (the unit's RestartPreventExitStatus): {err}"
    );
    let v = ferry_buffer::FORMAT_VERSION;
    assert!(
        err.contains(&format!("format version {}", v + 1)) || err.contains(&format!("{}", v + 1)),
        "the error must name the file's format version: {err}"
    );
    assert!(
        err.to_lowercase().contains("upgrade"),
        "the error must say what to do: {err}"
    );
    // Still the newer file, with its data (redb may touch its header on open; the content
    // must be as it was).
    let db = redb::Database::open(&file).expect("the newer buffer file must still open");
    let txn = db.begin_read().unwrap();
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let t = txn.open_table(meta).unwrap();
    let found = t.get("format_version").unwrap().map(|g| g.value());
    assert_eq!(found, Some(v + 1), "the file's format version was changed");
    let readings = t.get("readings").unwrap().map(|g| g.value());
    assert_eq!(readings, Some(5), "the file's readings were changed");
    assert!(
        !data_dir.join(ferry_buffer::QUARANTINE_DIR).exists(),
        "a newer buffer is not corrupt and must not be quarantined"
    );
    eprintln!("refused with: {}", err.lines().last().unwrap_or_default());
}
