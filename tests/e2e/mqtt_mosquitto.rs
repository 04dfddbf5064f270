//! Debian's `mosquitto_pub` as an independent client: MQTT 3.1.1 and 5, QoS 1 and 2, and TLS
//! (server certificate from a test CA made with rcgen; mutual TLS with the device id taken
//! from the client certificate's CN).

use ferry_tests::{Ferry, buffered_readings, require_tool};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn pub_(args: &[&str]) {
    let out = Command::new("mosquitto_pub").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mosquitto_pub_v311_and_v5_qos1_and_qos2() {
    if !require_tool("mosquitto_pub", "mosquitto_pub_v311_and_v5_qos1_and_qos2") {
        return;
    }
    let mut f = Ferry::start("");
    let port = f.addr("mqtt").port().to_string();
    for v in ["mqttv311", "mqttv5"] {
        for q in ["1", "2"] {
            let msg = format!("mosq-{v}-q{q}");
            let id = format!("mosq-{v}-{q}");
            pub_(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                v,
                "-q",
                q,
                "-i",
                &id,
                "-t",
                "m/t",
                "-m",
                &msg,
            ]);
        }
    }
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let got: Vec<String> = buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    for v in ["mqttv311", "mqttv5"] {
        for q in ["1", "2"] {
            let msg = format!("mosq-{v}-q{q}");
            assert_eq!(
                got.iter().filter(|g| **g == msg).count(),
                1,
                "{msg} in {got:?}"
            );
        }
    }
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "ferry test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let server = p.signed_by(&key, &ca, &ca_key).unwrap();
    let ckey = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "cert-dev-7");
    let client = p.signed_by(&ckey, &ca, &ca_key).unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: key.serialize_pem(),
        client_cert: client.pem(),
        client_key: ckey.serialize_pem(),
    }
}

fn write(dir: &Path, name: &str, s: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    if name.ends_with(".key") {
        // ferry refuses private keys other users can read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p.display().to_string()
}

#[test]
fn mosquitto_pub_over_tls_and_mutual_tls() {
    if !require_tool("mosquitto_pub", "mosquitto_pub_over_tls_and_mutual_tls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = pki();
    let ca = write(dir.path(), "ca.pem", &k.ca);
    let cert = write(dir.path(), "server.pem", &k.server_cert);
    let key = write(dir.path(), "server.key", &k.server_key);
    let ccert = write(dir.path(), "client.pem", &k.client_cert);
    let ckey = write(dir.path(), "client.key", &k.client_key);

    // Server TLS only.
    let mut f = Ferry::start(&format!(
        "[mqtt.tls]\nlisten = \"127.0.0.1:0\"\ncert_path = \"{cert}\"\nkey_path = \"{key}\"\n"
    ));
    let port = f.addr("mqtts").port().to_string();
    for v in ["mqttv311", "mqttv5"] {
        pub_(&[
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-V",
            v,
            "-q",
            "1",
            "-i",
            "tls-dev",
            "-t",
            "tls/t",
            "-m",
            v,
        ]);
    }
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let got = buffered_readings(&f.data_dir, "kafka");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|r| r.device == "tls-dev"));

    // Mutual TLS, device id from the certificate CN.
    let mut f = Ferry::start(&format!(
        "[mqtt.tls]\nlisten = \"127.0.0.1:0\"\ncert_path = \"{cert}\"\nkey_path = \"{key}\"\n\
         client_ca_path = \"{ca}\"\nrequire_client_cert = true\ndevice_from_cert_cn = true\n"
    ));
    let port = f.addr("mqtts").port().to_string();
    pub_(&[
        "-h",
        "localhost",
        "-p",
        &port,
        "--cafile",
        &ca,
        "--cert",
        &ccert,
        "--key",
        &ckey,
        "-q",
        "2",
        "-i",
        "whatever",
        "-t",
        "mtls/t",
        "-m",
        "mtls",
    ]);
    // Without a client certificate the handshake fails.
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-q",
            "1",
            "-t",
            "x",
            "-m",
            "no",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let got = buffered_readings(&f.data_dir, "kafka");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].device, "cert-dev-7");
    assert_eq!(&got[0].payload[..], b"mtls");
}
