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
