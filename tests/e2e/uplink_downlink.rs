//! Commands from the cloud to local devices, through the real binary: Debian's mosquitto as
//! the upstream broker (the cloud publishes with `mosquitto_pub`) or librdkafka's mock cluster
//! (the cloud produces with `kcat`), and `mosquitto_sub` as the local device on ferry's own
//! listener. Topics rewritten, retained commands, MQTT 5 properties kept, refusals counted
//! and skipped, no echo back up, nothing lost when ferry is SIGKILLed while commands come
//! down, Kafka records for another gateway skipped and offsets kept across a crash.

use crate::support::{mosquitto as mosq, rt, sub_lines, wait_status};
use ferry_tests::{Ferry, buffered_readings, mosquitto, require_tool};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Waits until the uplink `name` says its downlink is subscribed; returns the report.
fn ready(f: &Ferry, name: &str) -> Value {
    rt().block_on(wait_status(
        &f.http_url(),
        None,
        "the downlink is subscribed",
        // The mock cluster assigns a restarted consumer's partitions after its old member's
        // session timed out (10 s).
        Duration::from_secs(45),
        |v| uplink(v, name)["downlink"]["ready"] == true,
    ))
}

fn uplink<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["uplinks"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until `f`'s status report satisfies `what`.
fn until(f: &Ferry, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    rt().block_on(wait_status(
        &f.http_url(),
        None,
        what,
        Duration::from_secs(30),
        check,
    ))
}

/// `mosquitto_sub` as a local device on ferry, printing one JSON object per message, until it
/// has `count` messages or `secs` passed; started before the commands, read with [`lines`].
fn device(f: &Ferry, args: &[&str], count: usize, secs: u32) -> Child {
    let port = f.addr("mqtt").port().to_string();
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-F", "%j", "-q", "1"])
        .args(["-C", &count.to_string(), "-W", &secs.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub")
}

/// What a [`device`] printed, once it exited.
fn lines(child: Child) -> Vec<Value> {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the client `id` is subscribed on ferry.
fn subscribed(f: &Ferry, id: &str) {
    until(f, &format!("{id} is subscribed"), |v| {
        v["mqtt"]["subscribers"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["client"] == id && s["online"] == true))
    });
}

#[test]
fn mqtt_commands_reach_devices_rewritten_retained_with_properties_and_never_echo() {
    let test = "mqtt_commands_reach_devices_rewritten_retained_with_properties_and_never_echo";
    if !require_tool("mosquitto", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let cloud = mosquitto();
    let up = cloud.port;
    // Set before ferry ever connects: comes down when ferry subscribes, retained.
    mosq(
        "mosquitto_pub",
        up,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-r",
            "-t",
            "cmd/site-7/valve/mode",
            "-m",
            "auto",
        ],
    );
    // What ferry sends up: a command would show here under up/ if it were a reading.
    let upstream = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &up.to_string(), "-t", "up/#", "-v"])
        .args(["-W", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut f = Ferry::start(&format!(
        r##"
[mqtt]
max_payload_bytes = 1024

[[mqtt.users]]
username = "dev"
password = "pw"

[[mqtt.acl]]
user = "dev"
publish = ["#"]
subscribe = ["#"]

[[mqtt.acl]]
user = "uplink:cloud"
publish = ["cmd/#"]

[uplinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{up}"
protocol = "v5"
topic_prefix = "up/"
initial_backoff_ms = 50
max_backoff_ms = 400

[[uplinks.cloud.downlink]]
remote = "cmd/site-7/#"
local = "cmd/{{#}}"

[[uplinks.cloud.downlink]]
remote = "cfg/site-7/#"
local = "cfg/{{#}}"
"##
    ));
    ready(&f, "cloud");
    // The retained command set before ferry connected is retained locally too.
    until(&f, "the retained command is kept", |v| {
        v["mqtt"]["retained"].as_u64() == Some(1)
    });
    let login = ["-u", "dev", "-P", "pw", "-V", "mqttv5"];
    let dev = device(
        &f,
        &[&login[..], &["-i", "dev-1", "-t", "cmd/#"]].concat(),
        3,
        15,
    );
    subscribed(&f, "dev-1");

    let publish = |args: &[&str]| {
        mosq(
            "mosquitto_pub",
            up,
            &[&["-V", "mqttv5", "-q", "1"], args].concat(),
        )
    };
    // A command with MQTT 5 properties; one too large; one the ACL forbids; one retained.
    publish(&[
        "-t",
        "cmd/site-7/pump-1/set",
        "-m",
        "on",
        "-D",
        "publish",
        "user-property",
        "trace",
        "t1",
        "-D",
        "publish",
        "content-type",
        "text/plain",
        "-D",
        "publish",
        "correlation-data",
        "c-42",
    ]);
    publish(&["-t", "cmd/site-7/pump-1/set", "-m", &"x".repeat(2000)]);
    publish(&["-t", "cfg/site-7/pump-1", "-m", "forbidden"]);
    publish(&["-r", "-t", "cmd/site-7/pump-2/set", "-m", "off"]);
    // A device reading goes up as usual.
    mosq(
        "mosquitto_pub",
        f.addr("mqtt").port(),
        &[
            "-u",
            "dev",
            "-P",
            "pw",
            "-q",
            "1",
            "-t",
            "sensors/pump-1/temp",
            "-m",
            "21.5",
        ],
    );

    let got = lines(dev);
    let summary: Vec<(String, String, u64)> = got
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_owned(),
                m["payload"].as_str().unwrap_or_default().to_owned(),
                m["retain"].as_u64().unwrap(),
            )
        })
        .collect();
    // The subscriber got the retained one at its SUBSCRIBE, then the two it may have, with the
    // topic rewritten: nothing too large, nothing forbidden.
    assert_eq!(
        summary,
        [
            ("cmd/valve/mode".into(), "auto".into(), 1),
            ("cmd/pump-1/set".into(), "on".into(), 0),
            ("cmd/pump-2/set".into(), "off".into(), 0),
        ],
        "{got:?}"
    );
    let props = &got[1]["properties"];
    assert_eq!(props["user-properties"]["trace"], "t1", "{got:?}");
    assert_eq!(props["content-type"], "text/plain");
    assert_eq!(props["correlation-data"], "c-42");

    // Both retained commands are kept locally: a late subscriber gets them.
    let late = mosq(
        "mosquitto_sub",
        f.addr("mqtt").port(),
        &[
            "-u", "dev", "-P", "pw", "-t", "cmd/#", "-C", "2", "-W", "5", "-F", "%t %p %r",
        ],
    );
    let late: BTreeSet<String> = String::from_utf8_lossy(&late.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        late,
        BTreeSet::from([
            "cmd/pump-2/set off 1".into(),
            "cmd/valve/mode auto 1".into()
        ]),
    );

    let v = until(&f, "every command is settled", |v| {
        uplink(v, "cloud")["downlink"]["received_total"].as_u64() == Some(5)
    });
    let d = &uplink(&v, "cloud")["downlink"];
    assert_eq!(d["handed_over_total"], 3, "{d}");
    assert_eq!(d["refused"]["too_large"], 1, "{d}");
    assert_eq!(d["refused"]["forbidden"], 1, "{d}");
    assert!(d["last_command_ms"].as_u64().is_some(), "{d}");
    let metrics = rt()
        .block_on(crate::support::get(
            &format!("{}/metrics", f.http_url()),
            None,
        ))
        .1;
    assert!(
        metrics.contains("ferry_downlink_refused_total{uplink=\"cloud\",reason=\"forbidden\"} 1"),
        "{metrics}"
    );
    let log = f.log();
    assert!(
        log.contains("A command from the cloud is refused and skipped"),
        "{log}"
    );

    // No echo: the uplink takes every topic, yet only the device's reading went up, and
    // the buffer holds no command.
    f.terminate(Duration::from_secs(15)).expect("clean exit");
    let sent = upstream.wait_with_output().unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout);
    assert_eq!(
        sent.trim(),
        "up/sensors/pump-1/temp 21.5",
        "sent up: {sent}"
    );
    let stored: Vec<String> = buffered_readings(&f.data_dir, "cloud")
        .into_iter()
        .map(|r| r.topic)
        .collect();
    assert!(stored.iter().all(|t| !t.starts_with("cmd/")), "{stored:?}");
    // The refused ones were acknowledged upstream: a new session of ferry's client id gets
    // nothing again.
    let again = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &up.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args([
            "-c",
            "-i",
            "ferry-test-gw-cloud",
            "-x",
            "60",
            "-t",
            "cmd/site-7/#",
            "-R",
        ])
        .args(["-W", "2", "-v"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "",
        "nothing was left unacknowledged"
    );
}

#[test]
fn mqtt_commands_survive_sigkill_while_they_come_down() {
    let test = "mqtt_commands_survive_sigkill_while_they_come_down";
    if !require_tool("mosquitto", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    // Within mosquitto's default queue of 1000 messages for a client that is away.
    const N: usize = 500;
    let cloud = mosquitto();
    let up = cloud.port;
    let mut f = Ferry::start(&format!(
        r#"
[mqtt]
subscriber_queue_messages = 1000

[uplinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{up}"
initial_backoff_ms = 50
max_backoff_ms = 400

[[uplinks.cloud.downlink]]
remote = "cmd/site-7/#"
local = "cmd/{{#}}"
"#
    ));
    ready(&f, "cloud");
    // The device has a persistent session and is away: each command's hand-over is the
    // commit of its queue entry.
    mosq(
        "mosquitto_sub",
        f.addr("mqtt").port(),
        &["-c", "-i", "dev-1", "-q", "1", "-t", "cmd/#", "-W", "1"],
    );
    // The cloud sends N commands at QoS 1 (3.1.1); ferry is SIGKILLed while they come down.
    let mut cloud_pub = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &up.to_string(), "-q", "1"])
        .args(["-t", "cmd/site-7/pump/set", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cloud_pub.stdin.take().unwrap();
    let body: String = (0..N).map(|i| format!("c{i}\n")).collect();
    stdin.write_all(body.as_bytes()).unwrap();
    drop(stdin);
    let start = Instant::now();
    let mut killed_at = None;
    while start.elapsed() < Duration::from_secs(30) {
        let v = rt().block_on(crate::support::status(&f.http_url()));
        let n = uplink(&v, "cloud")["downlink"]["handed_over_total"]
            .as_u64()
            .unwrap_or(0);
        if n >= 50 {
            f.kill();
            killed_at = Some(n);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed_at = killed_at.expect("commands came down");
    assert!(cloud_pub.wait().unwrap().success());
    f.restart();
    // Every command reaches the device once it is back, at least once.
    let port = f.addr("mqtt").port();
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < N && Instant::now() < deadline {
        for l in sub_lines_session(port, N) {
            got.insert(l);
        }
    }
    let missing: Vec<usize> = (0..N).filter(|i| !got.contains(&format!("c{i}"))).collect();
    assert!(
        missing.is_empty(),
        "killed after {killed_at} hand-overs; {} commands never arrived, e.g. {:?}; log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        f.log()
    );
}

#[test]
fn a_burst_of_commands_reaches_a_device_whole_and_in_order() {
    let test = "a_burst_of_commands_reaches_a_device_whole_and_in_order";
    if !require_tool("mosquitto", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    const N: usize = 800;
    let cloud = mosquitto();
    let up = cloud.port;
    // A queue of 10 messages per subscriber: far less than the burst, and than what the cloud
    // broker sends before it waits for PUBACKs. Commands wait for room instead of being
    // dropped after their ack; and whatever each needs, they arrive in order.
    let f = Ferry::start(&format!(
        r#"
[mqtt]
subscriber_queue_messages = 10

[uplinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{up}"

[[uplinks.cloud.downlink]]
remote = "cmd/#"
"#
    ));
    ready(&f, "cloud");
    let dev = device(&f, &["-i", "dev-1", "-t", "cmd/#"], N, 60);
    subscribed(&f, "dev-1");
    let mut cloud_pub = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &up.to_string(), "-q", "1"])
        .args(["-t", "cmd/pump/set", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let body: String = (0..N).map(|i| format!("{i}\n")).collect();
    let mut stdin = cloud_pub.stdin.take().unwrap();
    stdin.write_all(body.as_bytes()).unwrap();
    drop(stdin);
    assert!(cloud_pub.wait().unwrap().success());
    let got: Vec<usize> = lines(dev)
        .iter()
        .map(|m| m["payload"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "log:\n{}", f.log());
    let v = rt().block_on(crate::support::status(&f.http_url()));
    assert_eq!(v["mqtt"]["subscriber_drops"], serde_json::json!({}), "{v}");
}

/// Connects as the persistent device `dev-1` and takes what is queued for it.
fn sub_lines_session(port: u16, max: usize) -> Vec<String> {
    let out = mosq(
        "mosquitto_sub",
        port,
        &[
            "-c",
            "-i",
            "dev-1",
            "-q",
            "1",
            "-t",
            "cmd/#",
            "-C",
            &max.to_string(),
            "-W",
            "3",
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kafka_commands_reach_this_gateway_only_and_offsets_survive_a_crash() {
    let test = "kafka_commands_reach_this_gateway_only_and_offsets_survive_a_crash";
    if !require_tool("kcat", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let mock: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
        rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("ferry.commands", 1, 1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let mut f = Ferry::start(&format!(
        r#"
[gateway]
id = "gw-a"

[uplinks.kafka]
type = "kafka"
brokers = "{bootstrap}"
topic = "readings"

[uplinks.kafka.downlink]
topic = "ferry.commands"
"#
    ));
    ready(&f, "kafka");
    // A new group starts at the end of the topic once librdkafka has looked it up, just
    // after the assignment.
    std::thread::sleep(Duration::from_secs(1));
    // The device keeps a persistent session: a command handed over again would be queued
    // for it even while it is away.
    let sub = [
        "-V", "mqttv5", "-c", "-i", "dev-a", "-q", "1", "-t", "cmd/#",
    ];
    mosq(
        "mosquitto_sub",
        f.addr("mqtt").port(),
        &[&sub[..], &["-W", "1"]].concat(),
    );
    let produce = |headers: &[&str], payload: &str| {
        let mut args = vec!["-P", "-b", bootstrap.as_str(), "-t", "ferry.commands"];
        for h in headers {
            args.extend(["-H", h]);
        }
        let mut k = Command::new("kcat")
            .args(&args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        k.stdin
            .take()
            .unwrap()
            .write_all(format!("{payload}\n").as_bytes())
            .unwrap();
        let out = k.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kcat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    produce(
        &[
            "ferry-gateway=gw-a",
            "ferry-topic=cmd/pump-1/set",
            "trace=t1",
        ],
        "on",
    );
    produce(
        &["ferry-gateway=gw-b", "ferry-topic=cmd/pump-1/set"],
        "for-b",
    );
    produce(&["ferry-topic=cmd/all/reboot"], "all");
    produce(&["ferry-gateway=gw-a"], "no-topic");
    produce(
        &[
            "ferry-gateway=gw-a",
            "ferry-topic=state/pump-1/mode",
            "ferry-retain=1",
        ],
        "eco",
    );
    let v = until(&f, "the five records are read", |v| {
        let d = &uplink(v, "kafka")["downlink"];
        d["received_total"].as_u64() == Some(4) && d["other_gateways_total"].as_u64() == Some(1)
    });
    let d = &uplink(&v, "kafka")["downlink"];
    assert_eq!(d["handed_over_total"], 3, "{d}");
    assert_eq!(d["refused"]["no_topic"], 1, "{d}");
    assert_eq!(v["mqtt"]["retained"], 1, "ferry-retain keeps it");
    let retained = sub_lines(
        f.addr("mqtt").port(),
        "mqttv311",
        "state/#",
        1,
        3,
        "%t %p %r",
    );
    assert_eq!(retained, ["state/pump-1/mode eco 1"]);

    let take = |port: u16| {
        let out = mosq(
            "mosquitto_sub",
            port,
            &[&sub[..], &["-F", "%j", "-W", "3"]].concat(),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let got = take(f.addr("mqtt").port());
    let payloads: Vec<&str> = got.iter().map(|m| m["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["on", "all"], "{got:?}");
    let props = &got[0]["properties"]["user-properties"];
    assert_eq!(props["trace"], "t1", "{got:?}");
    assert_eq!(props["ferry-command-id"], "ferry.commands/0/0", "{got:?}");
    assert_eq!(got[1]["topic"], "cmd/all/reboot");

    // The offsets are committed within a second: after a SIGKILL, nothing handed over
    // comes down again, and what was produced meanwhile does.
    std::thread::sleep(Duration::from_secs(3));
    f.kill();
    produce(
        &["ferry-gateway=gw-a", "ferry-topic=cmd/pump-1/set"],
        "after",
    );
    f.restart();
    ready(&f, "kafka");
    until(&f, "the new command is handed over", |v| {
        uplink(v, "kafka")["downlink"]["handed_over_total"].as_u64() >= Some(1)
    });
    let got = take(f.addr("mqtt").port());
    let payloads: Vec<&str> = got.iter().map(|m| m["payload"].as_str().unwrap()).collect();
    assert_eq!(
        payloads,
        ["after"],
        "handed over again after the crash: {got:?}"
    );
}
