//! What every uplink says about a reading besides its payload: the `ferry-*` fields and the
//! JSON envelope. Each uplink carries them in its own way (Kafka headers, MQTT v5 user
//! properties, the envelope where there are no headers), but the fields and their values are
//! defined here, once.
//!
//! | field | value |
//! |---|---|
//! | the device's own MQTT v5 user properties | first, in the order it sent them |
//! | `ferry-id` | `<gateway id>-<reading id>`, stable across re-sends: de-duplicate on it (a reading imported from another gateway's export keeps that gateway's: [`ferry_buffer::Origin`]) |
//! | `ferry-device` | the device id |
//! | `ferry-topic` | the source topic (MQTT topic or HTTP path topic) |
//! | `ferry-received-at` | ms since the Unix epoch, decimal (corrected when the box's clock was not synchronized at receipt) |
//! | `ferry-source` | `mqtt`, `mqtt-will`, `http` or `requeue` |
//! | `ferry-clock` | how far `ferry-received-at` can be trusted: `synced`, `corrected`, `unsynced`, `device` or `unknown` ([`ferry_buffer::clock`]) |
//!
//! The content type is not one of them: Kafka sends it as the `content-type` header, MQTT v5
//! as its content-type property, the envelope as `content_type`.

use base64::Engine as _;
use ferry_buffer::Reading;
use ferry_config::KeyRule;
use std::fmt::Write as _;

/// The message key for `reading` under `rule`; `None` means no key.
pub fn key_for(rule: KeyRule, reading: &Reading) -> Option<&str> {
    match rule {
        KeyRule::Device => Some(&reading.device),
        KeyRule::Topic => Some(&reading.topic),
        KeyRule::None => None,
        KeyRule::Level(n) => Some(reading.topic.split('/').nth(n).unwrap_or(&reading.device)),
    }
}

/// The stable id of a reading across re-sends: `<gateway id>-<reading id>`.
pub fn ferry_id(gateway_id: &str, r: &Reading) -> String {
    match &r.origin {
        Some(o) => format!("{}-{}", o.gateway, o.id),
        None => format!("{gateway_id}-{}", r.id),
    }
}

/// Calls `f` with each metadata field of `r` (name, value), in the order of the table above.
/// `scratch` is reused for the formatted values, so a caller on a hot path allocates nothing.
pub fn for_each_field(
    gateway_id: &str,
    r: &Reading,
    scratch: &mut String,
    mut f: impl FnMut(&str, &str),
) {
    for (k, v) in &r.properties {
        f(k, v);
    }
    scratch.clear();
    match &r.origin {
        Some(o) => write!(scratch, "{}-{}", o.gateway, o.id),
        None => write!(scratch, "{gateway_id}-{}", r.id),
    }
    .unwrap_or(());
    let id_end = scratch.len();
    let _ = write!(scratch, "{}", r.received_at_ms);
    let (id, at) = scratch.split_at(id_end);
    f("ferry-id", id);
    f("ferry-device", &r.device);
    f("ferry-topic", &r.topic);
    f("ferry-received-at", at);
    f("ferry-source", r.source.as_str());
    f("ferry-clock", r.clock.mark.as_str());
}

/// The fields of [`for_each_field`] as owned pairs (MQTT v5 user properties).
pub fn user_properties(gateway_id: &str, r: &Reading) -> Vec<(String, String)> {
    let mut p = Vec::with_capacity(r.properties.len() + 6);
    for_each_field(gateway_id, r, &mut String::new(), |k, v| {
        p.push((k.to_owned(), v.to_owned()))
    });
    p
}

/// How the payload is carried in the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// The payload is a JSON document and is embedded as is (byte for byte).
    Json,
    /// The payload is UTF-8 text (not JSON) and is embedded as a JSON string.
    Text,
    /// Anything else, embedded as a standard base64 string (with padding).
    Base64,
}

impl PayloadEncoding {
    /// The value of the envelope's `payload_encoding` field.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadEncoding::Json => "json",
            PayloadEncoding::Text => "text",
            PayloadEncoding::Base64 => "base64",
        }
    }

    /// How `payload` is embedded.
    pub fn of(payload: &[u8]) -> Self {
        if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
            PayloadEncoding::Json
        } else if std::str::from_utf8(payload).is_ok() {
            PayloadEncoding::Text
        } else {
            PayloadEncoding::Base64
        }
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The JSON envelope for `r` (MQTT's `envelope = true`, and any uplink without headers):
///
/// ```json
/// {"ferry_id":"gw1-42","gateway":"gw1","device":"dev-1","topic":"sensors/dev-1/temp",
///  "received_at_ms":1700000000000,"source":"mqtt","clock":"synced","content_type":"application/json",
///  "properties":[["k","v"]],"payload_encoding":"json","payload":{"t":21.5}}
/// ```
///
/// `clock` is the `ferry-clock` mark of [`for_each_field`]. `content_type` is `null` when the
/// device gave none; `properties` are the device's own v5
/// user properties. `payload` depends on `payload_encoding` ([`PayloadEncoding`]): a JSON
/// payload is embedded verbatim (so numbers and key order stay exactly as the device sent
/// them), UTF-8 text becomes a JSON string, and anything else a base64 string.
pub fn envelope(gateway_id: &str, r: &Reading) -> Vec<u8> {
    envelope_as(gateway_id, r, PayloadEncoding::of(&r.payload))
}

/// One line of `ferry buffer export` (NDJSON): the [`envelope`] of `r`, except that a JSON
/// payload is embedded only when that keeps its bytes exact (no whitespace around it), so
/// that [`from_export_line`] gives back every payload byte. `ferry_id` names the reading as
/// the gateway sends it (the origin's, for a reading imported before).
pub fn export_line(gateway_id: &str, r: &Reading) -> Vec<u8> {
    let enc = match PayloadEncoding::of(&r.payload) {
        PayloadEncoding::Json if r.payload.trim_ascii().len() != r.payload.len() => {
            if std::str::from_utf8(&r.payload).is_ok() {
                PayloadEncoding::Text
            } else {
                PayloadEncoding::Base64
            }
        }
        e => e,
    };
    envelope_as(gateway_id, r, enc)
}

/// A line of `ferry buffer export` read back for `ferry buffer import`: the reading with its
/// origin (the gateway and id of its `ferry_id`), time, clock mark, source, content type,
/// properties and payload. Its id here is assigned by the importing buffer.
pub fn from_export_line(line: &[u8]) -> Result<Reading, String> {
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        ferry_id: String,
        device: String,
        topic: String,
        received_at_ms: u64,
        source: String,
        #[serde(default)]
        clock: Option<String>,
        content_type: Option<String>,
        #[serde(default)]
        properties: Vec<(String, String)>,
        payload_encoding: String,
        #[serde(borrow)]
        payload: &'a serde_json::value::RawValue,
    }
    let l: Line<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let (gateway, id) = l
        .ferry_id
        .rsplit_once('-')
        .and_then(|(g, id)| Some((g, id.parse::<u64>().ok()?)))
        .filter(|(g, _)| !g.is_empty())
        .ok_or_else(|| format!("ferry_id '{}' is not <gateway>-<id>", l.ferry_id))?;
    let payload: Vec<u8> = match l.payload_encoding.as_str() {
        "json" => l.payload.get().as_bytes().to_vec(),
        "text" => serde_json::from_str::<String>(l.payload.get())
            .map_err(|e| format!("payload: {e}"))?
            .into_bytes(),
        "base64" => {
            let s: String =
                serde_json::from_str(l.payload.get()).map_err(|e| format!("payload: {e}"))?;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("payload: {e}"))?
        }
        other => return Err(format!("unknown payload_encoding '{other}'")),
    };
    let source = ferry_buffer::Source::parse(&l.source)
        .ok_or_else(|| format!("unknown source '{}'", l.source))?;
    let mark = match l.clock.as_deref() {
        None => ferry_buffer::ClockMark::Unknown,
        Some(m) => {
            ferry_buffer::ClockMark::parse(m).ok_or_else(|| format!("unknown clock '{m}'"))?
        }
    };
    let mut r = Reading::new(source, l.device, l.topic, payload);
    r.received_at_ms = l.received_at_ms;
    r.content_type = l.content_type;
    r.properties = l.properties;
    r.clock.mark = mark;
    r.origin = Some(ferry_buffer::Origin {
        gateway: gateway.to_string(),
        id,
    });
    Ok(r)
}

fn envelope_as(gateway_id: &str, r: &Reading, enc: PayloadEncoding) -> Vec<u8> {
    let props = serde_json::to_string(&r.properties).unwrap_or_else(|_| "[]".into());
    let mut out = format!(
        "{{\"ferry_id\":{},\"gateway\":{},\"device\":{},\"topic\":{},\"received_at_ms\":{},\"source\":{},\"clock\":\"{}\",\"content_type\":{},\"properties\":{},\"payload_encoding\":\"{}\",\"payload\":",
        json_str(&ferry_id(gateway_id, r)),
        json_str(gateway_id),
        json_str(&r.device),
        json_str(&r.topic),
        r.received_at_ms,
        json_str(r.source.as_str()),
        r.clock.mark.as_str(),
        r.content_type
            .as_deref()
            .map_or_else(|| "null".to_string(), json_str),
        props,
        enc.as_str(),
    )
    .into_bytes();
    match enc {
        PayloadEncoding::Json => out.extend_from_slice(&r.payload),
        PayloadEncoding::Text => out.extend_from_slice(
            json_str(std::str::from_utf8(&r.payload).unwrap_or_default()).as_bytes(),
        ),
        PayloadEncoding::Base64 => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&r.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::Source;
    use serde_json::Value;

    fn reading(payload: &[u8]) -> Reading {
        let mut r = Reading::new(
            Source::Mqtt,
            "dev \"1\"",
            "sensors/dev/temp",
            payload.to_vec(),
        );
        r.id = 42;
        r.received_at_ms = 1_700_000_000_123;
        r
    }

    #[test]
    fn envelope_embeds_json_verbatim() {
        let mut r = reading(br#" {"t": 21.50, "big": 12345678901234567890123} "#)
            .with_content_type("application/json");
        r.properties = vec![("unit".into(), "C".into())];
        let env = envelope("gw1", &r);
        let text = String::from_utf8(env.clone()).unwrap();
        assert!(text.contains(r#""payload": {"t": 21.50, "big": 12345678901234567890123} }"#));
        let v: Value = serde_json::from_slice(&env).unwrap();
        assert_eq!(v["ferry_id"], "gw1-42");
        assert_eq!(v["gateway"], "gw1");
        assert_eq!(v["device"], "dev \"1\"");
        assert_eq!(v["topic"], "sensors/dev/temp");
        assert_eq!(v["received_at_ms"], 1_700_000_000_123u64);
        assert_eq!(v["source"], "mqtt");
        assert_eq!(v["clock"], "unknown");
        assert_eq!(v["content_type"], "application/json");
        assert_eq!(v["properties"][0][1], "C");
        assert_eq!(v["payload_encoding"], "json");
    }

    #[test]
    fn envelope_text_and_binary() {
        let v: Value = serde_json::from_slice(&envelope("gw", &reading(b"21.5 C\n\"q\""))).unwrap();
        assert_eq!(v["payload_encoding"], "text");
        assert_eq!(v["payload"], "21.5 C\n\"q\"");
        assert_eq!(v["content_type"], Value::Null);
        let bin = [0xff, 0x00, 0xfe, 0x10];
        let v: Value = serde_json::from_slice(&envelope("gw", &reading(&bin))).unwrap();
        assert_eq!(v["payload_encoding"], "base64");
        let back = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, bin);
        // An empty payload is not JSON; it is empty text.
        let v: Value = serde_json::from_slice(&envelope("gw", &reading(b""))).unwrap();
        assert_eq!(v["payload_encoding"], "text");
        assert_eq!(v["payload"], "");
    }

    #[test]
    fn v5_properties() {
        let mut r = reading(b"1");
        r.properties = vec![("unit".into(), "C".into())];
        let p = user_properties("gw1", &r);
        let get = |k: &str| p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(p[0], ("unit".to_string(), "C".to_string()));
        assert_eq!(get("ferry-id"), Some("gw1-42"));
        assert_eq!(get("ferry-device"), Some("dev \"1\""));
        assert_eq!(get("ferry-topic"), Some("sensors/dev/temp"));
        assert_eq!(get("ferry-received-at"), Some("1700000000123"));
        assert_eq!(get("ferry-source"), Some("mqtt"));
        assert_eq!(get("ferry-clock"), Some("unknown"));
        r.clock.mark = ferry_buffer::ClockMark::Corrected;
        let p = user_properties("gw1", &r);
        assert_eq!(
            p.last().unwrap(),
            &("ferry-clock".into(), "corrected".into())
        );
        // An imported reading keeps the ferry-id its first gateway gave it.
        r.origin = Some(ferry_buffer::Origin {
            gateway: "site-7".into(),
            id: 9,
        });
        assert_eq!(ferry_id("gw1", &r), "site-7-9");
        let p = user_properties("gw1", &r);
        assert!(p.contains(&("ferry-id".into(), "site-7-9".into())), "{p:?}");
    }

    #[test]
    fn an_export_line_reads_back_byte_for_byte() {
        let payloads: [&[u8]; 6] = [
            br#"{"t":21.5,"big":12345678901234567890123}"#,
            br#" {"t": 21.50} "#,
            b"21.5 C\n\"q\"",
            &[0xff, 0x00, 0xfe],
            b"",
            b"[1, 2]\n",
        ];
        for (i, p) in payloads.iter().enumerate() {
            let mut r = reading(p).with_content_type("application/x");
            r.properties = vec![("unit".into(), "C".into())];
            r.clock.mark = ferry_buffer::ClockMark::Corrected;
            r.source = Source::MqttWill;
            let line = export_line("gw-a-1", &r);
            assert!(
                !line.contains(&b'\n'),
                "one line: {}",
                String::from_utf8_lossy(&line)
            );
            let back = from_export_line(&line).unwrap();
            assert_eq!(&back.payload[..], *p, "payload {i}");
            assert_eq!(
                back.origin,
                Some(ferry_buffer::Origin {
                    gateway: "gw-a-1".into(),
                    id: 42
                })
            );
            assert_eq!(
                (back.received_at_ms, back.clock.mark, back.source),
                (r.received_at_ms, r.clock.mark, r.source)
            );
            assert_eq!((&back.device, &back.topic), (&r.device, &r.topic));
            assert_eq!(
                (&back.content_type, &back.properties),
                (&r.content_type, &r.properties)
            );
            // Exported again from the importing gateway, it keeps its first name.
            let again = from_export_line(&export_line("gw-b", &back)).unwrap();
            assert_eq!(again.origin, back.origin);
        }
        assert!(from_export_line(br#"{"ferry_id":"nodash"}"#).is_err());
    }
}
