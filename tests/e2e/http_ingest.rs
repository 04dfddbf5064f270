//! End-to-end tests of the HTTP ingest API against the real `ferry` binary.

use crate::support;
use ferry_tests::{Ferry, buffered_readings};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `buffered_readings` runs its own runtime, so it must leave ours.
async fn stored(data_dir: &std::path::Path) -> Vec<ferry_buffer::Reading> {
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || buffered_readings(&dir, "kafka"))
        .await
        .unwrap()
}

/// Asserts a problem+json answer and returns its body.
async fn problem(
    resp: reqwest::Response,
    status: u16,
    needle: &str,
) -> (reqwest::header::HeaderMap, Value) {
    assert_eq!(resp.status().as_u16(), status);
    let headers = resp.headers().clone();
    assert_eq!(
        headers
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("")),
        Some("application/problem+json"),
        "status {status}, headers {headers:?}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"].is_string() && body["title"].is_string(),
        "{body}"
    );
    let detail = body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {body}"));
    assert!(
        detail.contains(needle),
        "detail {detail:?} lacks {needle:?}"
    );
    (headers, body)
}

async fn accepted(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn every_format_is_stored() {
    let mut ferry = Ferry::start("");
    let url = ferry.http_url();
    let c = support::http();
    let single = accepted(
        c.post(format!("{url}/v1/readings/site/a/temp"))
            .header("content-type", "text/plain")
            .header("x-ferry-device", "dev-a")
            .body("21.5")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(single["accepted"], 1);
    let arr = accepted(
        c.post(format!("{url}/v1/readings"))
            .json(&json!([
                {"topic": "arr/1", "payload": {"v": 1}, "ts": "2024-01-01T00:00:00Z"},
                {"topic": "arr/2", "payload": {"v": 2}, "ts": 1704067200001u64, "device": "dev-b"}
            ]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(arr["accepted"], 2);
    accepted(
        c.post(format!("{url}/v1/readings"))
            .header("content-type", "application/x-ndjson")
            .body("{\"topic\":\"nd/1\",\"payload\":1}\n{\"topic\":\"nd/2\",\"payload\":2}\n")
            .send()
            .await
            .unwrap(),
    )
    .await;
    accepted(
        c.post(format!("{url}/v1/readings"))
            .header("content-type", "application/senml+json")
            .body(r#"[{"bn":"dev-c:","bt":1700000000,"bu":"Cel","n":"t1","v":20},{"n":"t2","t":1,"v":21}]"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    accepted(
        c.post(format!("{url}/v1/readings"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(gzip(br#"[{"topic":"gz/1","payload":"zipped"}]"#))
            .send()
            .await
            .unwrap(),
    )
    .await;
    accepted(
        c.post(format!("{url}/v1/readings/gz/raw"))
            .header("content-encoding", "gzip")
            .body(gzip(b"raw zipped payload"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let doc: Value = c
        .get(format!("{url}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"].get("/v1/readings").is_some());

    assert!(ferry.terminate(Duration::from_secs(10)).is_some());
    let stored = stored(&ferry.data_dir).await;
    let by_topic: BTreeMap<&str, &ferry_buffer::Reading> =
        stored.iter().map(|r| (r.topic.as_str(), r)).collect();
    assert_eq!(stored.len(), 9, "{:?}", by_topic.keys());
    let r = by_topic["site/a/temp"];
    assert_eq!((r.device.as_str(), &r.payload[..]), ("dev-a", &b"21.5"[..]));
    assert_eq!(r.content_type.as_deref(), Some("text/plain"));
    assert_eq!(r.id, single["first_id"].as_u64().unwrap());
    assert_eq!(by_topic["arr/1"].received_at_ms, 1_704_067_200_000);
    assert_eq!(by_topic["arr/2"].device, "dev-b");
    assert_eq!(&by_topic["nd/2"].payload[..], b"2");
    assert_eq!(by_topic["dev-c:t2"].received_at_ms, 1_700_000_001_000);
    let senml: Value = serde_json::from_slice(&by_topic["dev-c:t2"].payload).unwrap();
    assert_eq!(
        senml,
        json!([{"n": "dev-c:t2", "u": "Cel", "v": 21.0, "t": 1700000001.0}])
    );
    assert_eq!(&by_topic["gz/1"].payload[..], br#""zipped""#);
    assert_eq!(&by_topic["gz/raw"].payload[..], b"raw zipped payload");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_problem_json() {
    let ferry = Ferry::start("[http]\nmax_body_bytes = 4096\nmax_decompressed_bytes = 8192\n");
    let url = ferry.http_url();
    let c = support::http();
    let post = |path: &str| c.post(format!("{url}{path}"));

    let r = post("/v1/readings")
        .header("content-type", "application/json")
        .body("[{\"topic\": \"a\", \"payload\": }]")
        .send()
        .await
        .unwrap();
    problem(r, 400, "line 1, column 28").await;
    let r = post("/v1/readings")
        .header("content-type", "application/senml+json")
        .body(r#"[{"n":"ok","v":1},{"n":"no value"}]"#)
        .send()
        .await
        .unwrap();
    problem(r, 400, "SenML record 1").await;
    let r = post("/v1/readings/a/%2B/b").body("1").send().await.unwrap();
    problem(r, 400, "wildcard").await;
    let r = post("/v1/readings/t")
        .body(vec![b'x'; 5000])
        .send()
        .await
        .unwrap();
    problem(r, 413, "max_body_bytes").await;
    let r = post("/v1/readings/t")
        .header("content-encoding", "gzip")
        .body(gzip(&vec![b'x'; 100_000]))
        .send()
        .await
        .unwrap();
    problem(r, 413, "max_decompressed_bytes").await;
    let r = post("/v1/readings")
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    problem(r, 415, "text/csv").await;
    let r = post("/v1/readings/t")
        .header("content-encoding", "br")
        .body("x")
        .send()
        .await
        .unwrap();
    problem(r, 415, "Content-Encoding").await;
    let r = c.get(format!("{url}/nowhere")).send().await.unwrap();
    problem(r, 404, "/nowhere").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_buffer_in_reject_mode_is_503() {
    let ferry = Ferry::start(
        "[buffer]\nmax_bytes = 1048576\nmax_batch_bytes = 262144\nwhen_full = \"reject\"\ncompression = \"none\"\n\n[http]\nretry_after_secs = 9\n",
    );
    let url = ferry.http_url();
    let c = support::http();
    for i in 0..20 {
        let r = c
            .post(format!("{url}/v1/readings/big/{i}"))
            .body(vec![b'x'; 200_000])
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::ACCEPTED {
            continue;
        }
        let (h, body) = problem(r, 503, "buffer is full").await;
        assert_eq!(h.get("retry-after").unwrap(), "9");
        assert_eq!(body["type"], "urn:ferry:problem:buffer-full");
        return;
    }
    panic!("the buffer never filled up");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_device_binding() {
    let mut ferry = Ferry::start(
        "[[http.tokens]]\ntoken = \"fleet-secret\"\nname = \"fleet\"\n\n[[http.tokens]]\ntoken = \"dev7-secret\"\ndevice = \"dev-7\"\n",
    );
    let url = ferry.http_url();
    let c = support::http();
    let send = |token: Option<&str>, device: Option<&str>| {
        let mut b = c.post(format!("{url}/v1/readings/t")).body("1");
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        if let Some(d) = device {
            b = b.header("x-ferry-device", d);
        }
        b.send()
    };
    let (h, _) = problem(send(None, None).await.unwrap(), 401, "Authorization").await;
    assert!(
        h.get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    problem(send(Some("guess"), None).await.unwrap(), 401, "not one of").await;
    problem(
        send(Some("dev7-secret"), Some("dev-8")).await.unwrap(),
        403,
        "dev-7",
    )
    .await;
    accepted(send(Some("dev7-secret"), None).await.unwrap()).await;
    accepted(send(Some("fleet-secret"), Some("dev-1")).await.unwrap()).await;
    ferry.terminate(Duration::from_secs(10));
    let devices: Vec<String> = stored(&ferry.data_dir)
        .await
        .into_iter()
        .map(|r| r.device)
        .collect();
    assert_eq!(devices, ["dev-7", "dev-1"]);
    assert!(
        !ferry.log().contains("dev7-secret"),
        "tokens are never logged"
    );
    assert!(
        !ferry.log().contains("fleet-secret"),
        "tokens are never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn open_ingest_is_logged() {
    let ferry = Ferry::start("");
    assert!(
        ferry.log().contains("HTTP ingest is open"),
        "{}",
        ferry.log()
    );
}

/// One 202: the id range and the topics sent, in order.
type Ack = (u64, u64, Vec<String>);

/// Many concurrent clients; SIGKILL mid-stream; every reading answered 202 must be on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_reading_survives_sigkill() {
    let mut ferry = Ferry::start("");
    let url = ferry.http_url();
    // (first_id, last_id) -> topics, for every 202.
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..24 {
        let url = url.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let c = support::http();
            for seq in 0u64.. {
                let n = 1 + (seq % 20) as usize;
                let topics: Vec<String> = (0..n).map(|i| format!("kill/{w}/{seq}/{i}")).collect();
                let req = if n == 1 {
                    c.post(format!("{url}/v1/readings/{}", topics[0]))
                        .body(format!("{seq}"))
                } else {
                    let items: Vec<Value> = topics
                        .iter()
                        .map(|t| json!({"topic": t, "payload": seq}))
                        .collect();
                    c.post(format!("{url}/v1/readings")).json(&items)
                };
                match req.send().await {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => {
                        let b: Value = match r.json().await {
                            Ok(b) => b,
                            Err(_) => return, // killed while the body was in flight
                        };
                        let (f, l) = (
                            b["first_id"].as_u64().unwrap(),
                            b["last_id"].as_u64().unwrap(),
                        );
                        assert_eq!(l - f + 1, n as u64);
                        acked.lock().unwrap().push((f, l, topics));
                    }
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return, // the gateway is gone
                }
            }
        }));
    }
    // Let the load run, then kill while requests are in flight.
    let start = std::time::Instant::now();
    while acked.lock().unwrap().len() < 300 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ferry.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.len() >= 300,
        "only {} requests were acknowledged",
        acked.len()
    );
    let stored = stored(&ferry.data_dir).await;
    let by_id: BTreeMap<u64, &str> = stored.iter().map(|r| (r.id, r.topic.as_str())).collect();
    let mut readings = 0;
    for (first, last, topics) in &acked {
        for (id, topic) in (*first..=*last).zip(topics) {
            assert_eq!(
                by_id.get(&id).copied(),
                Some(topic.as_str()),
                "acknowledged reading {id} lost"
            );
            readings += 1;
        }
    }
    eprintln!(
        "{} requests / {readings} readings acknowledged before SIGKILL; {} stored",
        acked.len(),
        stored.len()
    );

    // The gateway restarts on that buffer and keeps numbering after it.
    ferry.restart();
    let c = support::http();
    let b = accepted(
        c.post(format!("{}/v1/readings/after/restart", ferry.http_url()))
            .body("1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let max_id = by_id.keys().max().copied().unwrap_or(0);
    assert!(b["first_id"].as_u64().unwrap() > max_id);
}

/// A client that trickles its headers is dropped after `http.header_timeout_ms`.
#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    use std::io::Read;
    let ferry = Ferry::start("[http]\nheader_timeout_ms = 300\n");
    let addr = ferry.addr("http");
    let took = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /v1/readings/t HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = std::time::Instant::now();
        let mut buf = Vec::new();
        // The server closes the connection (possibly after a 408): read_to_end returns.
        let r = s.read_to_end(&mut buf);
        assert!(r.is_ok(), "the connection was not closed: {r:?}");
        start.elapsed()
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// With `http.max_connections = 2`, a third client waits until a connection closes.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_capped() {
    let ferry = Ferry::start("[http]\nmax_connections = 2\n");
    let addr = ferry.addr("http");
    let url = ferry.http_url();
    let a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = support::http();
    let third = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move {
            c.post(format!("{url}/v1/readings/t"))
                .body("1")
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(a);
    let r = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third client was not served after a connection closed")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    drop(b);
}

/// The OpenAPI document is the contract. schemathesis (`--checks all`: no server error,
/// schema-valid requests accepted, schema-invalid ones refused, status codes, headers and
/// bodies as documented) finds nothing, open and with `[[http.tokens]]` and `status.token`
/// set. A fixed seed and no example database keep the run the same on every machine.
#[test]
fn schemathesis_finds_nothing_against_the_openapi_document() {
    let test = "schemathesis_finds_nothing_against_the_openapi_document";
    if !ferry_tests::require_tool("schemathesis", test) {
        return;
    }
    let secured = "[[http.tokens]]\ntoken = \"st-token-1\"\n\n[status]\ntoken = \"st-token-1\"\n";
    for (name, config, auth) in [
        ("open", "", None),
        ("tokens", secured, Some("Authorization: Bearer st-token-1")),
    ] {
        let ferry = Ferry::start(config);
        // Its own working directory: schemathesis keeps a cache of past failures there and
        // replays them first, which would make a run depend on the ones before it.
        let cwd = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("schemathesis");
        cmd.current_dir(cwd.path());
        cmd.args(["run", &format!("{}/v1/openapi.json", ferry.http_url())])
            .args([
                "--checks",
                "all",
                "--max-examples",
                "150",
                "--seed",
                "20261203",
            ])
            .args(["--workers", "1", "--generation-database", "none"])
            .args(["--request-timeout", "10"])
            .env("NO_COLOR", "1");
        if let Some(h) = auth {
            cmd.args(["--header", h]);
        }
        let out = cmd.output().expect("run schemathesis");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .lines()
            .rev()
            .find(|l| l.contains(" in ") && l.starts_with('='))
            .unwrap_or("");
        eprintln!("schemathesis ({name}): {summary}");
        assert!(
            out.status.success(),
            "schemathesis ({name}) found problems:\n{stdout}\n{}\nferry's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            ferry.log()
        );
        assert!(summary.contains("No issues found"), "{stdout}");
    }
}
