//! MQTT load generator: N rumqttc clients publishing JSON telemetry at QoS 0/1, closed loop
//! (as fast as acks allow, with a bounded in-flight window per client) or open loop (a fixed
//! total rate). Prints achieved rate, ack latency percentiles and errors.
//!
//! ```text
//! mqtt-load HOST:PORT [--clients N] [--secs S] [--qos 0|1] [--size BYTES]
//!           [--inflight N] [--rate MSGS_PER_S] [--json]
//! ```
//! Ack latency is measured from the moment rumqttc writes the PUBLISH to the socket
//! (`Outgoing::Publish`) to its PUBACK, so it is the broker's (or ferry's) time to a durable
//! ack plus the loopback round trip.

use ferry_bench::{percentile, telemetry_json};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Args {
    addr: String,
    clients: usize,
    secs: f64,
    qos: u8,
    size: usize,
    inflight: u16,
    rate: Option<f64>,
    json: bool,
}

fn parse() -> Args {
    let mut a = Args {
        addr: String::new(),
        clients: 50,
        secs: 10.0,
        qos: 1,
        size: 100,
        inflight: 64,
        rate: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().expect("flag needs a value");
        match arg.as_str() {
            "--clients" => a.clients = val().parse().expect("clients"),
            "--secs" => a.secs = val().parse().expect("secs"),
            "--qos" => a.qos = val().parse().expect("qos"),
            "--size" => a.size = val().parse().expect("size"),
            "--inflight" => a.inflight = val().parse().expect("inflight"),
            "--rate" => a.rate = Some(val().parse().expect("rate")),
            "--json" => a.json = true,
            s if !s.starts_with("--") => a.addr = s.to_string(),
            s => panic!("unknown flag {s}"),
        }
    }
    assert!(!a.addr.is_empty(), "usage: mqtt-load HOST:PORT [flags]");
    a
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

fn main() {
    let args = parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (lat, elapsed, totals) = rt.block_on(run(args.clone()));
    let mut lat = lat;
    lat.sort_unstable();
    let acked = totals.acked.load(Ordering::Relaxed);
    let rate = acked as f64 / elapsed;
    let ms = |q| percentile(&lat, q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clients": args.clients, "qos": args.qos, "size": args.size,
                "sent": totals.sent.load(Ordering::Relaxed), "acked": acked,
                "errors": totals.errors.load(Ordering::Relaxed),
                "rate": rate, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
            })
        );
    } else {
        println!(
            "{} clients qos{} {}B: {acked} acked in {elapsed:.1} s = {rate:.0} msg/s; ack p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms; errors {}",
            args.clients,
            args.qos,
            args.size,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            totals.errors.load(Ordering::Relaxed)
        );
    }
}

async fn run(args: Args) -> (Vec<u64>, f64, Arc<Totals>) {
    let (host, port) = args.addr.rsplit_once(':').expect("HOST:PORT");
    let port: u16 = port.parse().expect("port");
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let per_client_rate = args.rate.map(|r| r / args.clients as f64);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..args.clients {
        let mut opts = MqttOptions::new(format!("load-{c}-{}", std::process::id()), host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(args.inflight);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, args.inflight as usize * 2);
        let stop_p = stop.clone();
        let totals_p = totals.clone();
        let size = args.size;
        // Publisher: as fast as the client's request queue takes them, or paced.
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick =
                per_client_rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
            let topic = format!("sensors/sensor-{c:04}/env");
            while !stop_p.load(Ordering::Relaxed) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                seq += 1;
                let payload = telemetry_json(c, seq, size);
                if client.publish(&topic, qos, false, payload).await.is_err() {
                    totals_p.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                totals_p.sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client.disconnect().await;
        });
        let stop_e = stop.clone();
        let totals_e = totals.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent_at: HashMap<u16, Instant> = HashMap::new();
            let mut lat = Vec::new();
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if qos == QoS::AtMostOnce {
                            totals_e.acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            sent_at.insert(pkid, Instant::now());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(t) = sent_at.remove(&ack.pkid)
                            && !stop_e.load(Ordering::Relaxed)
                        {
                            lat.push(t.elapsed().as_micros() as u64);
                            totals_e.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        if !stop_e.load(Ordering::Relaxed) {
                            eprintln!("client {c}: {e}");
                            totals_e.errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        } else {
                            break;
                        }
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_secs(5), t).await {
            lat.extend(l);
        }
    }
    (lat, elapsed, totals)
}
