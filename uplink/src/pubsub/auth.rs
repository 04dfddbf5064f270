//! Access tokens for Pub/Sub, in this order:
//!
//! 1. An `http://` endpoint (the emulator): none.
//! 2. A service account key (`credentials_file`, else the file named by
//!    `GOOGLE_APPLICATION_CREDENTIALS`): ferry signs its own access token, a self-signed JWT
//!    (RS256, `kid` = the key's id, `iss` = `sub` = the account's email, `aud` =
//!    `https://pubsub.googleapis.com/`, valid one hour), which Google APIs accept without a
//!    token exchange. It is reused until 5 minutes before it expires.
//! 3. The GCE metadata server's token for the instance's default service account
//!    (`http://metadata.google.internal/...`, or the host in `GCE_METADATA_HOST`), fetched
//!    again 5 minutes before it expires.
//!
//! The private key is parsed once, at start-up, into a `ring` key pair; its PEM is kept
//! nowhere, and no `Debug` output, log line or error names anything but the account's email
//! and the key's id.

use crate::http::{HttpClient, Method, Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The audience of self-signed JWTs: the Pub/Sub API.
pub const AUDIENCE: &str = "https://pubsub.googleapis.com/";
/// How long a self-signed JWT is valid (Google accepts at most one hour).
const JWT_LIFETIME_S: u64 = 3600;
/// A token is replaced this long before it expires.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// The metadata server's host unless `GCE_METADATA_HOST` says otherwise.
const METADATA_HOST: &str = "metadata.google.internal";
const METADATA_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// Why the credentials could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The key file could not be read.
    #[error("cannot read the service account key {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not a usable service account key (the message never quotes the file).
    #[error("the service account key {path} is not usable: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A service account key, parsed. `Debug` shows the email and the key id only.
pub struct ServiceAccount {
    client_email: String,
    private_key_id: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key_id: String,
    private_key: String,
}

impl ServiceAccount {
    /// Loads a service account key file (the JSON Google hands out).
    pub fn load(path: &Path) -> Result<ServiceAccount, CredentialsError> {
        let text = std::fs::read(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| CredentialsError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the JSON of a key file; the error never quotes it.
    pub fn parse(json: &[u8]) -> Result<ServiceAccount, String> {
        let file: KeyFile = serde_json::from_slice(json).map_err(|e| {
            // serde_json's message may quote a value of the file: give the position only,
            // and the missing field name, which is not secret.
            let msg = e.to_string();
            match msg.find("missing field") {
                Some(i) => msg[i..].split(" at line").next().unwrap_or("").to_owned(),
                None => format!(
                    "not a service account key JSON (error at line {} column {})",
                    e.line(),
                    e.column()
                ),
            }
        })?;
        if let Some(kind) = file.kind.as_deref()
            && kind != "service_account"
        {
            return Err(format!(
                "its type is {kind:?}, not \"service_account\" (user credentials are not supported)"
            ));
        }
        let der = pem_pkcs8(&file.private_key)?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| format!("its private_key is not an RSA key ferry can use ({e})"))?;
        Ok(ServiceAccount {
            client_email: file.client_email,
            private_key_id: file.private_key_id,
            key,
        })
    }

    /// The account's email.
    pub fn email(&self) -> &str {
        &self.client_email
    }

    /// The JWT's header and claims, base64url-encoded and joined by `.`: what is signed.
    /// Fields are written in a fixed order, so the same inputs give the same bytes.
    pub fn signing_input(&self, audience: &str, iat: u64) -> String {
        let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let header = format!(
            "{{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":{}}}",
            s(&self.private_key_id)
        );
        let claims = format!(
            "{{\"iss\":{email},\"sub\":{email},\"aud\":{},\"iat\":{iat},\"exp\":{}}}",
            s(audience),
            iat + JWT_LIFETIME_S,
            email = s(&self.client_email),
        );
        let mut out = URL_SAFE_NO_PAD.encode(header);
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims));
        out
    }

    /// A self-signed JWT for `audience`, issued at `iat` (seconds since the epoch), valid one
    /// hour: the signing input, `.`, and its RS256 (RSA PKCS#1 v1.5, SHA-256) signature.
    pub fn jwt(&self, audience: &str, iat: u64) -> Result<String, String> {
        let mut out = self.signing_input(audience, iat);
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                out.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the access token failed".to_owned())?;
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(out)
    }
}

/// The DER of the first `PRIVATE KEY` block of a PEM text (PKCS#8, as Google issues it).
fn pem_pkcs8(pem: &str) -> Result<Vec<u8>, String> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = pem
        .find(BEGIN)
        .ok_or("its private_key is not a PEM \"PRIVATE KEY\" (PKCS#8) block")?
        + BEGIN.len();
    let len = pem[start..]
        .find(END)
        .ok_or("its private_key PEM block has no END line")?;
    let b64: String = pem[start..start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD
        .decode(b64)
        .map_err(|_| "its private_key PEM block is not valid base64".to_owned())
}

/// Where tokens come from.
#[derive(Debug)]
enum Source {
    /// No credentials (an `http://` endpoint: the emulator).
    None,
    /// A service account key: self-signed JWTs.
    ServiceAccount(Box<ServiceAccount>),
    /// The GCE metadata server at this host (`host[:port]`).
    Metadata(String),
}

/// The header value handed out last, and when to replace it.
type Cached = Arc<Mutex<Option<(Arc<str>, Instant)>>>;

/// Hands out the `Authorization` header value of each request, cached and refreshed before it
/// expires. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auth {
    source: Arc<Source>,
    cached: Cached,
}

impl Auth {
    /// No credentials.
    pub fn none() -> Auth {
        Auth::with(Source::None)
    }

    /// Self-signed JWTs of `account`.
    pub fn service_account(account: ServiceAccount) -> Auth {
        Auth::with(Source::ServiceAccount(Box::new(account)))
    }

    /// The metadata server at `host` (`host[:port]`).
    pub fn metadata(host: &str) -> Auth {
        Auth::with(Source::Metadata(host.to_owned()))
    }

    fn with(source: Source) -> Auth {
        Auth {
            source: Arc::new(source),
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// The credentials for an uplink whose endpoint is `endpoint`, in the order of the module
    /// doc.
    pub fn from_config(
        endpoint: &str,
        credentials_file: Option<&Path>,
    ) -> Result<Auth, CredentialsError> {
        if endpoint.starts_with("http://") {
            return Ok(Auth::none());
        }
        let env_file = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(path) = credentials_file.map(Path::to_owned).or(env_file) {
            return Ok(Auth::service_account(ServiceAccount::load(&path)?));
        }
        let host = std::env::var("GCE_METADATA_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| METADATA_HOST.to_owned());
        Ok(Auth::metadata(&host))
    }

    /// What the credentials are, for the log (never a secret).
    pub fn describe(&self) -> String {
        match &*self.source {
            Source::None => "no credentials (plain http endpoint)".into(),
            Source::ServiceAccount(sa) => format!("service account {}", sa.email()),
            Source::Metadata(host) => format!("the GCE metadata server at {host}"),
        }
    }

    /// The `Authorization` header value for a request now, or `None` without credentials.
    pub async fn header(&self, http: &HttpClient) -> Result<Option<Arc<str>>, String> {
        if matches!(*self.source, Source::None) {
            return Ok(None);
        }
        let mut cached = self.cached.lock().await;
        if let Some((value, refresh_at)) = &*cached
            && Instant::now() < *refresh_at
        {
            return Ok(Some(value.clone()));
        }
        let (token, lifetime) = match &*self.source {
            Source::None => return Ok(None),
            Source::ServiceAccount(sa) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                (sa.jwt(AUDIENCE, now)?, Duration::from_secs(JWT_LIFETIME_S))
            }
            Source::Metadata(host) => metadata_token(http, host).await?,
        };
        let value: Arc<str> = format!("Bearer {token}").into();
        // Kept until 5 minutes before it expires, or half its life if that is shorter (a
        // metadata server may hand out a token that has only minutes left).
        let keep = lifetime.saturating_sub(REFRESH_BEFORE).max(lifetime / 2);
        *cached = Some((value.clone(), Instant::now() + keep));
        Ok(Some(value))
    }
}

/// Fetches a token from the metadata server at `host`: the token and how long it is valid.
async fn metadata_token(http: &HttpClient, host: &str) -> Result<(String, Duration), String> {
    let url = format!("http://{host}{METADATA_PATH}");
    let req = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .header("Metadata-Flavor", "Google")
        .header(header::ACCEPT, "application/json")
        .body(Bytes::new())
        .map_err(|e| format!("bad metadata server address {host:?}: {e}"))?;
    let resp = http.send(req).await.map_err(|e| {
        format!("cannot get an access token from the GCE metadata server at {host}: {e}")
    })?;
    if resp.status != StatusCode::OK {
        return Err(format!(
            "the GCE metadata server at {host} refused an access token ({})",
            resp.status
        ));
    }
    #[derive(serde::Deserialize)]
    struct TokenAnswer {
        access_token: String,
        expires_in: u64,
    }
    let answer: TokenAnswer = serde_json::from_slice(&resp.body).map_err(|_| {
        format!("the GCE metadata server at {host} answered something that is not a token")
    })?;
    Ok((answer.access_token, Duration::from_secs(answer.expires_in)))
}
