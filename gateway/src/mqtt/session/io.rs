//! The wire: the codec chosen at CONNECT, socket reads and writes, and what is read from a
//! frame before it is decoded.

use super::*;

/// The codec of one connection, chosen from the CONNECT's protocol level.
#[derive(Debug, Clone)]
pub(super) enum Codec {
    V4(v4::V4),
    V5(v5::V5),
}

impl Codec {
    pub(super) fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    pub(super) fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, CodecError> {
        // rumqttd's decoders have had `unreachable!()` arms for unexpected packet types; the
        // caller filters those, and this keeps any other panic to one closed connection.
        if self.is_v5() {
            short_disconnect(buf);
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }))
        .unwrap_or(Err(CodecError::MalformedPacket))
    }

    pub(super) fn write(&self, p: Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
        match self {
            Codec::V4(c) => c.write(p, out),
            Codec::V5(c) => c.write(p, out),
        }
    }
}

/// An MQTT 5 DISCONNECT of remaining length 1 has a reason code and no property length
/// (MQTT 5 3.14.2.2.1: then it is 0), as mosquitto's clients send it; rumqttd's decoder
/// wants the property length, so a zero one is added to such a frame at the front of `buf`.
fn short_disconnect(buf: &mut BytesMut) {
    if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 0x01 {
        let rest = buf.split_off(3);
        let reason = buf[2];
        buf.clear();
        buf.extend_from_slice(&[0xE0, 0x02, reason, 0x00]);
        buf.extend_from_slice(&rest);
    }
}

/// keeps the fields crate-private, so they are read from the frame before decoding.
pub(super) fn publish_meta(frame: &[u8], fixed_header_len: usize) -> (u8, bool, u16) {
    let byte1 = frame[0];
    let qos = (byte1 >> 1) & 0b11;
    let dup = byte1 & 0b1000 != 0;
    let mut pkid = 0;
    if qos > 0 {
        let at = fixed_header_len;
        if let Some(t) = frame.get(at..at + 2) {
            let tlen = u16::from_be_bytes([t[0], t[1]]) as usize;
            if let Some(p) = frame.get(at + 2 + tlen..at + 4 + tlen) {
                pkid = u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }
    (qos, dup, pkid)
}

/// Reads into `buf`, asking for `room` free bytes (see [`READ_MIN`], [`READ_MAX`]): doubled
/// after a read that filled what it asked for, halved after one that did not.
pub(super) async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    room: &mut usize,
) -> std::io::Result<usize> {
    if buf.is_empty() && buf.capacity() > 2 * *room {
        // A quiet connection gives back what a burst made it grow to.
        *buf = BytesMut::new();
    }
    if buf.capacity() - buf.len() < *room / 2 {
        // Unique (nothing keeps a slice of it), so this moves the unread bytes to the front of
        // the same allocation when that makes room, and grows it only when that does not.
        buf.reserve(*room);
    }
    let asked = buf.capacity() - buf.len();
    let n = rd.read_buf(buf).await?;
    *room = if n >= asked {
        (*room * 2).min(READ_MAX)
    } else {
        (*room / 2).max(READ_MIN)
    };
    Ok(n)
}

/// Writes what the socket takes of `out`, or flushes (a TLS writer buffers) when `out` is
/// empty, returning 0. One step each, so that it is cancel-safe in a `select!`: nothing is
/// written unless the count written is returned, and `out` is advanced only by the caller.
pub(super) async fn write_some<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &[u8],
) -> std::io::Result<usize> {
    if out.is_empty() {
        wr.flush().await?;
        return Ok(0);
    }
    match wr.write(out).await? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Writes an MQTT 3.1.1 PUBLISH; `(qos, pkid, dup, retain)`.
pub(super) fn publish_v4(
    out: &mut BytesMut,
    topic: &[u8],
    payload: &[u8],
    (qos, pkid, dup, retain): (u8, u16, bool, bool),
) {
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.reserve(remaining + 5);
    out.extend_from_slice(&[0x30 | ((dup as u8) << 3) | (qos << 1) | retain as u8]);
    put_remaining_length(out, remaining);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn put_remaining_length(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n & 0x7f) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        out.extend_from_slice(&[b]);
        if n == 0 {
            break;
        }
    }
}

/// Turns the QoS 0 PUBLISH encoded at `out[start..]` into one of QoS `qos` with packet id
/// `pkid`: rumqttd keeps a publish's QoS and packet id crate-private, so its writer is given
/// QoS 0 and the two bytes of packet id are put in here, after the topic, where both protocol
/// versions have them.
pub(super) fn set_qos(out: &mut BytesMut, start: usize, qos: u8, pkid: u16, dup: bool) {
    let packet = out[start..].to_vec();
    out.truncate(start);
    let byte1 = packet[0] | (qos << 1) | ((dup as u8) << 3);
    // The remaining length: 1 to 4 bytes of 7 bits, low first.
    let (mut remaining, mut k) = (0usize, 1usize);
    loop {
        let b = packet[k];
        remaining |= ((b & 0x7f) as usize) << (7 * (k - 1));
        k += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let topic_end = k + 2 + u16::from_be_bytes([packet[k], packet[k + 1]]) as usize;
    out.reserve(packet.len() + 3);
    out.extend_from_slice(&[byte1]);
    put_remaining_length(out, remaining + 2);
    out.extend_from_slice(&packet[k..topic_end]);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(&packet[topic_end..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnect_with_a_reason_code_and_no_property_length_is_read() {
        for (frame, reason) in [
            (
                &[0xE0, 0x01, 0x04][..],
                DisconnectReasonCode::DisconnectWithWillMessage,
            ),
            (
                &[0xE0, 0x01, 0x00][..],
                DisconnectReasonCode::NormalDisconnection,
            ),
            (&[0xE0, 0x00][..], DisconnectReasonCode::NormalDisconnection),
        ] {
            let mut buf = BytesMut::from(frame);
            buf.extend_from_slice(&[0xC0, 0x00]); // a PINGREQ after it stays
            match Codec::V5(v5::V5).read(&mut buf, 1 << 20) {
                Ok(Packet::Disconnect(d, _)) => assert_eq!(d.reason_code, reason, "{frame:?}"),
                other => panic!("{frame:?}: {other:?}"),
            }
            assert_eq!(&buf[..], &[0xC0, 0x00]);
        }
    }

    #[test]
    fn set_qos_gives_a_publish_that_both_codecs_read_back() {
        // Payloads around 128 and 16,384 bytes move the remaining length to a longer varint.
        for len in [0usize, 10, 120, 126, 127, 16_370, 16_380, 70_000] {
            for mut codec in [Codec::V4(v4::V4), Codec::V5(v5::V5)] {
                let props = codec.is_v5().then(|| PublishProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(30),
                    topic_alias: None,
                    response_topic: Some("r".into()),
                    correlation_data: None,
                    user_properties: vec![("k".into(), "v".into())],
                    subscription_identifiers: vec![5],
                    content_type: None,
                });
                let payload = Bytes::from(vec![7u8; len]);
                let mut out = BytesMut::from(&b"xyz"[..]);
                let p = Publish::new(Bytes::from_static(b"a/b"), payload.clone(), true);
                codec
                    .write(Packet::Publish(p, props.clone()), &mut out)
                    .unwrap();
                set_qos(&mut out, 3, 2, 0xBEEF, true);
                assert_eq!(&out[..3], b"xyz");
                let mut frame = out.split_off(3);
                let fh = v4::check(frame.iter(), 1 << 20).unwrap();
                assert_eq!(fh.frame_length(), frame.len(), "len {len}");
                let meta = publish_meta(&frame, fh.fixed_header_len);
                assert_eq!(meta, (2, true, 0xBEEF));
                if !codec.is_v5() {
                    let mut direct = BytesMut::new();
                    publish_v4(&mut direct, b"a/b", &payload, (2, 0xBEEF, true, true));
                    assert_eq!(direct, frame, "len {len}");
                }
                match codec.read(&mut frame, 1 << 20).unwrap() {
                    Packet::Publish(back, back_props) => {
                        assert_eq!(
                            (&back.topic[..], &back.payload, back.retain),
                            (&b"a/b"[..], &payload, true)
                        );
                        assert_eq!(back_props, props);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }
}
