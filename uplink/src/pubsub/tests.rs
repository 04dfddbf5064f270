//! Unit tests of the Pub/Sub uplink: the JWT against a known answer, message encoding and
//! limits, the error mapping and bisection against a scripted HTTP server. Delivery against
//! Google's emulator is in the uplinks' end-to-end tests (uplink/tests/e2e/pubsub.rs).

use super::api::{Message, PubsubApi};
use super::auth::{Auth, ServiceAccount};
use super::*;
use crate::batch::{BatchApi, RecordOutcome};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ferry_buffer::{Reading, Source};
use ferry_config::KeyRule;
use ferry_tests::scripted::Scripted;
use ferry_tests::uplink::open_buffer;
use serde_json::{Value, json};
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// The JWT.

/// A 2048-bit RSA key made for this test only (`openssl genpkey -algorithm RSA -pkeyopt
/// rsa_keygen_bits:2048`); it grants nothing anywhere.
const TEST_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDi1/wyZtxOe7W4\n\
aDpzKb57N5h9/f1A4cF9ywvsMqu1biu4RV6+O51ZiqTIx4OOuatgcyy5XWzcpZrs\n\
0+57q2AI55HPg2Blc/qk0DatZxf9PvyL74guGJ1J4vMUgLmHRExH1suHCv4dtTBR\n\
rv2fC9jKh+lTe45gudqlDiyQWYxpEx4AAIvltIp3Q2cosTmiM/cU6EEj9w3shpZk\n\
FGUFg0n70i+CAXO9jA+S+tjYUBsvzn+lweuYQ4GnKpqPxP/OQlRncsVAsUK/T1Eu\n\
aQJp/91hz8bWV53CfB3RawyyodYZh+KhaCeRV3HlU6K0uDZhAJcsStiMJeZV6lo3\n\
HYH2jcfdAgMBAAECggEAIx5Q+vSVssjQL0ZjliSmSqkmwIqrxHmu3OysYdrOXn45\n\
4oNK0aSlDZG7RSIuKdBwybPK/r+J9Pbmbze4OgkkCvzexAOQzuQPr6hUbrABNMGl\n\
k3x31rsUzrWF8GylTF20eYK1a6i2Ap9kZaDzvsW0wFYeN0BvoGXlhZwWJhrW9AUp\n\
CECJ0T4LLPxG8BGhAWlV5zzKVrpRoRpELZd8ZhPDc127/ehQxVFWOL+hNAEIFjTC\n\
VOy7wTsEY1HLZHipH+23Q+8ta+0pjAFx1lvEsxISF9qcJ0JFakTh/cYN7SvnRYda\n\
XN+KiU7SDK7qePltu8xj1+XhVy5MTHHcmVqjECNBuQKBgQDxeGpeEfpx+UqXu5eb\n\
K+bJLHLG0SORMBGbIKS6yi146oEIXAo6IWAbBlQpoz+UsjbaYX51d/dbWGSCmNo5\n\
0lVzmY43Pjcp7Cx+1WIfCwp3Yzx+PRib4oKvVwZIRMn1UMy1TWudSsOoi2L1WZ+1\n\
K/ugDP3faotItQG/6MbYR7f59wKBgQDwfkMDi128xj/DdSjuxfltei3hlV7bkjjM\n\
CI3Xm/fdtJYNKzTF6DeSzMsrqKt+488+E8q8eQr19Jdlq9OSCuRE7qHby89+eoxL\n\
NlFyNhBd7BaJzOjmaMXNFIHXeSa9rQ/BlVa7m3kBuzV62EwpROmFuV81qQ5xJtWA\n\
VlS8FR23ywKBgQCI6XSuB9WP4ABaTgQk+FxvvmMJtbVL8gxZf8XHHzFvOM+WlNE7\n\
qobaa9k2jphTUETnx5WzNyUqRtEed1pspITM+cj4K6+Ndpq4A3cSEOmLTdoT3cJh\n\
SKo+jsJCIba9AGZBejdFRQnxO68NXBbA28JdOmCL19ZHkFIApRRxtyBqewKBgQDH\n\
u0Uyw2NVbZz1Wu9k5v0RpEBIssJ2P0l2gsAyyjEga2OXikOo/gRxoi42kz3jA5ZR\n\
6yQcRbcJsFqwsPTkvLD6YuoAXpN0apjrujAIV8heCL5rMchX27ozaY2wg8jeDMYi\n\
M0I2S5hDDNUMsmkGeVosmljtevsolGUK0ihLkIn+4wKBgB8ZxcZCc+4lLfNuZc1C\n\
71BR9RxxxSZ7sRtkHMaQGZTVHmWzBGuVapyuigjZRwlg21L4CLVSX5YNaHDB/+0T\n\
MsYK1PmA6mpqkpqCS6Q3P+99wdteL6ZPfjOKD611QqizhNnQ+ezxVUgvcp/PKKQ4\n\
L8+FEVUWo41JXja3QH1LkfzU\n\
-----END PRIVATE KEY-----\n";

const TEST_EMAIL: &str = "ferry-test@ferry-project.iam.gserviceaccount.com";

fn key_file_json() -> String {
    json!({
        "type": "service_account",
        "project_id": "ferry-project",
        "private_key_id": "0123456789abcdef",
        "private_key": TEST_KEY_PEM,
        "client_email": TEST_EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

/// The signing input for kid `0123456789abcdef`, iss = sub = `TEST_EMAIL`, aud
/// `https://pubsub.googleapis.com/`, iat 1700000000, exp 1700003600, and its signature,
/// computed independently of ferry with Python and OpenSSL:
///
/// ```text
/// b = lambda x: base64.urlsafe_b64encode(x).rstrip(b'=').decode()
/// si = b(b'{"alg":"RS256","typ":"JWT","kid":"0123456789abcdef"}') + '.' + b(b'{"iss":"ferry-test@ferry-project.iam.gserviceaccount.com","sub":"ferry-test@ferry-project.iam.gserviceaccount.com","aud":"https://pubsub.googleapis.com/","iat":1700000000,"exp":1700003600}')
/// sig = subprocess.run(['openssl', 'dgst', '-sha256', '-sign', 'test.pem'], input=si.encode(), capture_output=True).stdout
/// print(si, b(sig))
/// ```
const EXPECTED_SIGNING_INPUT: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6IjAxMjM0NTY3ODlhYmNkZWYifQ.eyJpc3MiOiJmZXJyeS10ZXN0QGZlcnJ5LXByb2plY3QuaWFtLmdzZXJ2aWNlYWNjb3VudC5jb20iLCJzdWIiOiJmZXJyeS10ZXN0QGZlcnJ5LXByb2plY3QuaWFtLmdzZXJ2aWNlYWNjb3VudC5jb20iLCJhdWQiOiJodHRwczovL3B1YnN1Yi5nb29nbGVhcGlzLmNvbS8iLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6MTcwMDAwMzYwMH0";
const EXPECTED_SIGNATURE: &str = "Ku8Mb-wX37e_PQtm6oUs03r2yn2R41J1AO_4QolNsWEbMK-Oyy8c0oUs7qTQSMSMaejA01kA2L-8p1sQUV-PVMBo0W-EgTqZiyCJhwb1yt4GATKSAIhjZm11dozjDKGhYhrSRstQjURWXmrsTsLG6k8iIhlZ17cMG8jQNnCpc2AhYq6O12TuQIgEYqwjR95VtY990duZMw4Dm9WFvoh-PeRKPHjCFJG18oIKrRWoFMOSlUPk3MyNGVC4Bvi2-cwH4OIpfajd5MzlT3SDy2SCmTqStmcS-BMBFt4i8uSS1-03zBiF5PRs-zVrXh1aDKO0VQJJB9rMXYbi5YkBB3zX5g";

#[test]
fn jwt_matches_the_known_answer() {
    let sa = ServiceAccount::parse(key_file_json().as_bytes()).unwrap();
    assert_eq!(sa.email(), TEST_EMAIL);
    let jwt = sa.jwt(auth::AUDIENCE, 1_700_000_000).unwrap();
    assert_eq!(
        jwt,
        format!("{EXPECTED_SIGNING_INPUT}.{EXPECTED_SIGNATURE}")
    );

    // Header and claims decode as Google expects them.
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let decode =
        |s: &str| -> Value { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap() };
    assert_eq!(
        decode(parts[0]),
        json!({"alg": "RS256", "typ": "JWT", "kid": "0123456789abcdef"})
    );
    assert_eq!(
        decode(parts[1]),
        json!({
            "iss": TEST_EMAIL,
            "sub": TEST_EMAIL,
            "aud": "https://pubsub.googleapis.com/",
            "iat": 1_700_000_000u64,
            "exp": 1_700_003_600u64,
        })
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 256);

    // The key shows nowhere.
    let debug = format!("{sa:?}");
    assert!(debug.contains(TEST_EMAIL), "{debug}");
    assert!(
        !debug.contains("PRIVATE") && !debug.contains("MIIE"),
        "{debug}"
    );
    let auth = Auth::service_account(sa);
    assert!(!format!("{auth:?}").contains("MIIE"));
    assert_eq!(auth.describe(), format!("service account {TEST_EMAIL}"));
}

#[test]
fn a_bad_key_file_is_refused_without_quoting_it() {
    let secretish = "-----BEGIN PRIVATE KEY-----\nTOPSECRETBYTES\n-----END PRIVATE KEY-----\n";
    let cases = [
        json!({"client_email": "a@b", "private_key_id": "k", "private_key": secretish}).to_string(),
        json!({"client_email": "a@b", "private_key_id": "k", "private_key": 5}).to_string(),
        json!({"client_email": "a@b", "private_key": "TOPSECRETBYTES"}).to_string(),
        json!({"type": "authorized_user", "client_email": "a@b", "private_key_id": "k",
               "private_key": "TOPSECRETBYTES"})
        .to_string(),
        "{\"private_key\": \"TOPSECRETBYTES".to_string(),
    ];
    for case in &cases {
        let err = ServiceAccount::parse(case.as_bytes()).unwrap_err();
        assert!(!err.contains("TOPSECRET"), "{err}");
        assert!(!err.is_empty());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.json");
    std::fs::write(&path, &cases[0]).unwrap();
    let err = ServiceAccount::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("key.json") && !err.contains("TOPSECRET"),
        "{err}"
    );
    let err = ServiceAccount::load(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Encoding and limits.

fn client() -> HttpClient {
    HttpClient::new(None, Duration::from_secs(5)).unwrap()
}

fn api_for(endpoint: &str, auth: Auth, ordering_key: KeyRule) -> PubsubApi {
    PubsubApi::new(
        client(),
        auth,
        endpoint,
        "proj",
        "readings",
        ordering_key,
        "gw1".into(),
    )
}

fn reading(device: &str, topic: &str, payload: &[u8]) -> Reading {
    Reading::new(Source::Mqtt, device, topic, payload.to_vec())
}

fn message_json(m: &Message) -> Value {
    serde_json::from_slice(m.json()).unwrap()
}

#[test]
fn a_message_carries_data_attributes_and_ordering_key() {
    let api = api_for("http://127.0.0.1:1", Auth::none(), KeyRule::Device);
    let mut r =
        reading("dev-1", "site/7/temp", &[0, 1, 2, 0xff]).with_content_type("application/x");
    r.id = 42;
    r.received_at_ms = 1_700_000_000_123;
    r.properties = vec![
        ("unit".into(), "C".into()),
        ("ferry-id".into(), "spoofed".into()),
    ];
    let m = api.encode(&r).unwrap();
    let v = message_json(&m);
    assert_eq!(
        STANDARD.decode(v["data"].as_str().unwrap()).unwrap(),
        [0, 1, 2, 0xff]
    );
    assert_eq!(
        v["attributes"],
        json!({
            "unit": "C",
            "ferry-id": "gw1-42",
            "ferry-device": "dev-1",
            "ferry-topic": "site/7/temp",
            "ferry-received-at": "1700000000123",
            "ferry-source": "mqtt",
            "ferry-clock": "unknown",
            "content-type": "application/x",
        })
    );
    assert_eq!(v["orderingKey"], "dev-1");
    assert_eq!(api.size(&m), m.json().len() + 1);
    let lane = api.lane(&m);
    assert!(lane.is_some());
    assert_eq!(
        api.lane(&api.encode(&reading("dev-1", "x", b"")).unwrap()),
        lane
    );
    assert_ne!(
        api.lane(&api.encode(&reading("dev-2", "x", b"")).unwrap()),
        lane
    );

    // No ordering key: no field, no lane; level:N takes a topic level.
    let none = api_for("http://127.0.0.1:1", Auth::none(), KeyRule::None);
    let m = none.encode(&r).unwrap();
    assert!(message_json(&m).get("orderingKey").is_none());
    assert_eq!(none.lane(&m), None);
    let level = api_for("http://127.0.0.1:1", Auth::none(), KeyRule::Level(1));
    assert_eq!(message_json(&level.encode(&r).unwrap())["orderingKey"], "7");
    assert_eq!(none.limits(), (1000, 10_000_000 - 16));
}

#[test]
fn a_reading_beyond_the_limits_is_refused_with_the_reason() {
    let api = api_for("http://127.0.0.1:1", Auth::none(), KeyRule::Topic);
    let with_props = |props: Vec<(String, String)>| {
        let mut r = reading("d", "t", b"x");
        r.properties = props;
        api.encode(&r)
    };
    let props = |n: usize| (0..n).map(|i| (format!("k{i}"), "v".into())).collect();
    let err = with_props(props(95)).unwrap_err();
    assert_eq!(
        err,
        "the reading has 101 attributes (95 MQTT v5 properties and ferry's fields), more than Pub/Sub's limit of 100"
    );
    // 94 device properties and ferry's 6 fields (no content type) fit.
    assert!(with_props(props(94)).is_ok());
    let err = with_props(vec![("k".into(), "v".repeat(1025))]).unwrap_err();
    assert!(err.contains("1025 bytes") && err.contains("1024"), "{err}");
    assert!(with_props(vec![("k".into(), "v".repeat(1024))]).is_ok());
    let err = with_props(vec![("k".repeat(257), "v".into())]).unwrap_err();
    assert!(err.contains("257 bytes") && err.contains("256"), "{err}");
    let err = with_props(vec![("googclient_x".into(), "v".into())]).unwrap_err();
    assert!(err.contains("goog"), "{err}");
    let err = with_props(vec![(String::new(), "v".into())]).unwrap_err();
    assert!(err.contains("empty key"), "{err}");
    // A topic over 1,024 bytes: its `ferry-topic` value (and ordering key) cannot be sent.
    let err = api
        .encode(&reading("d", &"t".repeat(1025), b"x"))
        .unwrap_err();
    assert!(err.contains("\"ferry-topic\" is 1025 bytes"), "{err}");
    // A payload whose base64 does not fit in one request.
    let err = api
        .encode(&reading("d", "t", &vec![7; 7_600_000]))
        .unwrap_err();
    assert!(err.contains("JSON"), "{err}");
    assert!(api.encode(&reading("d", "t", &vec![7; 7_000_000])).is_ok());
}

#[test]
fn settings_are_checked_before_anything_is_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["gcp"]);
    let build = |cfg: PubsubUplink| {
        PubsubSink::new(&cfg, Common::new("gcp", "gw1", buffer.clone())).map(|_| ())
    };
    let ok = PubsubUplink {
        project: "my-project".into(),
        topic: "readings".into(),
        endpoint: Some("http://127.0.0.1:8085/".into()),
        ..PubsubUplink::default()
    };
    build(ok.clone()).unwrap();
    for (cfg, needle) in [
        (
            PubsubUplink {
                topic: "t".into(),
                ..ok.clone()
            },
            "topic",
        ),
        (
            PubsubUplink {
                topic: "goog-x".into(),
                ..ok.clone()
            },
            "topic",
        ),
        (
            PubsubUplink {
                project: String::new(),
                ..ok.clone()
            },
            "project",
        ),
        (
            PubsubUplink {
                endpoint: Some("ftp://x".into()),
                ..ok.clone()
            },
            "endpoint",
        ),
        (
            PubsubUplink {
                endpoint: None,
                credentials_file: Some(dir.path().join("none.json")),
                ..ok.clone()
            },
            "cannot read the service account key",
        ),
    ] {
        let err = build(cfg).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    // A key file for the real endpoint is loaded at start-up.
    let key = dir.path().join("key.json");
    std::fs::write(&key, key_file_json()).unwrap();
    build(PubsubUplink {
        endpoint: None,
        credentials_file: Some(key),
        ..ok.clone()
    })
    .unwrap();
    let sink = PubsubSink::new(&ok, Common::new("other", "gw1", buffer.clone()));
    assert!(matches!(sink, Err(PubsubSinkError::Read(_))));
}

/// The `data` of each message of a publish body, as text.
fn datas(body: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| String::from_utf8(STANDARD.decode(m["data"].as_str().unwrap()).unwrap()).unwrap())
        .collect()
}

fn ids_for(body: &[u8]) -> String {
    let n = datas(body).len();
    json!({"messageIds": (0..n).map(|i| i.to_string()).collect::<Vec<_>>()}).to_string()
}

fn records(api: &PubsubApi, payloads: &[&str]) -> Vec<Arc<Message>> {
    payloads
        .iter()
        .map(|p| Arc::new(api.encode(&reading("d", "t", p.as_bytes())).unwrap()))
        .collect()
}

fn google_error(code: u16, status: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message, "status": status}}).to_string()
}

#[tokio::test]
async fn answers_map_to_outcomes_and_clear_messages() {
    let answer: Arc<Mutex<(u16, String)>> = Arc::new(Mutex::new((200, String::new())));
    let a = answer.clone();
    let server = Scripted::start(move |req| {
        let (code, body) = a.lock().unwrap().clone();
        if code == 200 && body.is_empty() {
            (200, ids_for(&req.body))
        } else {
            (code, body)
        }
    })
    .await;
    let api = api_for(&server.url(), Auth::none(), KeyRule::None);
    let recs = records(&api, &["a", "b"]);
    assert_eq!(
        api.send(recs.clone()).await.unwrap(),
        vec![RecordOutcome::Delivered; 2]
    );
    let seen = server.seen();
    assert_eq!(seen[0].path, "/v1/projects/proj/topics/readings:publish");
    assert_eq!(seen[0].authorization, None);
    assert_eq!(datas(&seen[0].body), ["a", "b"]);

    let cases: Vec<((u16, String), &str, bool)> = vec![
        (
            (404, google_error(404, "NOT_FOUND", "Topic not found")),
            "Pub/Sub topic projects/proj/topics/readings not found (404 NOT_FOUND)",
            false,
        ),
        (
            (429, google_error(429, "RESOURCE_EXHAUSTED", "quota")),
            "Pub/Sub throttled publishing to projects/proj/topics/readings (429 RESOURCE_EXHAUSTED: quota)",
            true,
        ),
        (
            (503, google_error(503, "UNAVAILABLE", "try again\nlater")),
            "publishing to Pub/Sub topic projects/proj/topics/readings failed (503 UNAVAILABLE: try again later)",
            false,
        ),
        (
            (502, "<html>bad gateway</html>".into()),
            "publishing to Pub/Sub topic projects/proj/topics/readings failed (502 BAD GATEWAY: <html>bad gateway</html>)",
            false,
        ),
        (
            (
                403,
                google_error(403, "PERMISSION_DENIED", "User not authorized"),
            ),
            "Pub/Sub refused publishing to projects/proj/topics/readings with no credentials (plain http endpoint) (403 PERMISSION_DENIED: User not authorized)",
            false,
        ),
        (
            (504, google_error(504, "DEADLINE_EXCEEDED", "deadline")),
            "publishing to Pub/Sub topic projects/proj/topics/readings failed (504 DEADLINE_EXCEEDED: deadline)",
            false,
        ),
        (
            (200, json!({"messageIds": ["1"]}).to_string()),
            "Pub/Sub answered 1 message ids for 2 messages published to projects/proj/topics/readings",
            false,
        ),
    ];
    for ((code, body), message, throttled) in cases {
        *answer.lock().unwrap() = (code, body);
        let err = api.send(recs.clone()).await.unwrap_err();
        assert_eq!(err.message, message);
        assert_eq!(err.throttled, throttled, "{message}");
    }

    // One message refused: dead-lettered with Pub/Sub's reason.
    *answer.lock().unwrap() = (400, google_error(400, "INVALID_ARGUMENT", "bad attribute"));
    assert_eq!(
        api.send(recs[..1].to_vec()).await.unwrap(),
        vec![RecordOutcome::Refused(
            "Pub/Sub refused the message (400 INVALID_ARGUMENT: bad attribute)".into()
        )]
    );

    // Nothing listens: a transport error naming the endpoint.
    drop(server);
    let dead = api_for("http://127.0.0.1:1", Auth::none(), KeyRule::None);
    let err = dead.send(records(&dead, &["a"])).await.unwrap_err();
    assert!(
        err.message
            .starts_with("cannot reach Pub/Sub at http://127.0.0.1:1: "),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn a_refused_message_in_a_request_is_found_by_bisection() {
    // The server refuses any request holding a message "bad*"; "slow" fails with 503 once.
    let failed_once = Arc::new(Mutex::new(false));
    let f = failed_once.clone();
    let server = Scripted::start(move |req| {
        let d = datas(&req.body);
        if d.iter().any(|m| m.starts_with("bad")) {
            return (
                400,
                google_error(400, "INVALID_ARGUMENT", "Some messages are invalid"),
            );
        }
        if d.iter().any(|m| m == "slow") && !std::mem::replace(&mut *f.lock().unwrap(), true) {
            return (503, google_error(503, "UNAVAILABLE", "busy"));
        }
        (200, ids_for(&req.body))
    })
    .await;
    let api = api_for(&server.url(), Auth::none(), KeyRule::None);
    let names = ["m0", "m1", "bad2", "m3", "m4", "bad5", "m6"];
    let out = api.send(records(&api, &names)).await.unwrap();
    let refused = RecordOutcome::Refused(
        "Pub/Sub refused the message (400 INVALID_ARGUMENT: Some messages are invalid)".into(),
    );
    let d = RecordOutcome::Delivered;
    assert_eq!(
        out,
        vec![
            d.clone(),
            d.clone(),
            refused.clone(),
            d.clone(),
            d.clone(),
            refused,
            d.clone()
        ]
    );
    // Every good message was published exactly once.
    let mut published: Vec<String> = server
        .seen()
        .iter()
        .filter(|s| !datas(&s.body).iter().any(|m| m.starts_with("bad")))
        .flat_map(|s| datas(&s.body))
        .collect();
    published.sort();
    assert_eq!(published, ["m0", "m1", "m3", "m4", "m6"]);

    // A half that fails otherwise: it and everything after it are to be retried, in order.
    let names = ["bad0", "slow", "m2", "m3"];
    let out = api.send(records(&api, &names)).await.unwrap();
    let retry = RecordOutcome::Retry {
        reason: "publishing to Pub/Sub topic projects/proj/topics/readings failed (503 UNAVAILABLE: busy)".into(),
        throttled: false,
    };
    assert!(matches!(out[0], RecordOutcome::Refused(_)), "{out:?}");
    assert_eq!(out[1..], [retry.clone(), retry.clone(), retry]);
}

#[tokio::test]
async fn the_metadata_server_token_is_cached_and_sent() {
    let server = Scripted::start(|req| {
        if req.path.starts_with("/computeMetadata/") {
            (
                200,
                json!({"access_token": "ya29.token", "expires_in": 3599, "token_type": "Bearer"})
                    .to_string(),
            )
        } else {
            (200, ids_for(&req.body))
        }
    })
    .await;
    let auth = Auth::metadata(&server.addr.to_string());
    let api = api_for(&server.url(), auth, KeyRule::None);
    for _ in 0..3 {
        api.send(records(&api, &["a"])).await.unwrap();
    }
    let seen = server.seen();
    let token_fetches: Vec<_> = seen
        .iter()
        .filter(|s| s.path == "/computeMetadata/v1/instance/service-accounts/default/token")
        .collect();
    assert_eq!(token_fetches.len(), 1, "{seen:?}");
    let publishes: Vec<_> = seen
        .iter()
        .filter(|s| s.path.ends_with(":publish"))
        .collect();
    assert_eq!(publishes.len(), 3);
    assert!(
        publishes
            .iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer ya29.token"))
    );

    // A token with 1 s to live is kept half of it, then fetched again.
    let fetches = Arc::new(Mutex::new(0u32));
    let f = fetches.clone();
    let short = Scripted::start(move |req| {
        if req.path.starts_with("/computeMetadata/") {
            let mut n = f.lock().unwrap();
            *n += 1;
            (
                200,
                json!({"access_token": format!("tok-{n}"), "expires_in": 1}).to_string(),
            )
        } else {
            (200, ids_for(&req.body))
        }
    })
    .await;
    let api = api_for(
        &short.url(),
        Auth::metadata(&short.addr.to_string()),
        KeyRule::None,
    );
    api.send(records(&api, &["a"])).await.unwrap();
    api.send(records(&api, &["b"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    api.send(records(&api, &["c"])).await.unwrap();
    let auths: Vec<Option<String>> = short
        .seen()
        .iter()
        .filter(|s| s.path.ends_with(":publish"))
        .map(|s| s.authorization.clone())
        .collect();
    assert_eq!(
        auths,
        [
            Some("Bearer tok-1"),
            Some("Bearer tok-1"),
            Some("Bearer tok-2")
        ]
        .map(|a| a.map(String::from))
    );

    // A self-signed JWT for a service account; a metadata server that is down.
    let sa = ServiceAccount::parse(key_file_json().as_bytes()).unwrap();
    let api = api_for(&server.url(), Auth::service_account(sa), KeyRule::None);
    api.send(records(&api, &["a"])).await.unwrap();
    let last = server.seen().pop().unwrap();
    let bearer = last.authorization.unwrap();
    let jwt = bearer.strip_prefix("Bearer ").unwrap();
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://pubsub.googleapis.com/");
    assert_eq!(claims["iss"], TEST_EMAIL);

    let api = api_for(&server.url(), Auth::metadata("127.0.0.1:1"), KeyRule::None);
    let err = api.send(records(&api, &["a"])).await.unwrap_err();
    assert!(
        err.message
            .starts_with("cannot get an access token from the GCE metadata server at 127.0.0.1:1"),
        "{}",
        err.message
    );
}
