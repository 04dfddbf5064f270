//! One readable line for librdkafka's connection errors, for the status page: which broker,
//! and whether the cause is TLS, the credentials or reaching it at all. librdkafka's own text
//! for a TLS failure says only "certificate verify failed", so for those the uplink makes one
//! handshake of its own ([`crate::tls::diagnose`]) to name the certificate, the name it was
//! checked against and the CA file. Secrets never reach here: the texts are scrubbed first.

use rdkafka::error::RDKafkaErrorCode;

/// What kind of failure a librdkafka error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// TLS with the broker `host:port` failed.
    Tls(String, u16),
    /// Anything else (the line says what).
    Other,
}

/// The broker a librdkafka error is about: `ssl://localhost:9093/bootstrap: …` or
/// `sasl_ssl://b-1.x:9096/1: …` → (`localhost`, 9093).
pub(crate) fn broker_of(reason: &str) -> Option<(String, u16)> {
    let rest = reason.split_once("://")?.1;
    let hostport = rest.split(['/', ' ']).next()?;
    let (host, port) = hostport.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

/// librdkafka's text without the broker prefix and the `(after 3ms in state …)` tail.
fn core(reason: &str) -> &str {
    let mut s = reason.trim();
    if let Some((head, tail)) = s.split_once(": ")
        && head.contains("://")
    {
        s = tail;
    }
    if let Some(i) = s.rfind(" (after ") {
        s = &s[..i];
    }
    s.trim()
}

/// One line for the status page, and what kind of failure it is.
pub(crate) fn readable(code: Option<RDKafkaErrorCode>, reason: &str) -> (Cause, String) {
    use RDKafkaErrorCode as C;
    let broker = broker_of(reason);
    let at = broker
        .as_ref()
        .map_or_else(|| "the brokers".to_owned(), |(h, p)| format!("{h}:{p}"));
    let text = core(reason);
    let lower = text.to_ascii_lowercase();
    if code == Some(C::SSL) || lower.contains("ssl handshake failed") {
        let detail = text
            .split_once("SSL handshake failed: ")
            .map_or(text, |(_, d)| d);
        let line = format!("TLS with {at} failed: {detail}");
        return match broker {
            Some((h, p)) => (Cause::Tls(h, p), line),
            None => (Cause::Other, line),
        };
    }
    let line = if code == Some(C::Authentication)
        || lower.contains("sasl authentication error")
        || lower.contains("authentication failed")
    {
        format!("{at} refused the credentials: {text}")
    } else if code == Some(C::Resolve) || lower.contains("failed to resolve") {
        format!("cannot resolve {at}: {text}")
    } else if lower.contains("connection refused")
        || lower.contains("connect to")
        || lower.contains("timed out")
        || lower.contains("disconnected")
    {
        format!("cannot reach {at}: {text}")
    } else {
        match code {
            Some(c) => format!("{c:?}: {text}"),
            None => text.to_owned(),
        }
    };
    (Cause::Other, line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as C;

    #[test]
    fn librdkafka_texts_become_one_line_each() {
        // Texts as librdkafka 2.12 writes them (the TLS one from the stunnel test).
        let tls = "ssl://localhost:34685/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 3ms in state SSL_HANDSHAKE)";
        let (cause, line) = readable(Some(C::SSL), tls);
        assert_eq!(cause, Cause::Tls("localhost".into(), 34685));
        assert!(
            line.starts_with("TLS with localhost:34685 failed: error:0A000086"),
            "{line}"
        );
        assert!(!line.contains("after 3ms"), "{line}");

        let sasl = "sasl_ssl://b-1.example:9096/bootstrap: SASL authentication error: Authentication failed: Invalid username or password (after 5ms in state AUTH_REQ)";
        let (_, line) = readable(Some(C::Authentication), sasl);
        assert_eq!(
            line,
            "b-1.example:9096 refused the credentials: SASL authentication error: Authentication failed: Invalid username or password"
        );
        let refused = "localhost:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)";
        let (_, line) = readable(Some(C::BrokerTransportFailure), refused);
        assert!(line.starts_with("cannot reach"), "{line}");
        let (_, line) = readable(
            Some(C::Resolve),
            "nohost:9092/bootstrap: Failed to resolve 'nohost:9092': Name or service not known (after 1ms in state CONNECT)",
        );
        assert!(line.starts_with("cannot resolve"), "{line}");
        assert_eq!(
            broker_of("sasl_ssl://[::1]:9093/2: x"),
            Some(("::1".to_owned(), 9093))
        );
    }
}
