//! The gateway's MQTT session (gateway/src/mqtt/session/) driven over an in-memory duplex by
//! a client sending arbitrary sequences of structured packets and raw bytes, split into
//! arbitrary write sizes, against a real buffer on tmpfs.
//!
//! Properties (checked in `ferry_gateway::testkit::SessionHarness::run`): the session never
//! panics, always ends (20 s), and every positive PUBACK/PUBREC is for a packet id one of
//! whose publishes is already in the buffer when the ack arrives.

#![no_main]

use ferry_gateway::testkit::{SessionCase, SessionHarness, SessionOp};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[derive(Debug, Arbitrary)]
enum Op {
    Publish {
        qos: u8,
        dup: bool,
        pkid: u8,
        topic: String,
        payload: Vec<u8>,
        content_type: Option<String>,
    },
    PublishRawTopic {
        qos: u8,
        pkid: u8,
        topic: Vec<u8>,
    },
    PubRel(u8),
    PingReq,
    Subscribe(u16, String),
    Unsubscribe(u16, String),
    Disconnect(u8),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    v5: bool,
    client_id: String,
    clean: bool,
    keep_alive: u16,
    will: Option<(String, Vec<u8>)>,
    raw_connect: Option<Vec<u8>>,
    ops: Vec<Op>,
    chunks: Vec<u16>,
    max_inflight: u8,
    max_payload_bytes: u16,
    device_from_topic_level: Option<u8>,
}

fuzz_target!(|input: Input| {
    static HARNESS: OnceLock<SessionHarness> = OnceLock::new();
    let harness = HARNESS.get_or_init(SessionHarness::new);
    let ops = input
        .ops
        .into_iter()
        .take(64)
        .map(|op| match op {
            // Few packet ids, so re-use and QoS 2 duplicates happen.
            Op::Publish {
                qos,
                dup,
                pkid,
                topic,
                payload,
                content_type,
            } => SessionOp::Publish {
                qos: qos % 4,
                dup,
                pkid: u16::from(pkid % 8),
                topic: topic.into_bytes(),
                payload,
                content_type,
            },
            Op::PublishRawTopic { qos, pkid, topic } => SessionOp::Publish {
                qos: qos % 4,
                dup: false,
                pkid: u16::from(pkid % 8),
                topic,
                payload: b"x".to_vec(),
                content_type: None,
            },
            Op::PubRel(p) => SessionOp::PubRel(u16::from(p % 8)),
            Op::PingReq => SessionOp::PingReq,
            Op::Subscribe(p, f) => SessionOp::Subscribe(p, f),
            Op::Unsubscribe(p, f) => SessionOp::Unsubscribe(p, f),
            Op::Disconnect(r) => SessionOp::Disconnect(r),
            Op::Raw(b) => SessionOp::Raw(b),
        })
        .collect();
    let case = SessionCase {
        v5: input.v5,
        client_id: input.client_id,
        clean: input.clean,
        keep_alive: input.keep_alive,
        will: input.will,
        raw_connect: input.raw_connect,
        ops,
        chunks: input.chunks,
        max_inflight: u16::from(input.max_inflight % 16),
        max_payload_bytes: usize::from(input.max_payload_bytes),
        device_from_topic_level: input.device_from_topic_level.map(|l| usize::from(l % 4)),
    };
    harness.run(&case);
});
