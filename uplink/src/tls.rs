//! TLS for every uplink: one rustls client configuration on the `ring` provider (the one
//! rustls in the tree), with the system trust store or a CA file, and optional client
//! certificates.

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {what} from {}: {message}", path.display())]
    File {
        /// Which file (`ca_path`, …).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the certificates or key.
    #[error("the TLS configuration is invalid: {0}")]
    Rustls(#[from] rustls::Error),
    /// Only one of `client_cert_path` and `client_key_path` is set.
    #[error("client_cert_path and client_key_path must be set together")]
    HalfClientAuth,
}

fn file_err(what: &'static str, path: &Path, message: impl ToString) -> TlsSetupError {
    TlsSetupError::File {
        what,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// A rustls client configuration on ring: the CA certificates of `ca_path` (else the system
/// trust store), and a client certificate and key for mutual TLS when given.
pub fn client_config(
    ca_path: Option<&Path>,
    client_auth: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let roots = roots(ca_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client_auth {
        Some((cert, key)) => {
            let chain = read_certs("the client certificate (client_cert_path)", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| file_err("the client key (client_key_path)", key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The CA certificates of `ca_path`, else the system trust store.
fn roots(ca_path: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match ca_path {
        Some(path) => {
            for cert in read_certs("the CA certificates (ca_path)", path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "A system trust store certificate could not be loaded.");
            }
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                tracing::warn!(
                    "The system trust store is empty; set ca_path to verify the upstream."
                );
            }
        }
    }
    Ok(roots)
}

/// Why `host:port`'s certificate fails verification against `ca_path` (else the system trust
/// store), in one line naming the certificate's names, the expected name and the CA file; or
/// `None` when the handshake succeeds or the server cannot be reached. For clients whose own
/// TLS error says only "certificate verify failed" (librdkafka's OpenSSL): this makes one
/// handshake of its own, with a 5 s timeout, and sends nothing else.
pub fn diagnose(host: &str, port: u16, ca_path: Option<&Path>) -> Option<String> {
    use rustls::CertificateError as C;
    use std::io::Write as _;
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let trust = match ca_path {
        Some(p) => format!("a CA in {}", p.display()),
        None => "a CA of the system trust store".to_owned(),
    };
    let config = match client_config(ca_path, None) {
        Ok(c) => Arc::new(c),
        Err(e) => return Some(format!("TLS: {e}")),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).ok()?;
    let mut conn = rustls::ClientConnection::new(config, name).ok()?;
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let timeout = Duration::from_secs(5);
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.set_write_timeout(Some(timeout)).ok()?;
    let err = loop {
        if !conn.is_handshaking() {
            return None;
        }
        if conn.wants_write() {
            if conn.write_tls(&mut sock).is_err() {
                return None;
            }
            continue;
        }
        match conn.read_tls(&mut sock) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(&mut sock);
            let _ = sock.flush();
            break e;
        }
    };
    let what = format!("the certificate of {host}:{port}");
    let detail = match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!("{what} is not signed by {trust}"),
            C::NotValidForNameContext {
                expected,
                presented,
            } => {
                // rustls shows the names as `DnsName("x")` / `IpAddress(…)`: keep the name.
                let bare = |n: &str| {
                    n.trim_start_matches("DnsName(\"")
                        .trim_end_matches("\")")
                        .to_owned()
                };
                let names: Vec<String> = presented.iter().map(|n| bare(n)).collect();
                format!(
                    "{what} is for {}, not {:?}",
                    names.join(", "),
                    expected.to_str()
                )
            }
            C::NotValidForName => format!("{what} is not valid for the name {host:?}"),
            C::Expired | C::ExpiredContext { .. } => format!("{what} has expired"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("{what} is not valid yet (is this box's clock right?)")
            }
            C::Revoked => format!("{what} is revoked"),
            other => format!("{what} is refused: {other:?}"),
        },
        other => format!("handshake with {host}:{port} failed: {other}"),
    };
    Some(format!("TLS: {detail}"))
}
