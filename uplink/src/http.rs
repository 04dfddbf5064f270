//! The HTTPS client of the uplinks that speak HTTP (Kinesis, Pub/Sub): hyper's pooled client
//! over rustls on `ring` ([`crate::tls`]), HTTP/1.1, `https://` or (for local test servers and
//! emulators) plain `http://`, with one timeout for the whole exchange.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::time::Duration;

pub use hyper::{HeaderMap, Method, Request, StatusCode, header};

/// The largest response body read (upstream answers are small; an error page is cut).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Why an exchange failed before an HTTP status arrived.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Connecting, TLS, or the exchange itself failed.
    #[error("{0}")]
    Transport(String),
    /// No complete answer within the request timeout.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// A pooled HTTPS client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client verifying servers against `ca_path` (else the system trust store), giving up
    /// on an exchange after `timeout`.
    pub fn new(
        ca_path: Option<&Path>,
        timeout: Duration,
    ) -> Result<HttpClient, crate::tls::TlsSetupError> {
        let tls = crate::tls::client_config(ca_path, None)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(HttpClient { client, timeout })
    }

    /// Sends `req` and reads the whole answer, within the timeout.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response, HttpError> {
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(describe(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| HttpError::Transport(format!("reading the answer failed: {e}")))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))?
    }
}

/// The error and its causes in one line ("client error (Connect): tcp connect error:
/// Connection refused").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
