//! Where an AWS uplink's credentials come from, in the order the AWS SDKs use:
//!
//! 1. `access_key_id` + `secret_access_key` (+ `session_token`) in the uplink's table;
//! 2. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 3. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`),
//!    section `profile` (else `AWS_PROFILE`, else `default`);
//! 4. the ECS container endpoint (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` on 169.254.170.2,
//!    or `AWS_CONTAINER_CREDENTIALS_FULL_URI` with `AWS_CONTAINER_AUTHORIZATION_TOKEN`);
//! 5. the EC2 instance metadata service, IMDSv2 (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, else
//!    169.254.169.254; `AWS_EC2_METADATA_DISABLED=true` skips it).
//!
//! Credentials with an expiry (4 and 5) are fetched again [`REFRESH_BEFORE`] ahead of it; the
//! others are read again every [`REREAD_AFTER`], so a rotated key file is picked up without a
//! restart. [`Chain::invalidate`] forgets them after the upstream refused them.

use super::sigv4::Credentials;
use crate::http::{HttpClient, Method, Request};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Credentials that expire are fetched again this long before they do.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Credentials without an expiry are read again after this long.
pub const REREAD_AFTER: Duration = Duration::from_secs(3600);
/// How long the container and instance metadata endpoints may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// No source had credentials.
#[derive(Debug, thiserror::Error)]
#[error("no AWS credentials: {0}")]
pub struct CredentialsError(pub String);

/// The credentials configured in the uplink's table.
#[derive(Debug, Clone, Default)]
pub struct Configured {
    /// `access_key_id`, `secret_access_key`, `session_token`.
    pub keys: Option<Credentials>,
    /// `profile`.
    pub profile: Option<String>,
}

struct Cached {
    creds: Credentials,
    /// When to fetch again.
    renew_at: SystemTime,
}

/// The credential chain of one uplink.
pub struct Chain {
    configured: Configured,
    metadata: HttpClient,
    cached: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("profile", &self.configured.profile)
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Chain {
    /// A chain starting with `configured`.
    pub fn new(configured: Configured) -> Result<Chain, crate::tls::TlsSetupError> {
        Ok(Chain {
            configured,
            metadata: HttpClient::new(None, METADATA_TIMEOUT)?,
            cached: Mutex::new(None),
        })
    }

    /// Current credentials, from the cache or the first source that has some.
    pub async fn get(&self) -> Result<Credentials, CredentialsError> {
        let now = SystemTime::now();
        if let Some(c) = self.lock().as_ref().filter(|c| c.renew_at > now) {
            return Ok(c.creds.clone());
        }
        let (creds, expires) = self.resolve().await?;
        let renew_at = renew_at(now, expires);
        *self.lock() = Some(Cached {
            creds: creds.clone(),
            renew_at,
        });
        Ok(creds)
    }

    /// Forgets the cached credentials (the upstream refused them).
    pub fn invalidate(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn resolve(&self) -> Result<(Credentials, Option<SystemTime>), CredentialsError> {
        if let Some(k) = &self.configured.keys {
            return Ok((k.clone(), None));
        }
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            let creds = Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: env("AWS_SESSION_TOKEN"),
            };
            return Ok((creds, None));
        }
        let mut tried = Vec::new();
        match self.shared_file() {
            Ok(c) => return Ok((c, None)),
            Err(why) => tried.push(why),
        }
        match self.container().await {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => {}
            Err(why) => tried.push(why),
        }
        if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            tried.push("instance metadata: disabled by AWS_EC2_METADATA_DISABLED".into());
        } else {
            match self.instance().await {
                Ok(c) => return Ok(c),
                Err(why) => tried.push(why),
            }
        }
        Err(CredentialsError(format!(
            "none in the uplink's table or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; {}",
            tried.join("; ")
        )))
    }

    fn shared_file(&self) -> Result<Credentials, String> {
        let path = match env("AWS_SHARED_CREDENTIALS_FILE") {
            Some(p) => PathBuf::from(p),
            None => match env("HOME") {
                Some(h) => PathBuf::from(h).join(".aws").join("credentials"),
                None => return Err("shared credentials file: HOME is not set".into()),
            },
        };
        let profile = self
            .configured
            .profile
            .clone()
            .or_else(|| env("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("shared credentials file {}: {e}", path.display()))?;
        parse_profile(&text, &profile).ok_or_else(|| {
            format!(
                "shared credentials file {}: no keys in profile [{profile}]",
                path.display()
            )
        })
    }

    async fn container(&self) -> Result<Option<(Credentials, Option<SystemTime>)>, String> {
        let url = match (
            env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            env("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ) {
            (Some(rel), _) => format!("http://169.254.170.2{rel}"),
            (None, Some(full)) => full,
            (None, None) => return Ok(None),
        };
        let mut req = Request::builder().method(Method::GET).uri(&url);
        if let Some(token) = env("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            req = req.header("authorization", token);
        }
        let req = req
            .body(Bytes::new())
            .map_err(|e| format!("container credentials: {e}"))?;
        let body = self.fetch(req, "container credentials").await?;
        parse_metadata_json(&body).map(Some)
    }

    async fn instance(&self) -> Result<(Credentials, Option<SystemTime>), String> {
        let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|| "http://169.254.169.254".into());
        self.instance_at(base.trim_end_matches('/')).await
    }

    /// IMDSv2 at `base`: a session token, the role, then its credentials.
    async fn instance_at(&self, base: &str) -> Result<(Credentials, Option<SystemTime>), String> {
        let what = "instance metadata";
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{base}/latest/api/token"))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .body(Bytes::new())
            .map_err(|e| format!("{what}: {e}"))?;
        let token = self.fetch(req, what).await?;
        let token = String::from_utf8_lossy(&token).trim().to_string();
        let get = |path: String| {
            Request::builder()
                .method(Method::GET)
                .uri(format!("{base}{path}"))
                .header("x-aws-ec2-metadata-token", token.as_str())
                .body(Bytes::new())
                .map_err(|e| format!("{what}: {e}"))
        };
        let roles = self
            .fetch(
                get("/latest/meta-data/iam/security-credentials/".into())?,
                what,
            )
            .await?;
        let role = String::from_utf8_lossy(&roles)
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("{what}: the instance has no IAM role"))?;
        let body = self
            .fetch(
                get(format!("/latest/meta-data/iam/security-credentials/{role}"))?,
                what,
            )
            .await?;
        parse_metadata_json(&body)
    }

    async fn fetch(&self, req: Request<Bytes>, what: &str) -> Result<Bytes, String> {
        let resp = self
            .metadata
            .send(req)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if !resp.status.is_success() {
            return Err(format!("{what}: HTTP {}", resp.status.as_u16()));
        }
        Ok(resp.body)
    }
}

/// When credentials fetched at `now` that expire at `expires` are fetched again.
fn renew_at(now: SystemTime, expires: Option<SystemTime>) -> SystemTime {
    match expires {
        Some(at) => at.checked_sub(REFRESH_BEFORE).unwrap_or(now).max(now),
        None => now + REREAD_AFTER,
    }
}

/// The keys of `[profile]` in a shared credentials file.
fn parse_profile(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_section = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == profile;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

/// `{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}` of the container and instance
/// metadata endpoints.
fn parse_metadata_json(body: &[u8]) -> Result<(Credentials, Option<SystemTime>), String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        access_key_id: String,
        secret_access_key: String,
        token: Option<String>,
        expiration: Option<String>,
    }
    let a: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("the metadata credentials are not the expected JSON: {e}"))?;
    let expires = match a.expiration {
        Some(e) => Some(
            time::OffsetDateTime::parse(&e, &time::format_description::well_known::Rfc3339)
                .map(SystemTime::from)
                .map_err(|err| format!("the credentials' expiration {e:?}: {err}"))?,
        ),
        None => None,
    };
    Ok((
        Credentials {
            access_key_id: a.access_key_id,
            secret_access_key: a.secret_access_key,
            session_token: a.token,
        },
        expires,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_of_a_shared_credentials_file() {
        let text = "# comment\n[default]\naws_access_key_id = AKIDDEF\naws_secret_access_key=sdef\n\n\
                    [site]\naws_access_key_id=AKIDSITE\n aws_secret_access_key = ssite \naws_session_token=tok\n\
                    [half]\naws_access_key_id=AKIDHALF\n";
        let d = parse_profile(text, "default").unwrap();
        assert_eq!(
            (d.access_key_id.as_str(), d.secret_access_key.as_str()),
            ("AKIDDEF", "sdef")
        );
        assert_eq!(d.session_token, None);
        let s = parse_profile(text, "site").unwrap();
        assert_eq!(s.secret_access_key, "ssite");
        assert_eq!(s.session_token.as_deref(), Some("tok"));
        assert!(
            parse_profile(text, "half").is_none(),
            "no secret: no credentials"
        );
        assert!(parse_profile(text, "missing").is_none());
    }

    #[test]
    fn metadata_answers() {
        let (c, exp) = parse_metadata_json(
            br#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-12-02T20:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(c.access_key_id, "ASIA1");
        assert_eq!(c.session_token.as_deref(), Some("t"));
        let exp = exp.unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(exp.as_secs(), 1_796_241_600);
        assert!(parse_metadata_json(b"<html>").is_err());
    }

    #[test]
    fn expiring_credentials_are_renewed_ahead() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(renew_at(now, Some(now + hour)), now + hour - REFRESH_BEFORE);
        assert_eq!(
            renew_at(now, Some(now + Duration::from_secs(60))),
            now,
            "due at once"
        );
        assert_eq!(renew_at(now, None), now + REREAD_AFTER);
    }

    /// IMDSv2 against a local server that checks the token handshake.
    #[tokio::test]
    async fn instance_metadata_v2() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let c = c.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 4096];
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let first = req.lines().next().unwrap_or_default().to_string();
                    let has_token = req
                        .to_ascii_lowercase()
                        .contains("x-aws-ec2-metadata-token: tok-1");
                    let (status, body) = if first.starts_with("PUT /latest/api/token") {
                        ("200 OK", "tok-1".to_string())
                    } else if !has_token {
                        ("401 Unauthorized", String::new())
                    } else if first.starts_with("GET /latest/meta-data/iam/security-credentials/ ")
                    {
                        ("200 OK", "ferry-role\n".to_string())
                    } else if first
                        .starts_with("GET /latest/meta-data/iam/security-credentials/ferry-role ")
                    {
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        let exp = time::OffsetDateTime::now_utc() + time::Duration::seconds(60);
                        let exp = exp
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap();
                        (
                            "200 OK",
                            format!(
                                r#"{{"AccessKeyId":"ASIA{n}","SecretAccessKey":"s","Token":"t","Expiration":"{exp}"}}"#
                            ),
                        )
                    } else {
                        ("404 Not Found", String::new())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        let chain = Chain::new(Configured::default()).unwrap();
        let base = format!("http://{addr}");
        // Straight to the instance source: the environment of a test run is not ours to set.
        let (c1, exp) = chain_instance(&chain, &base).await;
        assert_eq!(c1.access_key_id, "ASIA0");
        assert!(exp.is_some());
        let (c2, _) = chain_instance(&chain, &base).await;
        assert_eq!(c2.access_key_id, "ASIA1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// The instance source at `base` (the variables that point the chain at it are the
    /// process's, not a test's to set).
    async fn chain_instance(chain: &Chain, base: &str) -> (Credentials, Option<SystemTime>) {
        chain.instance_at(base).await.unwrap()
    }
}
