//! Handler tests: `Router::oneshot` against a real buffer in a temporary directory.

use super::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_buffer::{BufferOptions, Reading, WhenFull};
use ferry_config::HttpToken;
use std::io::Write;
use tower::ServiceExt;

struct Fixture {
    router: Router,
    state: HttpState,
    _dir: tempfile::TempDir,
}

fn fixture_with(opts: BufferOptions, edit: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Buffer::open(dir.path(), opts).unwrap();
    let mut config = Config::default();
    edit(&mut config);
    let state = HttpState::new(buffer, Arc::new(config));
    Fixture {
        router: router(state.clone()),
        state,
        _dir: dir,
    }
}

fn opts() -> BufferOptions {
    BufferOptions {
        consumers: vec!["kafka".into()],
        flush_interval: Duration::ZERO,
        ..Default::default()
    }
}

fn fixture(edit: impl FnOnce(&mut Config)) -> Fixture {
    fixture_with(opts(), edit)
}

impl Fixture {
    async fn send(
        &self,
        req: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    async fn stored(&self) -> Vec<Reading> {
        let mut rd = self.state.buffer.reader("kafka").unwrap();
        let mut out = Vec::new();
        loop {
            let segs = rd.try_next(64).await.unwrap();
            if segs.is_empty() {
                break;
            }
            out.extend(segs.into_iter().flat_map(|s| s.readings));
        }
        out
    }
}

fn post(uri: &str, ct: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(uri);
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    b.body(body.into()).unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Asserts a problem+json body with `status` whose detail contains `needle`.
fn assert_problem(
    got: &(StatusCode, axum::http::HeaderMap, serde_json::Value),
    status: u16,
    needle: &str,
) {
    let (s, h, body) = got;
    assert_eq!(s.as_u16(), status, "body: {body}");
    assert_eq!(
        h.get("content-type").unwrap(),
        "application/problem+json",
        "body: {body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(needle),
        "detail {detail:?} lacks {needle:?}"
    );
}

#[tokio::test]
async fn single_reading_keeps_payload_content_type_and_topic() {
    let f = fixture(|_| {});
    let req = Request::post("/v1/readings/plant/line-1/temp")
        .header("content-type", "text/plain")
        .header("x-ferry-device", "sensor-7")
        .body(Body::from("21.5"))
        .unwrap();
    let (status, _, body) = f.send(req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["first_id"], body["last_id"]);
    let stored = f.stored().await;
    assert_eq!(stored.len(), 1);
    let r = &stored[0];
    assert_eq!(r.topic, "plant/line-1/temp");
    assert_eq!(r.device, "sensor-7");
    assert_eq!(&r.payload[..], b"21.5");
    assert_eq!(r.content_type.as_deref(), Some("text/plain"));
    assert_eq!(r.id, body["first_id"].as_u64().unwrap());
    assert_eq!(f.state.stats.readings_accepted(), 1);
}

#[tokio::test]
async fn single_reading_without_device_is_http() {
    let f = fixture(|_| {});
    let (status, _, _) = f.send(post("/v1/readings/a%20b/c", None, "x")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stored = f.stored().await;
    assert_eq!(stored[0].device, "http");
    assert_eq!(stored[0].topic, "a b/c");
    assert_eq!(stored[0].content_type, None);
}

#[tokio::test]
async fn json_array_batch_is_stored_in_order_with_timestamps() {
    let f = fixture(|_| {});
    let body = r#"[
        {"topic": "t/1", "payload": {"temp": 21.5}, "ts": "2024-05-01T12:00:00.250Z"},
        {"topic": "t/2", "payload": [1, 2], "ts": 1714564800000, "device": "d2"},
        {"topic": "t/3", "payload": "text"}
    ]"#;
    let (status, _, resp) = f
        .send(post("/v1/readings", Some("application/json"), body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["accepted"], 3);
    assert_eq!(
        resp["last_id"].as_u64().unwrap() - resp["first_id"].as_u64().unwrap(),
        2
    );
    let stored = f.stored().await;
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].topic, "t/1");
    assert_eq!(stored[0].received_at_ms, 1_714_564_800_250);
    assert_eq!(stored[0].clock.mark, ferry_buffer::ClockMark::Device);
    assert_eq!(&stored[0].payload[..], br#"{"temp":21.5}"#);
    assert_eq!(stored[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(stored[0].device, "http");
    assert_eq!(stored[1].device, "d2");
    assert_eq!(stored[1].received_at_ms, 1_714_564_800_000);
    assert_eq!(&stored[2].payload[..], br#""text""#);
    // No timestamp: ferry's own clock, stamped by the buffer.
    assert_ne!(stored[2].clock.mark, ferry_buffer::ClockMark::Device);
}

#[tokio::test]
async fn ndjson_batch() {
    let f = fixture(|_| {});
    let body = "{\"topic\":\"a\",\"payload\":1}\n\n{\"topic\":\"b\",\"payload\":2}\r\n";
    let (status, _, resp) = f
        .send(post("/v1/readings", Some("application/x-ndjson"), body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["accepted"], 2);
    let stored = f.stored().await;
    assert_eq!(
        stored.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
}

#[tokio::test]
async fn senml_pack_resolves_base_fields() {
    let f = fixture(|_| {});
    // RFC 8428 section 5.1.2-style pack: base name, time, unit, value and sum.
    let body = r#"[
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "bu": "A", "bver": 10,
         "n": "voltage", "u": "V", "v": 120.1},
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
        {"bv": 100, "n": "offset", "v": 5},
        {"n": "energy", "u": "J", "s": 42, "bs": 8},
        {"n": "label", "vs": "on"}
    ]"#;
    let (status, _, resp) = f
        .send(post("/v1/readings", Some("application/senml+json"), body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["accepted"], 6);
    let stored = f.stored().await;
    let payload = |i: usize| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(&stored[i].payload).unwrap();
        v[0].clone()
    };
    assert_eq!(stored[0].topic, "urn:dev:ow:10e2073a01080063:voltage");
    assert_eq!(stored[0].received_at_ms, 1_320_067_464_000);
    assert_eq!(stored[0].clock.mark, ferry_buffer::ClockMark::Device);
    assert_eq!(
        stored[0].content_type.as_deref(),
        Some("application/senml+json")
    );
    assert_eq!(payload(0)["u"], "V");
    assert_eq!(payload(0)["v"], 120.1);
    assert_eq!(stored[1].topic, "urn:dev:ow:10e2073a01080063:current");
    assert_eq!(stored[1].received_at_ms, 1_320_067_459_000);
    assert_eq!(payload(1)["u"], "A", "base unit applies");
    assert_eq!(payload(1)["t"], 1.320067459e9);
    assert_eq!(payload(3)["v"], 105.0, "base value is added");
    assert_eq!(payload(4)["s"], 50.0, "base sum is added");
    assert_eq!(payload(5)["vs"], "on");
}

#[tokio::test]
async fn senml_relative_time_is_relative_to_now() {
    let f = fixture(|_| {});
    let before = ferry_buffer::now_ms();
    let body = r#"[{"n": "dev1:temp", "t": -60, "v": 1}]"#;
    let (status, _, _) = f
        .send(post("/v1/readings", Some("application/senml+json"), body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stored = f.stored().await;
    let at = stored[0].received_at_ms;
    assert!(at >= before - 60_000 - 5 && at <= ferry_buffer::now_ms() - 60_000 + 5);
    // A relative time is ferry's clock, not the device's.
    assert_ne!(stored[0].clock.mark, ferry_buffer::ClockMark::Device);
}

/// A time series of one sensor: bn names it, and the records after it carry no n (the
/// OpenAPI schema cannot state this and asks for names; the server takes it, as RFC 8428 does).
#[tokio::test]
async fn senml_records_without_a_name_take_the_base_name() {
    let f = fixture(|_| {});
    let body = r#"[{"bn":"site-7/temp","v":20.5},{"t":-10,"v":20.7},{"t":-5,"v":20.9}]"#;
    let (status, _, resp) = f
        .send(post("/v1/readings", Some("application/senml+json"), body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let topics: Vec<String> = f.stored().await.into_iter().map(|r| r.topic).collect();
    assert_eq!(topics, vec!["site-7/temp"; 3]);
}

#[tokio::test]
async fn senml_invalid_pack_names_the_record_and_stores_nothing() {
    let f = fixture(|_| {});
    for (body, needle) in [
        (r#"[{"n":"ok","v":1},{"n":"bad+name","v":1}]"#, "record 1"),
        (r#"[{"n":"a","v":1,"vs":"x"}]"#, "only one of"),
        (r#"[{"n":"a"}]"#, "no value"),
        (r#"[{"n":"a","v":"1"}]"#, "'v' must be a number"),
        (
            r#"[{"n":"a","v":1},{"n":"b","v":1,"x_":1}]"#,
            "record 1: the field 'x_'",
        ),
        (r#"[{"bver":11,"n":"a","v":1}]"#, "bver"),
        (r#"[1]"#, "record 0"),
        // A base name that can never start a valid name is refused where it is set, even
        // in a record of base fields only; an empty one clears the base name.
        (
            r#"[{"bn":"-dev/"},{"n":"t","v":1}]"#,
            "record 0: the base name '-dev/'",
        ),
        (r#"[{"bn":"dev 7/"}]"#, "the base name 'dev 7/'"),
        (
            r#"[{"bn":"dev/","n":"t","v":1},{"bn":"","n":"-x","v":1}]"#,
            "record 1: the resolved name '-x'",
        ),
    ] {
        let got = f
            .send(post("/v1/readings", Some("application/senml+json"), body))
            .await;
        assert_problem(&got, 400, needle);
    }
    assert!(f.stored().await.is_empty());
}

#[tokio::test]
async fn gzip_bodies_are_decompressed() {
    let f = fixture(|_| {});
    let body = gzip(br#"[{"topic":"g","payload":1}]"#);
    let req = Request::post("/v1/readings")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Body::from(body))
        .unwrap();
    let (status, _, resp) = f.send(req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let req = Request::post("/v1/readings/raw")
        .header("content-encoding", "gzip")
        .body(Body::from(gzip(b"hello")))
        .unwrap();
    assert_eq!(f.send(req).await.0, StatusCode::ACCEPTED);
    let stored = f.stored().await;
    assert_eq!(stored[0].topic, "g");
    assert_eq!(&stored[1].payload[..], b"hello");
}

#[tokio::test]
async fn corrupt_gzip_is_400() {
    let f = fixture(|_| {});
    let req = Request::post("/v1/readings/raw")
        .header("content-encoding", "gzip")
        .body(Body::from("definitely not gzip"))
        .unwrap();
    assert_problem(&f.send(req).await, 400, "decompress");
}

#[tokio::test]
async fn malformed_json_reports_line_and_column() {
    let f = fixture(|_| {});
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/json"),
            "[\n  {\"topic\": \"a\", \"payload\": 1},\n  {\"topic\": \"b\" \"payload\": 2}\n]",
        ))
        .await;
    assert_problem(&got, 400, "line 3, column 17");
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/x-ndjson"),
            "{\"topic\":\"a\",\"payload\":1}\n{\"topic\":\"b\",payload}\n",
        ))
        .await;
    assert_problem(&got, 400, "NDJSON line 2, column 14");
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/json"),
            r#"[{"payload":1}]"#,
        ))
        .await;
    assert_problem(&got, 400, "missing field `topic`");
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/json"),
            r#"[{"topic":"a","payload":1,"ts":"yesterday"}]"#,
        ))
        .await;
    assert_problem(&got, 400, "record 0: ts 'yesterday' is not an RFC 3339");
}

#[tokio::test]
async fn bad_topics_are_400() {
    let f = fixture(|_| {});
    assert_problem(
        &f.send(post("/v1/readings/a/+/b", None, "x")).await,
        400,
        "wildcard '+'",
    );
    assert_problem(
        &f.send(post("/v1/readings/a/%23", None, "x")).await,
        400,
        "wildcard '#'",
    );
    assert_problem(
        &f.send(post("/v1/readings/", None, "x")).await,
        400,
        "topic is empty",
    );
    assert_problem(
        &f.send(post("/v1/readings/a/%FF", None, "x")).await,
        400,
        "topic in the path is invalid",
    );
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/json"),
            r#"[{"topic":"ok","payload":1},{"topic":"x/#","payload":1}]"#,
        ))
        .await;
    assert_problem(&got, 400, "record 1: the topic 'x/#'");
    assert!(f.stored().await.is_empty(), "a batch is atomic");
}

#[tokio::test]
async fn body_limits_are_413() {
    let f = fixture(|c| {
        c.http.max_body_bytes = 256;
        c.http.max_decompressed_bytes = 1000;
        c.http.max_batch_readings = 2;
    });
    // Over the wire limit, with Content-Length.
    assert_problem(
        &f.send(post("/v1/readings/t", None, vec![b'x'; 257])).await,
        413,
        "max_body_bytes",
    );
    // Over the wire limit, streamed without Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b'x'; 200]), Ok(vec![b'x'; 200])];
    let stream = Body::from_stream(futures_util::stream::iter(chunks));
    assert_problem(
        &f.send(post("/v1/readings/t", None, stream)).await,
        413,
        "max_body_bytes",
    );
    // A zip bomb: small on the wire, large once decompressed.
    let bomb = gzip(&vec![b'0'; 100_000]);
    assert!(bomb.len() <= 256, "{}", bomb.len());
    let req = Request::post("/v1/readings/t")
        .header("content-encoding", "gzip")
        .body(Body::from(bomb))
        .unwrap();
    assert_problem(&f.send(req).await, 413, "max_decompressed_bytes = 1000");
    // Too many readings.
    let got = f
        .send(post(
            "/v1/readings",
            Some("application/x-ndjson"),
            "{\"topic\":\"a\",\"payload\":1}\n{\"topic\":\"a\",\"payload\":1}\n{\"topic\":\"a\",\"payload\":1}\n",
        ))
        .await;
    assert_problem(&got, 413, "max_batch_readings = 2");
    assert!(f.stored().await.is_empty());
}

#[tokio::test]
async fn unsupported_media_is_415() {
    let f = fixture(|_| {});
    assert_problem(
        &f.send(post("/v1/readings", Some("text/csv"), "a,b")).await,
        415,
        "text/csv",
    );
    assert_problem(
        &f.send(post("/v1/readings", None, "[]")).await,
        415,
        "Content-Type",
    );
    let req = Request::post("/v1/readings/t")
        .header("content-encoding", "br")
        .body(Body::from("x"))
        .unwrap();
    assert_problem(&f.send(req).await, 415, "Content-Encoding");
}

#[tokio::test]
async fn axum_rejections_are_problems_too() {
    let f = fixture(|_| {});
    assert_problem(
        &f.send(Request::get("/nope").body(Body::empty()).unwrap())
            .await,
        404,
        "/nope",
    );
    assert_problem(
        &f.send(Request::get("/v1/readings").body(Body::empty()).unwrap())
            .await,
        405,
        "GET",
    );
}

fn with_tokens(c: &mut Config) {
    c.http.tokens = vec![
        HttpToken {
            token: "open-sesame".into(),
            device: None,
            name: Some("fleet".into()),
        },
        HttpToken {
            token: "dev-7-secret".into(),
            device: Some("dev-7".into()),
            name: None,
        },
    ];
}

fn authed(
    uri: &str,
    token: Option<&str>,
    device: Option<&str>,
    ct: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut b = Request::post(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(d) = device {
        b = b.header("x-ferry-device", d);
    }
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test]
async fn tokens_are_required_and_bound_to_devices() {
    let f = fixture(with_tokens);
    let got = f
        .send(authed("/v1/readings/t", None, None, None, "1"))
        .await;
    assert_problem(&got, 401, "Authorization");
    assert!(
        got.1
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let got = f
        .send(authed("/v1/readings/t", Some("wrong"), None, None, "1"))
        .await;
    assert_problem(&got, 401, "not one of http.tokens");
    assert!(
        !got.2.to_string().contains("wrong"),
        "the token is not echoed"
    );

    // An unbound token may name any device.
    let got = f
        .send(authed(
            "/v1/readings/t",
            Some("open-sesame"),
            Some("dev-1"),
            None,
            "1",
        ))
        .await;
    assert_eq!(got.0, StatusCode::ACCEPTED);
    // A bound token gets its device by default, and the same device is fine.
    let got = f
        .send(authed(
            "/v1/readings/t",
            Some("dev-7-secret"),
            None,
            None,
            "2",
        ))
        .await;
    assert_eq!(got.0, StatusCode::ACCEPTED);
    let got = f
        .send(authed(
            "/v1/readings/t",
            Some("dev-7-secret"),
            Some("dev-7"),
            None,
            "3",
        ))
        .await;
    assert_eq!(got.0, StatusCode::ACCEPTED);
    // ... but not another device, by header or in a batch record.
    let got = f
        .send(authed(
            "/v1/readings/t",
            Some("dev-7-secret"),
            Some("dev-8"),
            None,
            "4",
        ))
        .await;
    assert_problem(&got, 403, "bound to device 'dev-7'");
    let got = f
        .send(authed(
            "/v1/readings",
            Some("dev-7-secret"),
            None,
            Some("application/json"),
            r#"[{"topic":"t","payload":1},{"topic":"t","payload":1,"device":"dev-8"}]"#,
        ))
        .await;
    assert_problem(&got, 403, "record 1");
    let devices: Vec<String> = f.stored().await.into_iter().map(|r| r.device).collect();
    assert_eq!(devices, ["dev-1", "dev-7", "dev-7"]);
    assert_eq!(f.state.stats.rejections("unauthorized"), 2);
    assert_eq!(f.state.stats.rejections("forbidden"), 2);
}

#[tokio::test]
async fn full_buffer_in_reject_mode_is_503_with_retry_after() {
    let f = fixture_with(
        BufferOptions {
            max_bytes: 2048,
            max_batch_bytes: 512,
            when_full: WhenFull::Reject,
            compression: ferry_buffer::Compression::None,
            ..opts()
        },
        |c| c.http.retry_after_secs = 7,
    );
    let mut last = None;
    for i in 0..100 {
        let got = f
            .send(post(&format!("/v1/readings/t/{i}"), None, vec![b'x'; 200]))
            .await;
        if got.0 != StatusCode::ACCEPTED {
            last = Some(got);
            break;
        }
    }
    let got = last.expect("the buffer never filled up");
    assert_problem(&got, 503, "buffer is full");
    assert_eq!(got.1.get("retry-after").unwrap(), "7");
    assert_eq!(got.2["type"], "urn:ferry:problem:buffer-full");
    assert_eq!(f.state.stats.rejections("buffer-full"), 1);
}

#[tokio::test]
async fn a_closed_buffer_is_503() {
    let f = fixture(|_| {});
    f.state.buffer.close().await;
    let got = f.send(post("/v1/readings/t", None, "1")).await;
    assert_problem(&got, 503, "shutting down");
    assert!(got.1.get("retry-after").is_some());
}

#[tokio::test]
async fn empty_batch_is_accepted_with_no_ids() {
    let f = fixture(|_| {});
    let (status, _, body) = f
        .send(post("/v1/readings", Some("application/json"), "[]"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        serde_json::json!({"accepted": 0, "first_id": null, "last_id": null})
    );
}

#[tokio::test]
async fn openapi_document_lists_the_paths() {
    let f = fixture(|_| {});
    let (status, h, doc) = f
        .send(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.get("content-type").unwrap(), "application/json");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in ["/v1/readings", "/v1/readings/{topic}", "/v1/openapi.json"] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
    }
    let batch = &doc["paths"]["/v1/readings"]["post"];
    for ct in [
        "application/json",
        "application/x-ndjson",
        "application/senml+json",
    ] {
        assert!(batch["requestBody"]["content"].get(ct).is_some(), "{ct}");
    }
    assert!(batch["responses"].get("503").is_some());
    assert!(doc["components"]["schemas"].get("Problem").is_some());
}

#[tokio::test]
async fn stats_count_requests_by_status() {
    let f = fixture(|_| {});
    f.send(post("/v1/readings/t", None, "1")).await;
    f.send(post("/v1/readings", Some("text/csv"), "1")).await;
    assert_eq!(f.state.stats.requests_with_status(202), 1);
    assert_eq!(f.state.stats.requests_with_status(415), 1);
    assert_eq!(f.state.stats.readings_accepted(), 1);
    let by_reason = f.state.stats.rejections_by_reason();
    assert_eq!(by_reason.get("unsupported-media-type"), Some(&1));
    assert_eq!(by_reason.len(), 1, "{by_reason:?}");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_is_408() {
    let f = fixture(|c| c.http.body_timeout_ms = 1000);
    let first: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b"part".to_vec())];
    let stalled = futures_util::stream::StreamExt::chain(
        futures_util::stream::iter(first),
        futures_util::stream::pending(),
    );
    let got = f
        .send(post("/v1/readings/t", None, Body::from_stream(stalled)))
        .await;
    assert_problem(&got, 408, "body_timeout_ms = 1000");
    assert!(f.stored().await.is_empty());
}

#[tokio::test]
async fn https_serves_with_the_configured_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let tls = ferry_config::HttpTls {
        cert_path,
        key_path,
    };
    let acceptor = server::load_tls(&tls).unwrap();

    let f = fixture(|_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = HttpServer::new(
        listener,
        f.router.clone(),
        &f.state.config.http,
        Some(acceptor),
        f.state.stats.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(srv.run(async {
        let _ = stop_rx.await;
    }));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    s.write_all(
        b"POST /v1/readings/tls/t HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    assert_eq!(f.stored().await[0].topic, "tls/t");

    // Shutdown: the listener stops and `run` returns.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
