//! CONNECT: reading it, admission (client id, credentials, TLS identity), the will, and
//! refusing a connection.

use super::*;

/// The device id of a reading: the certificate CN, else the topic level, else the client id.
pub fn device_id<'a>(
    cert_cn: Option<&'a str>,
    level: Option<usize>,
    topic: &'a str,
    client_id: &'a str,
) -> &'a str {
    if let Some(cn) = cert_cn {
        return cn;
    }
    if let Some(l) = level.and_then(|n| topic.split('/').nth(n).filter(|l| !l.is_empty())) {
        return l;
    }
    client_id
}

/// Client id rule: an empty id gets an assigned one with clean session, and is refused
/// without it. Returns the id to use and whether it was assigned.
pub fn client_id_rule(id: &str, clean: bool, conn: u64) -> Option<(String, bool)> {
    if !id.is_empty() {
        return Some((id.to_owned(), false));
    }
    clean.then(|| (format!("ferry-auto-{:x}-{conn:x}", now_ms()), true))
}

pub(super) fn will_reading(
    ctx: &Ctx,
    client_id: &str,
    cert_cn: Option<&str>,
    w: LastWill,
    props: Option<LastWillProperties>,
) -> Option<Reading> {
    let topic = topic::name_from_bytes(&w.topic)?;
    let device = device_id(
        cert_cn.filter(|c| !c.is_empty()),
        ctx.settings.device_from_topic_level,
        topic,
        client_id,
    );
    // Held for the whole connection: a copy, so it does not pin the CONNECT's read buffer.
    let message = Bytes::copy_from_slice(&w.message);
    let mut r = Reading::new(Source::MqttWill, device, topic, message);
    if let Some(p) = props {
        r.content_type = p.content_type;
        r.properties = p.user_properties;
    }
    Some(r)
}

/// Admission: the client id to use (and whether ferry assigned it), or why the CONNECT is
/// refused (reason for the counters, CONNACK code, message for the log).
pub(super) async fn admit(
    ctx: &Ctx,
    connect: &Connect,
    login: Option<&Login>,
    cert_cn: Option<&str>,
    conn: u64,
) -> Result<(String, bool), (&'static str, ConnectReturnCode, String)> {
    let Some(id) = client_id_rule(&connect.client_id, connect.clean_session, conn) else {
        return Err((
            reason::CLIENT_ID,
            ConnectReturnCode::ClientIdentifierNotValid,
            "an empty client id needs clean session".to_string(),
        ));
    };
    let creds = login.map(|l| (l.username.as_str(), l.password.as_str()));
    match ctx.auth.check(creds).await {
        AuthOutcome::Allowed => {}
        AuthOutcome::BadCredentials => {
            return Err((
                reason::BAD_CREDENTIALS,
                ConnectReturnCode::BadUserNamePassword,
                format!(
                    "bad username or password for user '{}'",
                    creds.map(|c| c.0).unwrap_or("")
                ),
            ));
        }
        AuthOutcome::NotAuthorized => {
            return Err((
                reason::NOT_AUTHORIZED,
                ConnectReturnCode::NotAuthorized,
                "anonymous clients are not allowed".to_string(),
            ));
        }
    }
    if cert_cn == Some("") {
        return Err((
            reason::NOT_AUTHORIZED,
            ConnectReturnCode::NotAuthorized,
            "device_from_cert_cn is on and the client certificate has no Common Name".to_string(),
        ));
    }
    Ok(id)
}

#[derive(Debug)]
pub(super) enum ConnectError {
    Io(std::io::Error),
    Version(u8),
    Malformed(String),
}

/// Reads the CONNECT: frames it, peeks the protocol level, and decodes it with V4 or V5.
pub(super) async fn read_connect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<(Codec, Packet), ConnectError> {
    loop {
        match v4::check(buf.iter(), limit) {
            Ok(fh) => {
                if fh.byte1 >> 4 != 1 {
                    return Err(ConnectError::Malformed(format!(
                        "packet type {} before CONNECT",
                        fh.byte1 >> 4
                    )));
                }
                // Variable header: protocol name (u16 length + bytes), then the level.
                let at = fh.fixed_header_len;
                let name_len = buf
                    .get(at..at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .ok_or_else(|| ConnectError::Malformed("short CONNECT".into()))?;
                let level = *buf
                    .get(at + 2 + name_len)
                    .ok_or_else(|| ConnectError::Malformed("short CONNECT".into()))?;
                let mut codec = match level {
                    4 => Codec::V4(v4::V4),
                    5 => Codec::V5(v5::V5),
                    3 => return Err(ConnectError::Version(level)),
                    l => return Err(ConnectError::Version(l)),
                };
                let p = codec
                    .read(buf, limit)
                    .map_err(|e| ConnectError::Malformed(e.to_string()))?;
                return Ok((codec, p));
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(ConnectError::Malformed(e.to_string())),
        }
        buf.reserve(READ_MIN);
        match io.read_buf(buf).await {
            Ok(0) => {
                return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Io(e)),
        }
    }
}

/// Answers a connection beyond `max_connections`: CONNACK "server unavailable" (v3.1.1 0x03,
/// v5 0x97 quota exceeded) if it sends CONNECT within `wait`, then closes.
pub async fn refuse_busy<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, wait: Duration) {
    let mut buf = BytesMut::with_capacity(512);
    if let Ok(Ok((codec, _))) =
        tokio::time::timeout(wait, read_connect(&mut io, &mut buf, MIN_CONNECT_LIMIT)).await
    {
        let code = if codec.is_v5() {
            ConnectReturnCode::QuotaExceeded
        } else {
            ConnectReturnCode::ServiceUnavailable
        };
        refuse_connect(&mut io, &codec, code).await;
    } else {
        let _ = io.shutdown().await;
    }
}

/// Sends a refusing CONNACK with `code` and closes the connection.
pub(super) async fn refuse_connect<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    codec: &Codec,
    code: ConnectReturnCode,
) {
    let mut out = BytesMut::new();
    let _ = codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        ),
        &mut out,
    );
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
}
