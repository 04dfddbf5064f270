//! `ferry status`: fetches `/api/status` with a tiny HTTP/1.1 GET over a `TcpStream` (plain
//! HTTP only: no client library for one request) and prints a short table.

use super::api::{Level, StatusReport, UplinkState, fmt_age, fmt_bytes};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why `ferry status` could not get a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("unsupported URL '{0}': expected http://HOST[:PORT] (https is not supported)")]
    Url(String),
    /// Connecting, sending or reading failed.
    #[error("cannot reach {url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("{0} did not answer within 10 s")]
    Timeout(String),
    /// Not an HTTP response.
    #[error("{0} did not answer with HTTP")]
    Protocol(String),
    /// A status other than 200.
    #[error("{url} answered {code}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status code.
        code: u16,
        /// The body, shortened.
        body: String,
    },
    /// The body is not a status report.
    #[error("{url} answered with something that is not a ferry status report: {source}")]
    Json {
        /// The URL.
        url: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Splits `http://host:port/path` into (`host:port`, `host`, `/path`).
fn parse_url(url: &str) -> Result<(String, String, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, String::new()),
    };
    if authority.is_empty() {
        return Err(ClientError::Url(url.to_string()));
    }
    let host = authority.to_string();
    let addr = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, host, path))
}

/// `GET base + path` with an optional bearer token; returns (status code, body).
pub async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let (addr, host, prefix) = parse_url(base.trim_end_matches('/'))?;
    let full = format!("{}{}", base.trim_end_matches('/'), path);
    let io = |source| ClientError::Io {
        url: full.clone(),
        source,
    };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(io)?;
        let mut req = format!(
            "GET {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\nUser-Agent: ferry-status\r\n"
        );
        if let Some(t) = token {
            let _ = write!(req, "Authorization: Bearer {t}\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(io)?;
        Ok::<_, ClientError>(buf)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| ClientError::Timeout(full.clone()))??;
    parse_response(&raw).ok_or(ClientError::Protocol(full))
}

/// Parses an HTTP/1.1 response (Content-Length, chunked, or until close).
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let code: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    if !chunked {
        return Some((code, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&rest[..nl]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Some((code, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Fetches and decodes the status report.
pub async fn fetch(base: &str, token: Option<&str>) -> Result<StatusReport, ClientError> {
    let url = format!("{}/api/status?devices=10", base.trim_end_matches('/'));
    let (code, body) = get(base, "/api/status?devices=10", token).await?;
    if code != 200 {
        let mut text = String::from_utf8_lossy(&body).into_owned();
        text.truncate(300);
        return Err(ClientError::Status {
            url,
            code,
            body: text.trim().to_string(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| ClientError::Json { url, source })
}

fn opt_age(ms: Option<u64>) -> String {
    ms.map(|a| format!("{} ago", fmt_age(a)))
        .unwrap_or_else(|| "never".into())
}

/// The short terminal table.
pub fn render(r: &StatusReport) -> String {
    let mut o = String::new();
    let level = match r.summary.level {
        Level::Ok => "OK",
        Level::Idle => "IDLE",
        Level::Warn => "WARNING",
        Level::Down => "DOWN",
    };
    let _ = writeln!(o, "{level}: {}", r.summary.headline);
    let _ = writeln!(
        o,
        "gateway {}  ferry {}  up {}  ready: {}",
        r.gateway.id,
        r.gateway.version,
        fmt_age((r.gateway.uptime_secs * 1000.0) as u64),
        if r.ready { "yes" } else { "no" }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<8} {:<12} {:>10} {:>10} {:>12} {:>10} {:>10}  last error",
        "uplink", "state", "waiting", "bytes", "oldest", "drain/s", "last ack"
    );
    for u in &r.uplinks {
        let state = match (u.state, u.stalled) {
            (_, true) => "STALLED",
            (UplinkState::Connected, _) => "connected",
            (UplinkState::Connecting, _) => "connecting",
            (UplinkState::BackingOff, _) => "backing off",
            (UplinkState::Offline, _) => "OFFLINE",
        };
        let _ = writeln!(
            o,
            "{:<8} {:<12} {:>10} {:>10} {:>12} {:>10.1} {:>10}  {}",
            u.name,
            state,
            u.lag_readings,
            fmt_bytes(u.lag_bytes),
            u.oldest_unsent_age_ms
                .map(fmt_age)
                .unwrap_or_else(|| "-".into()),
            u.drain_rate_per_sec,
            opt_age(u.last_ack_age_ms),
            u.last_error.as_deref().unwrap_or("-")
        );
        if let Some(d) = &u.downlink {
            let _ = writeln!(
                o,
                "{:<8} commands: {} handed over ({} to no subscriber), {} refused, last {}{}",
                "",
                d.handed_over_total,
                d.unrouted_total,
                d.refused_total,
                opt_age(d.last_command_age_ms),
                if d.ready { "" } else { ", NOT SUBSCRIBED" }
            );
        }
    }
    if r.uplinks.is_empty() {
        let _ = writeln!(o, "(no uplink enabled)");
    }
    let _ = writeln!(o);
    let b = &r.buffer;
    let _ = writeln!(
        o,
        "buffer   {} readings, {} of {} ({:.1}%), oldest {}, {}",
        b.readings,
        fmt_bytes(b.used_bytes),
        fmt_bytes(b.max_bytes),
        b.fill_ratio * 100.0,
        b.oldest_reading_age_ms
            .map(fmt_age)
            .unwrap_or_else(|| "-".into()),
        if b.writable {
            "writable"
        } else {
            "NOT WRITABLE"
        }
    );
    let rates: Vec<String> = r
        .ingest
        .rate_by_source
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}/s"))
        .collect();
    let _ = writeln!(
        o,
        "ingest   {:.1}/s ({}), {} readings since start",
        r.ingest.rate,
        rates.join(", "),
        r.ingest.total
    );
    let _ = writeln!(
        o,
        "losses   {} dropped, {} rejected, {} dead letters",
        r.losses.dropped_total, r.losses.rejected_total, r.dead_letters.count
    );
    if let Some(m) = &r.mqtt {
        let _ = writeln!(
            o,
            "mqtt     {} clients connected, {} subscribers, {} retained, {} delivered",
            m.connected_clients,
            m.subscribers.len(),
            m.retained,
            m.delivered_total
        );
    }
    let _ = writeln!(
        o,
        "devices  {} tracked (max {})",
        r.devices.tracked, r.devices.max
    );
    if let Some(d) = &r.disk {
        let _ = writeln!(
            o,
            "disk     {} free of {} ({}), {} kept free{}",
            fmt_bytes(d.free_bytes),
            fmt_bytes(d.total_bytes),
            d.path,
            fmt_bytes(d.reserve_bytes),
            if d.at_reserve { ": reached" } else { "" }
        );
    }
    let c = &r.clock;
    let _ = writeln!(
        o,
        "clock    {}{}{}",
        match (c.synchronized, c.synchronized_after_boot_ms) {
            (true, Some(after)) => format!("synchronized, {} after boot", fmt_age(after)),
            (true, None) => "synchronized".to_string(),
            (false, _) => format!(
                "NOT SYNCHRONIZED since boot, {} (readings marked unsynced)",
                fmt_age(c.since_boot_ms)
            ),
        },
        if c.source == "assume" {
            " (assumed: gateway.clock_sync)"
        } else {
            ""
        },
        match (c.jumps_total, c.last_jump_ms) {
            (0, _) | (_, None) => String::new(),
            (n, Some(ms)) => format!(
                "; {n} jump(s), last {} {}",
                if ms > 0 { "forward" } else { "back" },
                fmt_age(ms.unsigned_abs())
            ),
        }
    );
    if r.quarantine.flagged {
        let _ = writeln!(
            o,
            "QUARANTINE: corrupt buffer files were moved aside (recover what is intact with `ferry buffer salvage FILE --gateway-id ID`, then `ferry buffer import`): {}",
            r.quarantine.files.join(", ")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080").unwrap(),
            (
                "127.0.0.1:8080".into(),
                "127.0.0.1:8080".into(),
                String::new()
            )
        );
        assert_eq!(
            parse_url("http://gw.local/ferry").unwrap(),
            ("gw.local:80".into(), "gw.local".into(), "/ferry".into())
        );
        assert!(parse_url("https://x").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r, (200, b"{}".to_vec()));
        let r = parse_response(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r, (401, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_none());
    }
}
