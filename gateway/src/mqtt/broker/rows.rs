//! The broker's rows in the buffer file's `state` table ([`ferry_buffer::StateWrite`]):
//! keys and encodings.
//!
//! | key | value |
//! |---|---|
//! | `retained/<topic>` | a message |
//! | `session/<client id, hex>/meta` | version 1, session expiry interval u32 (`u32::MAX`: never) |
//! | `session/<client id, hex>/sub/<filter>` | version 1, QoS, No Local, Retain As Published, subscription identifier u32 (0: none) |
//! | `session/<client id, hex>/q/<seq, 16 hex digits>` | version 1, QoS to deliver with, RETAIN flag, identifier count u32 and the identifiers u32, a message |
//! | `session/<client id, hex>/in2/<packet id, 4 hex digits>` | empty: a QoS 2 publish from the client was stored and PUBREC'd, its PUBREL not yet received |
//! | `session/<client id, hex>/rel/<packet id, 4 hex digits>` | empty: a QoS 2 message to the client was PUBREC'd, its PUBCOMP not yet received (the PUBREL is sent again) |
//!
//! A message: QoS, expiry (wall ms, 0: none), payload format indicator (0xff: none), topic,
//! content type, response topic, correlation data, user properties, then the payload to the
//! end. Strings and byte strings are a u32 length (`u32::MAX`: absent) and the bytes; integers
//! little-endian. Client ids are hex-encoded, so that one id is never a prefix of another's
//! keys.

use super::{Delivery, Message, SubOpts};
use bytes::Bytes;
use ferry_buffer::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const RETAINED: &str = "retained/";
pub(super) const SESSION: &str = "session/";

/// `session/<hex>/`: every row of one client's session.
pub(super) fn session_prefix(client: &str) -> String {
    let mut s = String::with_capacity(SESSION.len() + 2 * client.len() + 1);
    s.push_str(SESSION);
    for b in client.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('/');
    s
}

pub(super) fn client_of(hex: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

pub(super) fn meta(expiry: u32) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(&expiry.to_le_bytes());
    v
}

pub(super) fn decode_meta(b: &[u8]) -> Option<u32> {
    match b {
        [1, rest @ ..] => Some(u32::from_le_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

pub(super) fn sub(o: &SubOpts) -> Vec<u8> {
    let mut v = vec![1, o.qos, o.no_local as u8, o.retain_as_published as u8];
    v.extend_from_slice(&(o.id.unwrap_or(0) as u32).to_le_bytes());
    v
}

pub(super) fn decode_sub(b: &[u8]) -> Option<SubOpts> {
    match b {
        [1, qos, nl, rap, id @ ..] => {
            let id = u32::from_le_bytes(id.try_into().ok()?) as usize;
            Some(SubOpts {
                qos: (*qos).min(2),
                no_local: *nl != 0,
                retain_as_published: *rap != 0,
                id: (id != 0).then_some(id),
            })
        }
        _ => None,
    }
}

pub(super) fn queued(d: &Delivery) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + d.msg.topic.len() + d.msg.payload.len());
    out.extend_from_slice(&[1, d.qos, d.retain as u8]);
    out.extend_from_slice(&(d.ids.len() as u32).to_le_bytes());
    for id in &d.ids {
        out.extend_from_slice(&(*id as u32).to_le_bytes());
    }
    message_into(&mut out, &d.msg);
    out
}

pub(super) fn decode_queued(mut b: &[u8], seq: u64, now: Instant, wall: u64) -> Option<Delivery> {
    let head = take(&mut b, 3)?;
    if head[0] != 1 {
        return None;
    }
    let n = u32_(&mut b)?;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(u32_(&mut b)? as usize);
    }
    Some(Delivery {
        msg: Arc::new(decode_message(b, now, wall)?),
        qos: head[1].min(2),
        retain: head[2] != 0,
        ids,
        seq: Some(seq),
        pkid: None,
    })
}

pub(super) fn retained(m: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + m.topic.len() + m.payload.len());
    out.push(1);
    message_into(&mut out, m);
    out
}

pub(super) fn decode_retained(b: &[u8], now: Instant, wall: u64) -> Option<Message> {
    match b {
        [1, rest @ ..] => decode_message(rest, now, wall),
        _ => None,
    }
}

fn put(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

fn message_into(out: &mut Vec<u8>, m: &Message) {
    out.push(m.qos);
    let expires_wall = m
        .expiry_left(Instant::now())
        .map_or(0, |s| now_ms() + s as u64 * 1000);
    out.extend_from_slice(&expires_wall.to_le_bytes());
    let p = m.props.as_ref();
    out.push(p.and_then(|p| p.payload_format_indicator).unwrap_or(0xff));
    put(out, Some(m.topic.as_bytes()));
    put(
        out,
        p.and_then(|p| p.content_type.as_deref()).map(str::as_bytes),
    );
    put(
        out,
        p.and_then(|p| p.response_topic.as_deref())
            .map(str::as_bytes),
    );
    put(out, p.and_then(|p| p.correlation_data.as_deref()));
    let user = p.map_or(&[][..], |p| &p.user_properties[..]);
    out.extend_from_slice(&(user.len() as u32).to_le_bytes());
    for (k, v) in user {
        put(out, Some(k.as_bytes()));
        put(out, Some(v.as_bytes()));
    }
    out.extend_from_slice(&m.payload);
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

fn u32_(b: &mut &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
}

fn get<'a>(b: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    match u32_(b)? {
        u32::MAX => Some(None),
        n => Some(Some(take(b, n as usize)?)),
    }
}

fn string(b: &mut &[u8]) -> Option<Option<String>> {
    match get(b)? {
        Some(s) => Some(Some(std::str::from_utf8(s).ok()?.to_owned())),
        None => Some(None),
    }
}

fn decode_message(mut b: &[u8], now: Instant, wall: u64) -> Option<Message> {
    let qos = take(&mut b, 1)?[0].min(2);
    let expires_wall = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let pfi = take(&mut b, 1)?[0];
    let topic = string(&mut b)??;
    let content_type = string(&mut b)?;
    let response_topic = string(&mut b)?;
    let correlation_data = get(&mut b)?.map(Bytes::copy_from_slice);
    let n = u32_(&mut b)?;
    let mut user_properties = Vec::new();
    for _ in 0..n {
        user_properties.push((string(&mut b)??, string(&mut b)??));
    }
    let props = super::passed_on(
        (pfi != 0xff).then_some(pfi),
        content_type,
        response_topic,
        correlation_data,
        user_properties,
    );
    Some(Message {
        topic_bytes: Bytes::copy_from_slice(topic.as_bytes()),
        topic: Arc::from(topic.as_str()),
        payload: Bytes::copy_from_slice(b),
        qos,
        retain: true,
        keep: true,
        props,
        expires: (expires_wall != 0)
            .then(|| now + Duration::from_millis(expires_wall.saturating_sub(wall))),
        from: 0,
        n: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::PublishProperties;

    #[test]
    fn rows_round_trip() {
        let m = Arc::new(Message {
            topic: Arc::from("t/1"),
            topic_bytes: Bytes::from_static(b"t/1"),
            payload: Bytes::from_static(b"21.5"),
            qos: 1,
            retain: true,
            keep: true,
            props: Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                topic_alias: None,
                response_topic: Some("r/1".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into())],
                subscription_identifiers: Vec::new(),
                content_type: Some("text/plain".into()),
            }),
            expires: Some(Instant::now() + Duration::from_secs(100)),
            from: 3,
            n: 0,
        });
        let now = Instant::now();
        let back = decode_retained(&retained(&m), now, now_ms()).unwrap();
        assert_eq!(
            (&*back.topic, back.qos, &back.payload, &back.props),
            ("t/1", 1, &m.payload, &m.props)
        );
        assert!((95..=100).contains(&back.expiry_left(now).unwrap()));
        assert!(decode_retained(&retained(&m)[..10], now, 0).is_none());

        let d = Delivery {
            msg: m.clone(),
            qos: 1,
            retain: false,
            ids: vec![3, 9],
            seq: None,
            pkid: Some(4),
        };
        let back = decode_queued(&queued(&d), 77, now, now_ms()).unwrap();
        assert_eq!(
            (back.qos, back.retain, &back.ids, back.seq),
            (1, false, &d.ids, Some(77))
        );
        assert_eq!(back.msg.payload, m.payload);

        let o = SubOpts {
            qos: 2,
            no_local: true,
            retain_as_published: false,
            id: Some(12),
        };
        assert_eq!(decode_sub(&sub(&o)), Some(o));
        assert_eq!(decode_meta(&meta(3600)), Some(3600));
        let p = session_prefix("dev/1é");
        let hex = &p[SESSION.len()..p.len() - 1];
        assert_eq!(client_of(hex).as_deref(), Some("dev/1é"));
    }
}
