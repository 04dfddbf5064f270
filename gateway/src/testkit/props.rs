//! Property tests of the HTTP batch parsers and the MQTT session, the stable-toolchain twins of
//! the `http_body` and `mqtt_session` fuzz targets (fuzz/fuzz_targets/). The properties live in
//! [`super`] (`ferry_gateway::testkit`), shared with the fuzz targets; these tests feed them generated
//! inputs shaped like real traffic, plus the crashing inputs fuzzing found.

use super::{SessionCase, SessionHarness, SessionOp, http_body, json_vs_ndjson};
use crate::http::formats::BatchFormat;
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        "\\PC{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(("[a-z]{1,3}", inner), 0..3).prop_map(|v| {
                let fields: Vec<String> =
                    v.into_iter().map(|(k, x)| format!("{k:?}:{x}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// One batch item or SenML record as JSON text: mostly well-formed, sometimes not.
fn item() -> impl Strategy<Value = String> {
    let topic = prop_oneof![
        "[a-z]{1,4}(/[a-z0-9]{1,4}){0,2}",
        "\\PC{0,6}",
        Just("a/+/b".to_string())
    ];
    let ts = prop_oneof![
        Just(None),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        Just(Some("\"2024-02-29T12:00:00Z\"".to_string())),
        Just(Some("\"1960-01-01T00:00:00Z\"".to_string())),
        "\\PC{0,6}".prop_map(|s| Some(serde_json::to_string(&s).unwrap())),
    ];
    let device = prop_oneof![
        Just(None),
        Just(Some("dev-1")),
        Just(Some("")),
        Just(Some("a\u{7}"))
    ];
    let senml_key = prop::sample::select(vec![
        "bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut", "x_",
    ]);
    prop_oneof![
        (topic, json_value(), ts, device).prop_map(|(t, p, ts, d)| {
            let mut s = format!(
                "{{\"topic\":{},\"payload\":{p}",
                serde_json::to_string(&t).unwrap()
            );
            if let Some(ts) = ts {
                s.push_str(&format!(",\"ts\":{ts}"));
            }
            if let Some(d) = d {
                s.push_str(&format!(
                    ",\"device\":{}",
                    serde_json::to_string(d).unwrap()
                ));
            }
            s.push('}');
            s
        }),
        proptest::collection::vec((senml_key, json_value()), 0..5).prop_map(|fields| {
            let f: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("{k:?}:{v}"))
                .collect();
            format!("{{{}}}", f.join(","))
        }),
        json_value(),
    ]
}

fn format() -> impl Strategy<Value = BatchFormat> {
    prop::sample::select(vec![
        BatchFormat::JsonArray,
        BatchFormat::Ndjson,
        BatchFormat::Senml,
    ])
}

fn session_op() -> impl Strategy<Value = SessionOp> {
    let topic = prop_oneof![
        "[a-z]{1,3}(/[a-z0-9]{1,3}){0,2}".prop_map(String::into_bytes),
        Just(b"a/#".to_vec()),
        Just(Vec::new()),
        Just(vec![0xff, 0xfe]),
    ];
    prop_oneof![
        6 => (0u8..4, any::<bool>(), 0u16..6, topic, proptest::collection::vec(any::<u8>(), 0..40),
              proptest::option::of("[a-z/]{0,8}"))
            .prop_map(|(qos, dup, pkid, topic, payload, content_type)| SessionOp::Publish {
                qos, dup, pkid, topic, payload, content_type,
            }),
        2 => (0u16..6).prop_map(SessionOp::PubRel),
        1 => Just(SessionOp::PingReq),
        1 => (any::<u16>(), "[a-z/#+]{0,6}").prop_map(|(p, f)| SessionOp::Subscribe(p, f)),
        1 => (any::<u16>(), "[a-z/#+]{0,6}").prop_map(|(p, f)| SessionOp::Unsubscribe(p, f)),
        1 => prop::sample::select(vec![0u8, 4, 0x81]).prop_map(SessionOp::Disconnect),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(SessionOp::Raw),
    ]
}

fn session_case() -> impl Strategy<Value = SessionCase> {
    (
        any::<bool>(),
        prop_oneof![Just(String::new()), "[a-z0-9]{1,8}"],
        any::<bool>(),
        prop_oneof![Just(0u16), Just(60u16)],
        proptest::option::of(("[a-z/]{0,6}", proptest::collection::vec(any::<u8>(), 0..8))),
        proptest::collection::vec(session_op(), 0..24),
        proptest::collection::vec(1u16..64, 0..4),
        0u16..6,
        prop_oneof![Just(16usize), Just(4096usize)],
        proptest::option::of(0usize..3),
    )
        .prop_map(
            |(
                v5,
                client_id,
                clean,
                keep_alive,
                will,
                ops,
                chunks,
                max_inflight,
                max_payload_bytes,
                level,
            )| {
                SessionCase {
                    v5,
                    client_id,
                    clean,
                    keep_alive,
                    will,
                    raw_connect: None,
                    ops,
                    chunks,
                    max_inflight,
                    max_payload_bytes,
                    device_from_topic_level: level,
                }
            },
        )
}

/// `n` cases, or `PROPTEST_CASES` when set (for long runs, see bench/fuzz.sh).
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig::with_cases(n)
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn http_batches_parse_or_fail_cleanly(
        f in format(),
        items in proptest::collection::vec(item(), 0..6),
        ndjson_sep in prop::sample::select(vec!["\n", "\r\n", "\n\n", " "]),
        max in prop::sample::select(vec![1usize, 3, 1000]),
        bound in proptest::option::of(Just("dev-1")),
        header in proptest::option::of(prop::sample::select(vec!["dev-1", "dev-2", ""])),
    ) {
        let body = match f {
            BatchFormat::Ndjson => items.join(ndjson_sep),
            _ => format!("[{}]", items.join(",")),
        };
        http_body(f, body.as_bytes(), max, bound, header);
        json_vs_ndjson(&items, max);
    }

    #[test]
    fn http_arbitrary_bytes(f in format(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        http_body(f, &body, 1000, None, None);
    }
}

proptest! {
    #![proptest_config(cases(200))]

    #[test]
    fn mqtt_session_acks_only_stored_publishes(case in session_case()) {
        thread_local!(static HARNESS: SessionHarness = SessionHarness::new());
        HARNESS.with(|h| h.run(&case));
    }
}

/// The generator reaches the interesting states: a connected client whose QoS 1/2
/// publishes are acknowledged after they are stored.
#[test]
fn mqtt_session_harness_sees_acks() {
    let h = SessionHarness::new();
    for v5 in [false, true] {
        let publish = |qos, pkid| SessionOp::Publish {
            qos,
            dup: false,
            pkid,
            topic: b"sensors/a/t".to_vec(),
            payload: vec![pkid as u8],
            content_type: None,
        };
        let out = h.run(&SessionCase {
            v5,
            client_id: "c".into(),
            clean: true,
            keep_alive: 0,
            will: None,
            raw_connect: None,
            ops: vec![
                publish(1, 1),
                publish(2, 2),
                publish(0, 0),
                SessionOp::PubRel(2),
            ],
            chunks: vec![3],
            max_inflight: 1,
            max_payload_bytes: 1024,
            device_from_topic_level: Some(1),
        });
        assert!(out.connected, "v5={v5}: {out:?}");
        assert_eq!(out.acks, 2, "v5={v5}: {out:?}");
        assert_eq!(out.stored, 3, "v5={v5}: {out:?}");
    }
}

/// Found by `http_batches_parse_or_fail_cleanly` (a JSON-array-vs-NDJSON comparison through
/// re-serialized values): without serde_json's `float_roundtrip` feature some numbers were
/// parsed 1 ULP off (found by the `http_batches` proptest), so the stored payload differed
/// from what the device sent. The workspace enables `float_roundtrip`.
#[test]
fn json_payload_numbers_are_stored_exactly() {
    let origin = crate::http::formats::Origin {
        principal: Default::default(),
        header_device: None,
        now_ms: 0,
    };
    let body = br#"[{"topic":"t","payload":2.7784367327772994e-219}]"#;
    let r = crate::http::formats::parse_json_array(body, &origin, 1).unwrap();
    assert_eq!(&r[0].payload[..], b"2.7784367327772994e-219");
}
