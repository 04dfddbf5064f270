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
