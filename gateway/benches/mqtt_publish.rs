//! Criterion micro-benchmark of the MQTT session's publish path: a v3.1.1 client over an
//! in-memory `tokio::io::duplex` (as in the session unit tests, no socket) sends a window of
//! QoS 1 PUBLISHes and reads their PUBACKs, through the real session state machine and a real
//! buffer (`flush_interval_ms = 1`, no compression, on a temporary directory, fsync included).
//! QoS 0 is measured too: the same path without the wait for the commit.
//! Run with `cargo bench -p ferry-gateway --bench mqtt_publish`.

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_buffer::{Buffer, BufferOptions, Compression};
use ferry_config::MqttSettings;
use ferry_gateway::mqtt::Ctx;
use ferry_gateway::testkit::mqtt_serve;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4 as c4;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

/// Publishes in flight per round (the default `mqtt.max_inflight`).
const WINDOW: u16 = 64;

struct Conn {
    io: DuplexStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(ctx: &Arc<Ctx>, stop: &CancellationToken) -> Conn {
        let (a, b) = tokio::io::duplex(1 << 20);
        let deadline = TokioInstant::now() + Duration::from_secs(10);
        tokio::spawn(mqtt_serve(
            ctx.clone(),
            b,
            "127.0.0.1:1".parse().expect("addr"),
            None,
            deadline,
            stop.clone(),
        ));
        let mut c = Conn {
            io: a,
            buf: BytesMut::new(),
        };
        c.send(&[c4::Packet::Connect(c4::Connect::new("bench-1"))])
            .await;
        match c.recv().await {
            c4::Packet::ConnAck(a) => assert_eq!(a.code, c4::ConnectReturnCode::Success),
            p => panic!("expected CONNACK, got {p:?}"),
        }
        c
    }

    async fn send(&mut self, ps: &[c4::Packet]) {
        let mut out = BytesMut::new();
        for p in ps {
            p.write(&mut out, 1 << 24).expect("encode");
        }
        self.io.write_all(&out).await.expect("write");
    }

    async fn recv(&mut self) -> c4::Packet {
        loop {
            match c4::Packet::read(&mut self.buf, 1 << 24) {
                Ok(p) => return p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    self.buf.reserve(4096);
                    let n = self.io.read_buf(&mut self.buf).await.expect("read");
                    assert!(n > 0, "session closed");
                }
                Err(e) => panic!("bad packet from the session: {e:?}"),
            }
        }
    }
}

fn publishes(qos: QoS) -> Vec<c4::Packet> {
    (1..=WINDOW)
        .map(|pkid| {
            let payload = format!(
                "{{\"device\":\"sensor-0001\",\"ts\":{},\"temp\":21.{pkid},\"hum\":40.5,\"seq\":{pkid}}}",
                1_763_000_000_000u64 + pkid as u64
            );
            let mut p = c4::Publish::new("sensors/sensor-0001/env", qos, payload);
            p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
            c4::Packet::Publish(p)
        })
        .collect()
}

fn publish_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let buffer = Buffer::open(
        dir.path(),
        BufferOptions {
            consumers: vec!["kafka".into()],
            max_bytes: 8 << 30,
            flush_interval: Duration::from_millis(1),
            compression: Compression::None,
            ..BufferOptions::default()
        },
    )
    .expect("open buffer");
    let ctx = Arc::new(Ctx::new(MqttSettings::default(), buffer.clone(), false).expect("ctx"));
    let stop = CancellationToken::new();
    let mut conn = rt.block_on(Conn::open(&ctx, &stop));

    let mut g = c.benchmark_group("mqtt_session_publish");
    g.throughput(Throughput::Elements(WINDOW as u64));
    let qos1 = publishes(QoS::AtLeastOnce);
    g.bench_function("qos1_window_64_to_pubacks", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    conn.send(&qos1).await;
                    for _ in 0..WINDOW {
                        match conn.recv().await {
                            c4::Packet::PubAck(_) => {}
                            p => panic!("expected PUBACK, got {p:?}"),
                        }
                    }
                });
            }
            start.elapsed()
        })
    });
    // QoS 0 has no ack: a PINGREQ after the window returns once the session has framed and
    // handed on every publish before it.
    let mut qos0 = publishes(QoS::AtMostOnce);
    qos0.push(c4::Packet::PingReq);
    g.bench_function("qos0_window_64_then_ping", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    conn.send(&qos0).await;
                    match conn.recv().await {
                        c4::Packet::PingResp => {}
                        p => panic!("expected PINGRESP, got {p:?}"),
                    }
                });
            }
            start.elapsed()
        })
    });
    g.finish();
    stop.cancel();
    rt.block_on(buffer.close());
}

criterion_group!(benches, publish_path);
criterion_main!(benches);
