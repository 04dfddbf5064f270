//! The accept loop: hyper's HTTP/1.1 connection builder serving the axum [`Router`], with
//!
//! - `header_read_timeout(http.header_timeout_ms)` (hyper, needs the tokio timer): a client
//!   that trickles its headers (slowloris), or idles on a keep-alive connection, is dropped;
//!   the body gets `http.body_timeout_ms` from tower-http's `RequestBodyTimeoutLayer`;
//! - a cap of `http.max_connections` concurrent connections: a semaphore permit is taken
//!   *before* `accept`, so extra clients wait in the kernel backlog instead of costing memory;
//! - optional TLS (rustls on ring), the handshake bounded by the header timeout;
//! - graceful shutdown (hyper-util `GracefulShutdown`): on shutdown the listener closes,
//!   each connection finishes the request it is serving (its ack included) and closes.

use super::stats::HttpStats;
use axum::Router;
use ferry_config::{HttpSettings, HttpTls};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("cannot read certificates from {path}: {message}")]
    Certs {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The key file could not be read.
    #[error("cannot read the private key from {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the pair.
    #[error("the certificate and key cannot be used: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads `[http.tls]` into a TLS acceptor (rustls with the ring provider, HTTP/1.1 ALPN).
pub fn load_tls(tls: &HttpTls) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cert_path = tls.cert_path.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: cert_path,
            message: "the file holds no PEM certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_path).map_err(|e| TlsError::Key {
        path: tls.key_path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP listener: a bound socket and the router it serves.
pub struct HttpServer {
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    stats: Arc<HttpStats>,
    max_connections: usize,
    header_timeout: Duration,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// A server for `router` on an already bound `listener`.
    pub fn new(
        listener: TcpListener,
        router: Router,
        settings: &HttpSettings,
        tls: Option<TlsAcceptor>,
        stats: Arc<HttpStats>,
    ) -> HttpServer {
        HttpServer {
            listener,
            router,
            tls,
            stats,
            max_connections: settings.max_connections.max(1),
            header_timeout: Duration::from_millis(settings.header_timeout_ms.max(1)),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting and waits for the requests in
    /// flight to be answered.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let HttpServer {
            listener,
            router,
            tls,
            stats,
            max_connections,
            header_timeout,
        } = self;
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(max_connections));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        tokio::pin!(shutdown);
        let mut warned_full = false;
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            };
            if permits.available_permits() == 0 && !warned_full {
                warned_full = true;
                tracing::warn!(
                    max_connections,
                    "The HTTP listener reached http.max_connections; new clients wait until a connection closes."
                );
            }
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "The HTTP listener could not accept a connection.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(router.clone());
            let watcher = graceful.watcher();
            let stats = stats.clone();
            stats.connection(true);
            match &tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let fut = watcher.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = fut.await {
                            tracing::debug!(peer = %peer, error = %e, "An HTTP connection ended with an error.");
                        }
                        stats.connection(false);
                        drop(permit);
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let builder = builder.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => {
                                let conn = builder.serve_connection(TokioIo::new(tls_stream), svc);
                                if let Err(e) = watcher.watch(conn).await {
                                    tracing::debug!(peer = %peer, error = %e, "An HTTPS connection ended with an error.");
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "A TLS handshake on the HTTP listener failed.")
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer, "A TLS handshake on the HTTP listener timed out.")
                            }
                        }
                        stats.connection(false);
                        drop(permit);
                    });
                }
            }
        }
        drop(listener);
        tracing::info!(
            connections = graceful.count(),
            "The HTTP listener stopped accepting; open connections finish their current request."
        );
        graceful.shutdown().await;
        tracing::info!("The HTTP listener is closed.");
    }
}
