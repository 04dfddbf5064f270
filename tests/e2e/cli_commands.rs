//! The `ferry` command line: `--version`, `check-config`, and `buffer …` on a real buffer.

use ferry_buffer::{Buffer, BufferOptions, Reading, Source};
use ferry_tests::Ferry;

#[test]
fn version_prints_the_crate_version() {
    let (code, out, _) = Ferry::cli(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("ferry {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_accepts_the_example_and_lists_every_error_with_exit_64() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/ferry.example.toml");
    let (code, out, err) = Ferry::cli(&["check-config", example]);
    assert_eq!(code, 0, "{out}{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[buffer]\nmax_byte = 10\nwhen_full = \"sometimes\"\n\n[mqtt]\nmax_inflight = \"lots\"\n\n\
         [uplinks.kafka]\ntype = \"kafka\"\ntopic = \"bad topic!\"\n\n[[uplinks.kafka.routes]]\nfilter = \"a/#/b\"\ntopic = \"t\"\n",
    )
    .unwrap();
    let (code, _, err) = Ferry::cli(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    for needle in [
        "buffer.max_byte",
        "did you mean 'max_bytes'",
        "buffer.when_full",
        "mqtt.max_inflight",
        "uplinks.kafka.topic",
        "uplinks.kafka.routes[0].filter",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
}

#[test]
fn check_config_explain_shows_what_a_cloud_preset_derived_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clouds.toml");
    std::fs::write(
        &file,
        r#"
[gateway]
id = "site-7"

[uplinks.azure]
type = "kafka"
cloud = "event-hubs"
connection_string = "Endpoint=sb://my-ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=TOPSECRETKEY=;EntityPath=readings"

[uplinks.confluent]
type = "kafka"
cloud = "confluent"
brokers = "pkc-1.eu-west-1.aws.confluent.cloud:9092"
api_key = "KEY7"
api_secret = "TOPSECRETAPI"
"#,
    )
    .unwrap();
    let (code, out, err) = Ferry::cli(&["check-config", file.to_str().unwrap(), "--explain"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for want in [
        "[uplinks.azure]",
        "brokers = \"my-ns.servicebus.windows.net:9093\"",
        "topic = \"readings\"",
        "compression = \"gzip\"",
        "idempotent = false",
        "connection_string = \"***\"",
        "#   sasl.username = $ConnectionString",
        "#   sasl.password = ***",
        "#   max.in.flight.requests.per.connection = 1",
        "[uplinks.confluent]",
        "api_secret = \"***\"",
        "#   sasl.username = KEY7",
        "#   enable.idempotence = true",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        !out.contains("TOPSECRET") && !err.contains("TOPSECRET"),
        "{out}\n{err}"
    );

    // Without --explain, only the verdict.
    let (code, out, _) = Ferry::cli(&["check-config", file.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(!out.contains("librdkafka"), "{out}");
}

#[test]
fn run_refuses_a_bad_config_with_exit_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway]\nshutdown_grace = 5\n").unwrap();
    let (code, _, err) = Ferry::cli(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("gateway.shutdown_grace"), "{err}");
}

#[test]
fn buffer_commands_inspect_verify_and_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = BufferOptions {
            consumers: vec!["kafka".into()],
            ..Default::default()
        };
        let buf = Buffer::open(dir.path(), opts).unwrap();
        let rs = (0..5)
            .map(|i| Reading::new(Source::Http, "d1", "a/b", format!("{i}")))
            .collect();
        buf.append(rs).await.unwrap();
        let mut rd = buf.reader("kafka").unwrap();
        let seg = rd.next(1).await.unwrap().remove(0);
        rd.dead_letter(vec![(seg.readings[2].clone(), "MSG_SIZE_TOO_LARGE".into())])
            .await
            .unwrap();
        buf.append(vec![Reading::new(Source::Http, "d1", "a/b", "x")])
            .await
            .unwrap();
        buf.close().await;
    });
    let d = dir.path().to_str().unwrap();

    let (code, out, err) = Ferry::cli(&["buffer", "stats", "--data-dir", d, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["readings"], 6);
    assert_eq!(v["dead_letters"], 1);
    assert_eq!(v["consumers"]["kafka"]["lag_readings"], 6);

    let (code, out, _) = Ferry::cli(&["buffer", "stats", "--data-dir", d]);
    assert_eq!(code, 0);
    assert!(out.contains("readings        6"), "{out}");

    let (code, out, _) = Ferry::cli(&["buffer", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6 readings checked"), "{out}");

    let (code, out, _) = Ferry::cli(&["buffer", "dead-letter", "list", "--data-dir", d]);
    assert_eq!(code, 0);
    assert!(
        out.contains("MSG_SIZE_TOO_LARGE") && out.contains("a/b"),
        "{out}"
    );

    let (code, out, err) = Ferry::cli(&["buffer", "dead-letter", "requeue", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 dead letters requeued"), "{out}");
    let (_, out, _) = Ferry::cli(&["buffer", "stats", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dead_letters"], 0);
    assert_eq!(
        v["readings"], 7,
        "the requeued reading is back in the stream"
    );
}

#[test]
fn verify_reports_a_damaged_segment_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = BufferOptions {
            compression: ferry_buffer::Compression::None,
            consumers: vec!["kafka".into()],
            ..Default::default()
        };
        let buf = Buffer::open(dir.path(), opts).unwrap();
        let payload = "PAYLOAD-MARKER-".repeat(20);
        buf.append(vec![Reading::new(Source::Http, "d", "t", payload)])
            .await
            .unwrap();
        buf.close().await;
    });
    // Flip a byte inside the stored payload: redb's page is intact, our CRC is not.
    let path = dir.path().join(ferry_buffer::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(15)
        .position(|w| w == b"PAYLOAD-MARKER-")
        .expect("payload is stored uncompressed");
    bytes[at + 3] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let (code, out, _) = Ferry::cli(&[
        "buffer",
        "verify",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("checksum mismatch"), "{out}");
}

#[test]
fn a_second_gateway_on_the_same_data_dir_is_refused_clearly() {
    let a = Ferry::start("");
    let (code, _, err) = {
        let cfg = a.config_path.to_str().unwrap().to_string();
        let out = std::process::Command::new(ferry_tests::bin_path("ferry"))
            .args(["run", "--config", &cfg])
            .env("FERRY_GATEWAY_DATA_DIR", &a.data_dir)
            .env("FERRY_MQTT_LISTEN", "127.0.0.1:0")
            .env("FERRY_HTTP_LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already open in another process"), "{err}");
}

/// A digest of the buffer file, to show the inspection commands leave it as it was.
fn file_digest(data_dir: &str) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let bytes =
        std::fs::read(std::path::Path::new(data_dir).join(ferry_buffer::FILE_NAME)).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len() as u64, h.finish())
}

fn post_readings(ferry: &Ferry, n: usize) {
    post_readings_to(&ferry.http_url(), n);
}

fn post_readings_to(url: &str, n: usize) {
    let items: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"topic":"site/a","device":"d1","payload":{{"i":{i}}}}}"#))
        .collect();
    let body = format!("[{}]", items.join(","));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/readings"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 202);
}

fn stats_json(d: &str) -> (serde_json::Value, String) {
    let (code, out, err) = Ferry::cli(&["buffer", "stats", "--data-dir", d, "--json"]);
    assert_eq!(code, 0, "stats: {out}\n{err}");
    (serde_json::from_str(&out).unwrap(), err)
}

#[test]
fn buffer_inspection_works_while_running_and_after_sigkill_without_changing_the_file() {
    let mut ferry = Ferry::start("");
    let d = ferry.data_dir_str();
    post_readings(&ferry, 40);

    // While ferry runs (it holds the file exclusively): figures of the moment, file unchanged.
    let (v, err) = stats_json(&d);
    assert_eq!(v["file_state"], "in_use", "{v:#}");
    assert_eq!(v["readings"], 40, "{v:#}");
    assert!(err.contains("in use by a running ferry"), "{err}");
    let (code, out, _) = Ferry::cli(&["buffer", "verify", "--data-dir", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("40 readings checked"), "{out}");
    post_readings(&ferry, 10);
    let (v, _) = stats_json(&d);
    assert_eq!(v["readings"], 50, "{v:#}");

    // Under a steady stream of commits, each view is whole: a sum of whole requests of 40
    // readings, never going back, and verifying clean.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), ferry.http_url());
        std::thread::spawn(move || {
            let mut posted = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                post_readings_to(&url, 40);
                posted += 40;
            }
            posted
        })
    };
    let mut last = 50;
    for round in 0..8 {
        let (code, out, err) = Ferry::cli(&["buffer", "stats", "--data-dir", &d, "--json"]);
        if code == 75 {
            assert!(err.contains("try again"), "{err}");
            continue;
        }
        assert_eq!(code, 0, "round {round}: {out}\n{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let n = v["readings"].as_u64().unwrap();
        assert_eq!((n - 50) % 40, 0, "a torn view: {n}");
        assert!(n >= last, "went back: {n} < {last}");
        last = n;
        let (code, out, err) = Ferry::cli(&["buffer", "verify", "--data-dir", &d]);
        assert!(code == 0 || code == 75, "{out}\n{err}");
        if code == 0 {
            assert!(out.ends_with("ok\n"), "{out}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let posted = load.join().unwrap();
    assert!(
        last > 50 && posted > 0,
        "the views saw the load: {last}, {posted}"
    );
    let (v, _) = stats_json(&d);
    let total = v["readings"].as_u64().unwrap();
    assert_eq!(total, 50 + posted, "{v:#}");

    // After SIGKILL: the file was not closed; the commands work on a repaired copy in memory.
    ferry.kill();
    let before = file_digest(&d);
    let (v, err) = stats_json(&d);
    assert_eq!(v["file_state"], "not_closed_cleanly", "{v:#}");
    assert_eq!(v["readings"], total, "{v:#}");
    assert!(err.contains("ferry will repair it on start"), "{err}");
    let (code, out, _) = Ferry::cli(&["buffer", "verify", "--data-dir", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{total} readings checked")) && out.contains("ok"),
        "{out}"
    );
    let (code, out, err) = Ferry::cli(&["buffer", "dead-letter", "list", "--data-dir", &d]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(file_digest(&d), before, "the inspection changed the file");

    // `repair` does what ferry does on start; then the file reads as closed.
    let (code, out, err) = Ferry::cli(&["buffer", "repair", "--data-dir", &d]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("repaired"), "{out}");
    let (v, err) = stats_json(&d);
    assert_eq!(v["file_state"], "closed", "{v:#}\n{err}");
    assert_eq!(v["readings"], total, "{v:#}");
    assert!(err.is_empty(), "{err}");
    let (code, out, _) = Ferry::cli(&["buffer", "repair", "--data-dir", &d]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to repair"), "{out}");
}

/// A site's backlog carried out on a USB stick: `ferry buffer export` on gateway A (while it
/// runs, and after it stopped) and `ferry buffer import` on gateway B keep every payload byte
/// for byte, and B sends each reading with the `ferry-id` A gave it, so a consumer that
/// also gets them from A later de-duplicates them.
#[test]
fn export_then_import_on_another_gateway_keeps_ids_and_bytes() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use std::time::{Duration, Instant};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let work = tempfile::tempdir().unwrap();
    let a_dir = work.path().join("a");
    let mut a = Ferry::start_in(
        "[mqtt]\nenabled = false\n",
        &[("FERRY_GATEWAY_ID", "site-a")],
        Some(&a_dir),
    );
    let base = a.http_url();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let items: Vec<serde_json::Value> = (0..20)
            .map(|i| serde_json::json!({"topic": format!("t/{}/v", i % 3), "device": format!("d{i}"), "payload": {"n": i, "x": 1.50}}))
            .collect();
        let r = http
            .post(format!("{base}/v1/readings"))
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        for (topic, ct, body) in [
            ("raw/text", "text/plain", b" 21.5 C \n".to_vec()),
            ("raw/bin", "application/octet-stream", vec![0, 255, 10, 13, 34, 92]),
        ] {
            let r = http
                .post(format!("{base}/v1/readings/{topic}"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202, "{topic}");
        }
    });
    let export = work.path().join("usb").join("site-a.ndjson");
    std::fs::create_dir_all(export.parent().unwrap()).unwrap();
    let a_arg = a_dir.display().to_string();
    // While A runs: stdout is refused (a view may have to be read again), --out works.
    let (code, _, err) = Ferry::cli(&["buffer", "export", "--data-dir", &a_arg]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--out"), "{err}");
    let live = work.path().join("live.ndjson");
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "export",
        "--data-dir",
        &a_arg,
        "--out",
        live.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("exported 22 of the 22 readings"), "{err}");
    a.terminate(Duration::from_secs(10)).expect("clean exit");

    // Stopped: to a file, the same lines.
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "export",
        "--data-dir",
        &a_arg,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert_eq!(text, std::fs::read_to_string(&live).unwrap());
    assert_eq!(text.lines().count(), 22);
    // Filters: a topic filter, and a time window that takes nothing.
    let (code, out, err) =
        Ferry::cli(&["buffer", "export", "--data-dir", &a_arg, "--topic", "t/1/#"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 7, "{out}");
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "export",
        "--data-dir",
        &a_arg,
        "--until",
        "2000-01-01T00:00:00Z",
    ]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    // Gateway B: a bad file adds nothing; the export adds everything.
    let b_dir = work.path().join("b");
    let b_arg = b_dir.display().to_string();
    let bad = work.path().join("bad.ndjson");
    std::fs::write(&bad, format!("{}{{\"ferry_id\": \"oops\"}}\n", text)).unwrap();
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "import",
        "--data-dir",
        &b_arg,
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{out}{err}");
    assert!(
        err.contains("line 23") && err.contains("nothing was imported"),
        "{err}"
    );
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "import",
        "--data-dir",
        &b_arg,
        export.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("22 readings imported"), "{out}");

    let on_a = ferry_tests::buffered_readings(&a_dir, "check");
    let on_b = ferry_tests::buffered_readings(&b_dir, "check");
    assert_eq!(on_a.len(), 22);
    assert_eq!(on_b.len(), 22);
    for (ra, rb) in on_a.iter().zip(&on_b) {
        assert_eq!(rb.payload, ra.payload, "payload of {}", ra.id);
        assert_eq!(
            (
                &rb.topic,
                &rb.device,
                rb.received_at_ms,
                &rb.content_type,
                rb.source
            ),
            (
                &ra.topic,
                &ra.device,
                ra.received_at_ms,
                &ra.content_type,
                ra.source
            )
        );
        assert_eq!(rb.clock.mark, ra.clock.mark);
        assert_eq!(
            rb.origin,
            Some(ferry_buffer::Origin {
                gateway: "site-a".into(),
                id: ra.id
            })
        );
    }

    // B forwards them with A's ferry-ids.
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let mut b = Ferry::start_in(
        &format!(
            "[mqtt]\nenabled = false\n\n[uplinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"readings\"\n",
            mock.bootstrap_servers()
        ),
        &[("FERRY_GATEWAY_ID", "site-b")],
        Some(&b_dir),
    );
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "import")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["readings"]).unwrap();
    let mut got = std::collections::BTreeMap::new();
    let t = Instant::now();
    while got.len() < 22 && t.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ferry-id")
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            });
            got.insert(
                id.unwrap_or_default(),
                m.payload().unwrap_or_default().to_vec(),
            );
        }
    }
    b.terminate(Duration::from_secs(10)).expect("clean exit");
    let want: std::collections::BTreeMap<String, Vec<u8>> = on_a
        .iter()
        .map(|r| (format!("site-a-{}", r.id), r.payload.to_vec()))
        .collect();
    assert_eq!(got, want);
}
