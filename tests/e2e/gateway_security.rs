//! Security checks against the real binary: secrets never appear in the
//! log, `/api/status`, `/metrics`, the status page or `ferry check-config` output, even at
//! debug level and after failed logins; MQTT v5 refusal reason codes; the data directory is
//! created 0700 and an open one is warned about; private keys other users can read are
//! refused before any port is bound.
//!
//! Already covered elsewhere (not repeated here): MQTT v3.1.1 refusals
//! (`mqtt_ingest::auth_failures_get_refusing_connacks`), mutual TLS
//! (`mqtt_mosquitto::mosquitto_pub_over_tls_and_mutual_tls`), HTTP token refusals and device
//! binding (`http_ingest::tokens_and_device_binding`), the status token
//! (`status_api::status_and_metrics_under_traffic_show_no_secret`,
//! `status_api::ferry_status_needs_the_token_when_one_is_set`).

use crate::support;
use ferry_tests::Ferry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every secret below contains this marker, so one search finds any of them.
const MARK: &str = "Zq7X";
const MQTT_PW: &str = "mqtt-user-pw-Zq7X-1";
const HTTP_TOKEN: &str = "http-token-Zq7X-2";
const STATUS_TOKEN: &str = "status-token-Zq7X-3";
const KAFKA_PW: &str = "kafka-sasl-pw-Zq7X-4";
const UPLINK_PW: &str = "uplink-mqtt-pw-Zq7X-5";
/// Wrong credentials devices send: not configured secrets, but a user's typo of one.
const WRONG_MQTT_PW: &str = "wrong-mqtt-pw-Zq7X-6";
const WRONG_HTTP_TOKEN: &str = "wrong-http-token-Zq7X-7";
const WRONG_STATUS_TOKEN: &str = "wrong-status-token-Zq7X-8";

fn assert_no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(MARK),
        "{what} shows a secret (marker {MARK}):\n{}",
        text.lines()
            .filter(|l| l.contains(MARK))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A fake upstream MQTT broker: records the first packet of every connection and refuses
/// it with CONNACK 0x05 (not authorized).
fn refusing_broker() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 4096];
            if let Ok(n) = s.read(&mut b) {
                seen2.lock().unwrap().extend_from_slice(&b[..n]);
            }
            let _ = s.write_all(&[0x20, 2, 0, 5]);
        }
    });
    (addr, seen)
}

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[mqtt]
allow_anonymous = false

[[mqtt.users]]
username = "fleet"
password = "{MQTT_PW}"

[[http.tokens]]
token = "{HTTP_TOKEN}"
name = "fleet"

[status]
token = "{STATUS_TOKEN}"

[uplinks.kafka]
type = "kafka"
# Nothing listens on the discard port: the uplink can never deliver.
brokers = "127.0.0.1:9"
security_protocol = "sasl_plaintext"
sasl_mechanism = "PLAIN"
sasl_username = "ferry"
sasl_password = "{KAFKA_PW}"
message_timeout_ms = 1500
initial_backoff_ms = 200
max_backoff_ms = 1000

[uplinks.mqtt]
type = "mqtt"
url = "mqtt://{upstream}"
username = "ferry-up"
password = "{UPLINK_PW}"
initial_backoff_ms = 100
max_backoff_ms = 300
"#
    )
}

/// Sends a CONNECT (protocol `level` 4 or 5) with optional credentials and returns the
/// CONNACK's return / reason code.
fn connack(addr: SocketAddr, level: u8, id: &str, login: Option<(&str, &str)>) -> u8 {
    use rumqttc::mqttbytes::v4 as c4;
    use rumqttc::v5::mqttbytes::v5 as c5;
    let mut pkt = bytes::BytesMut::new();
    if level == 5 {
        let connect = c5::Connect {
            keep_alive: 60,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        let login = login.map(|(u, p)| c5::Login::new(u, p));
        c5::Packet::Connect(connect, None, login)
            .write(&mut pkt, None)
            .unwrap();
    } else {
        let mut connect = c4::Connect::new(id);
        connect.keep_alive = 60;
        connect.login = login.map(|(u, p)| c4::Login::new(u, p));
        c4::Packet::Connect(connect)
            .write(&mut pkt, 1 << 20)
            .unwrap();
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&pkt).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0x20, "a CONNACK: {b:02x?}");
    b[3]
}

/// Secrets configured in every place ferry has one (MQTT user password, HTTP token, status
/// token, Kafka SASL password, MQTT uplink password), with ferry logging at debug level, the
/// uplink refused by its broker, and failed logins carrying wrong passwords and tokens: no
/// secret shows in the log, `/api/status`, `/metrics`, the status page or `ferry
/// check-config` output (of this config, and of a broken one with secrets of the wrong type).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_shown() {
    let (upstream, upstream_saw) = refusing_broker();
    let toml = config(upstream);
    let ferry = Ferry::start_with_env(&toml, &[("FERRY_LOG", "debug")]);
    let base = ferry.http_url();
    let mqtt = ferry.addr("mqtt");

    // MQTT: a good login, and refusals (v3.1.1 and v5 codes).
    let codes = tokio::task::spawn_blocking(move || {
        [
            connack(mqtt, 4, "good-4", Some(("fleet", MQTT_PW))),
            connack(mqtt, 5, "good-5", Some(("fleet", MQTT_PW))),
            connack(mqtt, 4, "bad-4", Some(("fleet", WRONG_MQTT_PW))),
            connack(mqtt, 5, "bad-5", Some(("fleet", WRONG_MQTT_PW))),
            connack(mqtt, 5, "anon-5", None),
        ]
    })
    .await
    .unwrap();
    // 0x04 bad username or password (v3.1.1); 0x86 / 0x87 bad credentials / not authorized
    // (v5).
    assert_eq!(codes, [0, 0, 0x04, 0x86, 0x87]);

    // HTTP: a good token, a wrong one, none.
    let c = support::http();
    let post = |token: Option<&'static str>| {
        let mut b = c.post(format!("{base}/v1/readings/site/t")).body("1");
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        b.send()
    };
    assert_eq!(post(Some(HTTP_TOKEN)).await.unwrap().status().as_u16(), 202);
    let r = post(Some(WRONG_HTTP_TOKEN)).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_no_secret("a 401 body", &r.text().await.unwrap());
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);

    // The uplink really sent its password (so a leak was possible) and was refused.
    let start = Instant::now();
    while !String::from_utf8_lossy(&upstream_saw.lock().unwrap()).contains(UPLINK_PW) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the MQTT uplink never tried to log in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few refused reconnects, so their errors are in the log.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Every endpoint that shows state, with the right token, a wrong one and none.
    for path in ["/", "/api/status", "/metrics", "/healthz", "/readyz"] {
        for token in [Some(STATUS_TOKEN), Some(WRONG_STATUS_TOKEN), None] {
            let (code, body) = support::get(&format!("{base}{path}"), token).await;
            assert!(code == 200 || code == 401, "{path}: {code}");
            assert_no_secret(&format!("{path} ({code})"), &body);
        }
    }
    let (code, body) = support::get(&format!("{base}/api/status"), Some(STATUS_TOKEN)).await;
    assert_eq!(code, 200);
    assert!(
        body.contains("\"uplinks\"") || body.contains("uplink"),
        "{body}"
    );

    // ferry check-config of the same file, and of a broken one whose secrets have the
    // wrong type (serde would quote them in the error).
    let path = ferry.config_path.display().to_string();
    let (code, out, err) = Ferry::cli(&["check-config", &path]);
    assert_eq!(code, 0, "{out}{err}");
    assert_no_secret("check-config", &format!("{out}{err}"));
    let broken = ferry.config_path.with_file_name("broken.toml");
    std::fs::write(
        &broken,
        "[[mqtt.users]]\nusername = \"u\"\npassword = 7791234\n[status]\ntoken = [\"Zq7X\"]\n\
         [uplinks.kafka]\ntype = \"kafka\"\nsasl_password = 7791234\nsasl_pasword = \"x-Zq7X\"\n[[http.tokens]]\ntoken = \"t-Zq7X\"\n\
         [[http.tokens]]\ntoken = \"t-Zq7X\"\n",
    )
    .unwrap();
    let (code, out, err) = Ferry::cli(&["check-config", &broken.display().to_string()]);
    assert_eq!(code, 64, "{out}{err}");
    assert_no_secret("check-config of a broken file", &format!("{out}{err}"));
    assert!(!err.contains("7791234"), "{err}");
    assert!(
        err.contains("mqtt.users[0].password: invalid type"),
        "{err}"
    );

    let log = ferry.log();
    assert!(
        log.contains("DEBUG"),
        "the log is at debug level:\n{log:.2000}"
    );
    assert!(
        log.contains("bad username or password"),
        "the MQTT refusal is logged"
    );
    assert_no_secret("the log", &log);
}

/// The data directory ferry creates (with its missing parents) is 0700. A directory that
/// exists with access for other users is not changed (the operator may have chosen it) but
/// warned about, in the log at every start and by `ferry check-config`.
#[test]
fn the_data_dir_is_private_or_warned_about() {
    let f = Ferry::start("");
    let mode = std::fs::metadata(&f.data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data_dir mode {mode:o}");
    assert!(!f.log().contains("gateway.data_dir"), "{}", f.log());
    drop(f);

    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/data");
    // The harness sets FERRY_GATEWAY_DATA_DIR, which wins over the file: override it.
    let f = Ferry::start_with_env("", &[("FERRY_GATEWAY_DATA_DIR", nested.to_str().unwrap())]);
    for p in [dir.path().join("a"), dir.path().join("a/b"), nested.clone()] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", p.display());
    }
    drop(f);

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!("[gateway]\ndata_dir = {open:?}\n");
    let f = Ferry::start_with_env("", &[("FERRY_GATEWAY_DATA_DIR", open.to_str().unwrap())]);
    let log = f.log();
    assert!(
        log.contains("WARN") && log.contains("gateway.data_dir") && log.contains("mode 0755"),
        "{log}"
    );
    let mode = std::fs::metadata(&open).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "ferry leaves the operator's mode alone");
    let cfg = dir.path().join("open.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let (code, out, err) = Ferry::cli(&["check-config", &cfg.display().to_string()]);
    assert_eq!(code, 0, "a warning is not an error: {out}{err}");
    assert!(
        err.contains("warning: gateway.data_dir:") && err.contains("chmod 700"),
        "{err}"
    );
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A private key other users can read (mode 0644) is refused, for each of the three keys
/// ferry reads, by `ferry check-config` and by `ferry run` (exit 64, before any port is
/// bound), naming the key path and the mode. 0600 and 0640 are accepted.
#[test]
fn private_keys_other_users_can_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    write_mode(&cert, &ck.cert.pem(), 0o644);
    write_mode(&key, &ck.key_pair.serialize_pem(), 0o644);
    let toml = format!(
        "[gateway]\ndata_dir = {:?}\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [mqtt.tls]\nlisten = \"127.0.0.1:0\"\ncert_path = {cert:?}\nkey_path = {key:?}\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [http.tls]\ncert_path = {cert:?}\nkey_path = {key:?}\n\
         [uplinks.mqtt]\ntype = \"mqtt\"\nurl = \"mqtts://127.0.0.1:1\"\nclient_cert_path = {cert:?}\nclient_key_path = {key:?}\n",
        dir.path().join("data")
    );
    let cfg = dir.path().join("ferry.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let cfg = cfg.display().to_string();
    let (code, out, err) = Ferry::cli(&["check-config", &cfg]);
    assert_eq!(code, 64, "{out}{err}");
    for k in [
        "mqtt.tls.key_path",
        "http.tls.key_path",
        "uplinks.mqtt.client_key_path",
    ] {
        assert!(
            err.contains(&format!("{k}: the private key {}", key.display())),
            "{k}: {err}"
        );
    }
    assert!(
        err.contains("mode 0644") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists());
    let (code, _, err) = Ferry::cli(&["run", "--config", &cfg]);
    assert_eq!(code, 64, "ferry run refuses it too: {err}");
    assert!(err.contains("mqtt.tls.key_path"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "refused before the buffer was opened"
    );
    for ok in [0o600, 0o640] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(ok)).unwrap();
        let (code, out, err) = Ferry::cli(&["check-config", &cfg]);
        assert_eq!(code, 0, "mode {ok:o}: {out}{err}");
    }
    // And ferry serves TLS with the 0600 key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = Ferry::start(&toml);
    assert!(f.addrs.contains_key("mqtts"), "{:?}", f.addrs);
}
