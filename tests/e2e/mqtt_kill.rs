//! Kill test: every PUBACKed reading is in the buffer after SIGKILL.
//!
//! A rumqttc QoS 1 publisher sends unique payloads as fast as acks allow; each PUBACK is
//! matched to its payload (rumqttc sends publishes in request order, and the outgoing event
//! carries the packet id). ferry is SIGKILLed mid-stream, then the buffer is read with the
//! buffer crate: every acknowledged payload must be there. ferry is then restarted on the same
//! data directory and stopped cleanly, and the check is repeated.

use ferry_tests::{Ferry, buffered_readings};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn every_puback_is_on_disk_after_sigkill() {
    let mut f = Ferry::start("");
    let addr = f.addr("mqtt");
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let acked2 = acked.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let publisher = rt.spawn(async move {
        let mut opts = MqttOptions::new("killer", addr.ip().to_string(), addr.port());
        opts.set_inflight(32);
        let (client, mut el) = AsyncClient::new(opts, 64);
        let queued: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let q2 = queued.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let p = format!("kill-{i}");
                q2.lock().unwrap().push_back(p.clone());
                if client
                    .publish("kill/t", QoS::AtLeastOnce, false, p)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut by_pkid: HashMap<u16, String> = HashMap::new();
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let p = queued.lock().unwrap().pop_front().expect("queued payload");
                    by_pkid.insert(pkid, p);
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let p = by_pkid.remove(&a.pkid).expect("ack for a sent publish");
                    acked2.lock().unwrap().insert(p);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    // Let it run until a good number of acks, then kill mid-stream.
    let t0 = std::time::Instant::now();
    while acked.lock().unwrap().len() < 500 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    f.kill();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    });
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 500,
        "only {} acks before the kill",
        acked.len()
    );

    let check = |f: &Ferry| {
        let stored: HashSet<String> = buffered_readings(&f.data_dir, "kafka")
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect();
        let missing: Vec<_> = acked.iter().filter(|p| !stored.contains(*p)).collect();
        assert!(
            missing.is_empty(),
            "{} of {} PUBACKed readings are missing, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
        stored.len()
    };
    let stored = check(&f);
    eprintln!("{} PUBACKed, {stored} stored at the kill", acked.len());
    f.restart();
    f.terminate(Duration::from_secs(10))
        .expect("clean exit after restart");
    assert_eq!(check(&f), stored);
}
