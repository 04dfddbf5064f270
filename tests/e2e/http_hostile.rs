//! Hostile HTTP clients against the real binary: zip bombs, slowloris
//! (headers and body), oversized headers, invalid UTF-8 topics and deeply nested JSON.
//!
//! Each case asserts three things: (a) a well-behaved client's POST is answered 202 during or
//! right after the attack, and its reading really is in the buffer; (b) ferry's memory stays
//! under a stated bound (`VmHWM`, the peak resident set, from `/proc/<pid>/status`); (c) the
//! attacker gets the clear error: the status code and, where the request reaches the router,
//! an `application/problem+json` body naming the limit.
//!
//! Already covered elsewhere (not repeated here): one small gzip body over
//! `max_decompressed_bytes`, one body over `max_body_bytes`, malformed JSON, unknown encodings
//! (`http_ingest::errors_are_problem_json`); one slow-header socket
//! (`http_ingest::slow_headers_are_cut_off`); the connection cap
//! (`http_ingest::connections_are_capped`).

use crate::support;
use ferry_tests::{Ferry, buffered_readings};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// Starts ferry with `toml`, which configures no uplink: readings stay in the buffer for the
/// check.
fn start(toml: &str) -> Ferry {
    Ferry::start(toml)
}

/// The well-behaved client: one reading POSTed to `/v1/readings/good/<id>`, answered 202.
async fn good_post(url: &str, id: &str, payload: &str) {
    let r = support::http()
        .post(format!("{url}/v1/readings/good/{id}"))
        .body(payload.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("the good client {id} was not served: {e}"));
    assert_eq!(r.status().as_u16(), 202, "good client {id}");
}

/// Stops ferry, asserts every `payload` is in its buffer and returns how many readings are.
async fn assert_stored(mut f: Ferry, payloads: &[&str]) -> usize {
    let payloads: Vec<String> = payloads.iter().map(|p| p.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        f.terminate(Duration::from_secs(15));
        let stored: Vec<String> = buffered_readings(&f.data_dir, "kafka")
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect();
        for p in &payloads {
            assert!(
                stored.contains(p),
                "the acknowledged reading {p:?} is not in the buffer: {stored:?}"
            );
        }
        stored.len()
    })
    .await
    .unwrap()
}

/// Asserts a problem+json answer with `status` whose detail contains `needle`.
async fn problem(resp: reqwest::Response, status: u16, needle: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(ct, "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(needle),
        "detail {detail:?} lacks {needle:?}"
    );
    body
}

/// Sends `request` on a raw socket and returns the status code of the answer (None: closed
/// without one) and the whole answer.
fn raw_request(addr: SocketAddr, request: &[u8]) -> (Option<u16>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    // ferry may answer and close before it read everything: a failed write is fine.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let mut b = [0u8; 8192];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&b[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    (code, text)
}

/// gzip of `n` MiB of zeros, compressed at level 9 (about 1000:1), streamed from a 1 MiB
/// block so the test never holds the inflated bytes.
fn zip_bomb(n: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..n {
        e.write_all(&zeros).unwrap();
    }
    e.finish().unwrap()
}

/// Every case's bound: ferry idles at about 20 MiB. Inflating a single bomb would take 512
/// MiB; holding even one inflated body per request of a burst of 8 would take 64 MiB more than
/// the 8 MiB cap each allows. 160 MiB leaves room for 8 concurrent capped bodies (64 MiB) and
/// a debug build.
const PEAK_BOUND: u64 = 160 * MIB;

/// 8 concurrent gzip bombs (512 MiB of zeros each, ~0.5 MiB on the wire), to the single and
/// the batch endpoint: each gets 413 problem+json naming `max_decompressed_bytes` as soon as
/// 8 MiB are inflated; memory stays bounded and a good client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip_bombs_are_cut_at_max_decompressed_bytes() {
    let f = start("");
    let url = f.http_url();
    let bomb = tokio::task::spawn_blocking(|| zip_bomb(512)).await.unwrap();
    eprintln!("zip bomb: {} B on the wire, 512 MiB inflated", bomb.len());
    assert!(
        (bomb.len() as u64) < MIB,
        "the bomb must pass max_body_bytes"
    );
    let attacks: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            let bomb = bomb.clone();
            tokio::spawn(async move {
                let path = if i % 2 == 0 {
                    "/v1/readings/bomb".to_string()
                } else {
                    "/v1/readings".to_string()
                };
                let r = support::http()
                    .post(format!("{url}{path}"))
                    .header("content-type", "application/json")
                    .header("content-encoding", "gzip")
                    .body(bomb)
                    .send()
                    .await
                    .unwrap();
                problem(r, 413, "max_decompressed_bytes").await;
            })
        })
        .collect();
    good_post(&url, "during", "during-bomb").await;
    for a in attacks {
        a.await.unwrap();
    }
    good_post(&url, "after", "after-bomb").await;
    f.assert_peak_below(PEAK_BOUND, "zip bombs");
    assert_stored(f, &["during-bomb", "after-bomb"]).await;
}

/// Slowloris: 40 sockets against `max_connections = 40` (every slot taken) with
/// `header_timeout_ms = 1000`. 30 trickle a header line every 200 ms forever, 10 connect and
/// send nothing. All are closed at the header timeout, and a good client that queued behind
/// them is served right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_timeout() {
    let f = start("[http]\nmax_connections = 40\nheader_timeout_ms = 1000\n");
    let url = f.http_url();
    let addr = f.addr("http");
    let t0 = Instant::now();
    let attackers: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut got = Vec::new();
                let mut b = [0u8; 512];
                if i < 30 {
                    let _ = s.write_all(b"POST /v1/readings/slow HTTP/1.1\r\nHost: x\r\n");
                }
                let start = Instant::now();
                let mut k = 0;
                while start.elapsed() < Duration::from_secs(30) {
                    if i < 30
                        && s.write_all(format!("X-Slow-{k}: 1\r\n").as_bytes())
                            .is_err()
                    {
                        return (true, got);
                    }
                    k += 1;
                    match s.read(&mut b) {
                        Ok(0) => return (true, got),
                        Ok(n) => got.extend_from_slice(&b[..n]),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return (true, got),
                    }
                }
                (false, got)
            })
        })
        .collect();
    // Let the attackers take every slot, then queue the good client behind them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    good_post(&url, "after", "after-slowloris").await;
    let served_after = t0.elapsed();
    let mut answered_408 = 0;
    for a in attackers {
        let (closed, got) = a.join().unwrap();
        assert!(closed, "a slowloris socket was left open");
        if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408") {
            answered_408 += 1;
        }
    }
    let all_closed = t0.elapsed();
    eprintln!(
        "slowloris: good client served after {served_after:?}, all 40 closed after {all_closed:?}, {answered_408} answered 408"
    );
    assert!(
        all_closed < Duration::from_secs(20),
        "closing took {all_closed:?} with a 1 s header timeout"
    );
    f.assert_peak_below(PEAK_BOUND, "slowloris");
    assert_stored(f, &["after-slowloris"]).await;
}

/// A body trickled one byte every 300 ms (Content-Length 100) gets 408 problem+json naming
/// `body_timeout_ms` (1000 here) instead of holding the connection and its handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408() {
    let f = start("[http]\nbody_timeout_ms = 1000\n");
    let url = f.http_url();
    let addr = f.addr("http");
    let slow: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                s.write_all(
                    b"POST /v1/readings/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
                )
                .unwrap();
                let mut got = Vec::new();
                let mut b = [0u8; 4096];
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(20) {
                    if s.write_all(b"x").is_err() {
                        break;
                    }
                    match s.read(&mut b) {
                        Ok(0) => break,
                        Ok(n) => {
                            got.extend_from_slice(&b[..n]);
                            if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                                break;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
                String::from_utf8_lossy(&got).into_owned()
            })
        })
        .collect();
    good_post(&url, "during", "during-slow-body").await;
    for s in slow {
        let answer = s.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("application/problem+json") && answer.contains("body_timeout_ms"),
            "{answer}"
        );
    }
    f.assert_peak_below(PEAK_BOUND, "trickled body");
    assert_stored(f, &["during-slow-body"]).await;
}

/// Oversized headers: 50 concurrent requests with a 1 MiB header value, and one with 500
/// headers. hyper answers 431 (Request Header Fields Too Large) before the router sees them,
/// so the body is not problem+json; the bound is hyper's read buffer (~400 KiB) per
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let f = start("");
    let url = f.http_url();
    let addr = f.addr("http");
    let big: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let mut req = b"POST /v1/readings/h HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
                req.extend(std::iter::repeat_n(b'a', MIB as usize));
                req.extend_from_slice(b"\r\nContent-Length: 1\r\n\r\n1");
                raw_request(addr, &req)
            })
        })
        .collect();
    let mut many = b"POST /v1/readings/h HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..500 {
        many.extend_from_slice(format!("X-H-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"Content-Length: 1\r\n\r\n1");
    let (code, text) = tokio::task::spawn_blocking(move || raw_request(addr, &many))
        .await
        .unwrap();
    assert_eq!(code, Some(431), "500 headers: {text}");
    good_post(&url, "during", "during-headers").await;
    for b in big {
        let (code, text) = b.join().unwrap();
        assert_eq!(code, Some(431), "1 MiB header: {text}");
    }
    good_post(&url, "after", "after-headers").await;
    f.assert_peak_below(PEAK_BOUND, "oversized headers");
    assert_stored(f, &["during-headers", "after-headers"]).await;
}

/// Topics and device ids that are not UTF-8 (percent-encoded, raw bytes in the request
/// line, in a JSON string, as a lone surrogate escape, in the X-Ferry-Device header) and a
/// NUL in a topic: each is 400, problem+json where the router sees it; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_topics_are_400() {
    let f = start("");
    let url = f.http_url();
    let addr = f.addr("http");
    let c = support::http();
    let r = c
        .post(format!("{url}/v1/readings/sensors/%FF%FE/t"))
        .body("1")
        .send()
        .await
        .unwrap();
    problem(r, 400, "topic").await;
    let r = c
        .post(format!("{url}/v1/readings/a%00b"))
        .body("1")
        .send()
        .await
        .unwrap();
    problem(r, 400, "NUL").await;
    let mut body = br#"[{"topic": "sensors/"#.to_vec();
    body.extend_from_slice(&[0xFF, 0xFE, 0xC0]);
    body.extend_from_slice(br#"", "payload": 1}]"#);
    let r = c
        .post(format!("{url}/v1/readings"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    problem(r, 400, "line 1").await;
    let r = c
        .post(format!("{url}/v1/readings"))
        .header("content-type", "application/json")
        .body(r#"[{"topic": "bad\udc00topic", "payload": 1}]"#)
        .send()
        .await
        .unwrap();
    problem(r, 400, "line 1").await;
    let r = c
        .post(format!("{url}/v1/readings/t"))
        .header(
            "x-ferry-device",
            reqwest::header::HeaderValue::from_bytes(&[b'd', 0xFF, 0xFE]).unwrap(),
        )
        .body("1")
        .send()
        .await
        .unwrap();
    problem(r, 400, "X-Ferry-Device").await;
    // Raw non-UTF-8 bytes in the request line never reach the router.
    let mut req = b"POST /v1/readings/raw/".to_vec();
    req.extend_from_slice(&[0xFF, 0xFE]);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1");
    let (code, text) = tokio::task::spawn_blocking(move || raw_request(addr, &req))
        .await
        .unwrap();
    assert_eq!(code, Some(400), "{text}");
    good_post(&url, "after", "after-utf8").await;
    f.assert_peak_below(PEAK_BOUND, "invalid UTF-8");
    let n = assert_stored(f, &["after-utf8"]).await;
    assert_eq!(n, 1, "only the good reading is stored");
}

/// JSON nested 100000 deep (`[[[[...]]]]`, 200 KB) as a batch payload, a SenML pack, an
/// NDJSON line, and gzip-compressed 2 million deep (4 MB inflated): each is 400 problem+json
/// (serde_json's recursion limit), ferry does not overflow its stack, and nothing is stored.
/// The single-reading endpoint stores a body as opaque bytes, so nesting is no attack there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_400() {
    let f = start("");
    let url = f.http_url();
    let c = support::http();
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let cases = [
        (
            "application/json",
            format!(r#"[{{"topic": "t", "payload": {}}}]"#, nested(100_000)),
        ),
        ("application/senml+json", nested(100_000)),
        (
            "application/x-ndjson",
            format!("{{\"topic\": \"t\", \"payload\": {}}}\n", nested(100_000)),
        ),
    ];
    for (ct, body) in cases {
        let r = c
            .post(format!("{url}/v1/readings"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        problem(r, 400, "recursion limit").await;
    }
    let deep = format!(r#"[{{"topic": "t", "payload": {}}}]"#, nested(2_000_000));
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(deep.as_bytes()).unwrap();
    let r = c
        .post(format!("{url}/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(e.finish().unwrap())
        .send()
        .await
        .unwrap();
    problem(r, 400, "recursion limit").await;
    good_post(&url, "after", "after-nesting").await;
    f.assert_peak_below(PEAK_BOUND, "deeply nested JSON");
    let n = assert_stored(f, &["after-nesting"]).await;
    assert_eq!(n, 1, "only the good reading is stored");
}
