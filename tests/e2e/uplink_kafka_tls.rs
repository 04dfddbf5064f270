//! The Kafka uplink over TLS on the wire: a real TLS terminator (Debian's stunnel4) in front
//! of librdkafka's mock cluster, whose broker advertises the terminator's address, with a CA
//! made by the test. Delivered with `ssl_ca_path`; refused, with one readable line on the
//! status page, when the CA is wrong or the certificate's name does not match.

use crate::support;

use ferry_tests::kafka_mock::AdvertisedMock;
use ferry_tests::{Ferry, Server, free_port, require_tool};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A server certificate for `host` signed by `ca`: (cert PEM, key PEM).
fn server_cert(ca: &Ca, host: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![host.to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, host);
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, s: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

/// stunnel accepting TLS on a free port with `cert`, forwarding to `upstream`.
fn stunnel(dir: &Path, name: &str, cert: &(String, String), upstream: &str) -> Server {
    let port = free_port();
    let cert_path = write(dir, &format!("{name}.pem"), &cert.0);
    let key_path = write(dir, &format!("{name}.key"), &cert.1);
    let conf = write(
        dir,
        &format!("{name}.conf"),
        &format!(
            "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = {upstream}\ncert = {cert_path}\nkey = {key_path}\n"
        ),
    );
    let mut cmd = Command::new("stunnel4");
    cmd.arg(conf);
    Server::spawn(cmd, port, "stunnel4", Duration::from_secs(10))
}

fn config(brokers: &str, ca_path: &str) -> String {
    format!(
        r#"
[gateway]
id = "kafka-tls"

[mqtt]
enabled = false

[uplinks.kafka]
type = "kafka"
brokers = "{brokers}"
topic = "readings"
security_protocol = "ssl"
ssl_ca_path = "{ca_path}"
message_timeout_ms = 5000
initial_backoff_ms = 100
max_backoff_ms = 1000
"#
    )
}

async fn post(ferry: &Ferry, keys: &[String]) {
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({"topic": "site/tls", "device": "dev-1", "payload": {"k": k}}))
        .collect();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/readings", ferry.http_url()))
        .json(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
}

/// Waits until the uplink's status satisfies `done`; returns it.
async fn wait_uplink(ferry: &Ferry, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let st = support::status(&ferry.http_url()).await;
        let u = st["uplinks"][0].clone();
        if done(&u) {
            return u;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: uplink status {u:#}\nlog:\n{}",
            ferry.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_delivers_and_names_tls_failures() {
    let test = "kafka_over_tls_delivers_and_names_tls_failures";
    if !require_tool("stunnel4", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good_ca = ca("ferry test CA");
    let other_ca = ca("some other CA");
    let ca_path = write(dir.path(), "ca.pem", &good_ca.cert.pem());
    let other_ca_path = write(dir.path(), "other-ca.pem", &other_ca.cert.pem());

    let mock = AdvertisedMock::new("readings", 1);
    let tls = stunnel(
        dir.path(),
        "good",
        &server_cert(&good_ca, "localhost"),
        &mock.listener,
    );
    // After bootstrap, clients come back to the terminator, never to the plaintext listener.
    mock.advertise("localhost", tls.port);
    let brokers = format!("localhost:{}", tls.port);

    // 1. The right CA: every reading arrives, read back over TLS by an independent client.
    let ferry = Ferry::start(&config(&brokers, &ca_path));
    let keys: Vec<String> = (0..50).map(|i| format!("tls-{i}")).collect();
    post(&ferry, &keys).await;
    let u = wait_uplink(&ferry, "delivery over TLS", |u| {
        u["acked_total"].as_u64() == Some(50)
    })
    .await;
    assert_eq!(u["state"], "connected", "{u:#}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", &ca_path)
        .set("group.id", "kafka-tls-check")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["readings"]).unwrap();
    let want: BTreeSet<String> = keys.iter().cloned().collect();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = BTreeSet::new();
        let start = Instant::now();
        while seen != want && start.elapsed() < Duration::from_secs(30) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                seen.insert(v["k"].as_str().unwrap_or_default().to_owned());
            }
        }
        seen
    })
    .await
    .unwrap();
    assert_eq!(seen.len(), 50, "read back over TLS: {seen:?}");
    drop(ferry);

    // 2. A CA that did not sign the broker's certificate: nothing is acked, and the status
    //    says which certificate failed against which file.
    let ferry = Ferry::start(&config(&brokers, &other_ca_path));
    post(&ferry, &["wrong-ca".to_owned()]).await;
    // librdkafka says "certificate verify failed" at once; ferry's own handshake then names
    // the certificate and the CA file.
    let u = wait_uplink(&ferry, "wrong CA", |u| {
        u["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not signed by"))
    })
    .await;
    let line = u["last_error"].as_str().unwrap();
    eprintln!("wrong CA: {line}");
    assert!(line.contains("TLS"), "{line}");
    assert!(line.contains("other-ca.pem"), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(u["acked_total"], 0, "{u:#}");
    drop(ferry);

    // 3. The right CA, but a certificate for another name.
    let wrong_name = stunnel(
        dir.path(),
        "wrong-name",
        &server_cert(&good_ca, "kafka.other.example"),
        &mock.listener,
    );
    let ferry = Ferry::start(&config(&format!("localhost:{}", wrong_name.port), &ca_path));
    post(&ferry, &["wrong-name".to_owned()]).await;
    let u = wait_uplink(&ferry, "wrong name", |u| {
        u["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("kafka.other.example"))
    })
    .await;
    let line = u["last_error"].as_str().unwrap();
    eprintln!("wrong name: {line}");
    assert!(line.contains("TLS"), "{line}");
    assert!(line.contains("not \"localhost\""), "{line}");
    assert_eq!(u["acked_total"], 0, "{u:#}");
}
