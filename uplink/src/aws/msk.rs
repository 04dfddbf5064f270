//! The SASL OAUTHBEARER token of Amazon MSK's IAM access control (`cloud = "msk-iam"`).
//!
//! The token is what AWS's own signers (`aws-msk-iam-sasl-signer-*`) produce: the URL
//! `https://kafka.REGION.amazonaws.com/?Action=kafka-cluster%3AConnect`, presigned with
//! SigV4 for the service `kafka-cluster` and valid for [`TOKEN_LIFETIME`], with a
//! `User-Agent` parameter appended, base64url-encoded without padding. Its lifetime ends
//! [`TOKEN_LIFETIME`] after signing; librdkafka asks for a new one at 80% of it, so a token
//! never expires on an open connection, and new credentials from the chain (rotated keys,
//! refreshed instance-role credentials) are used from the next token on.

use super::credentials::{Chain, Configured};
use super::sigv4::{self, Credentials, Scope};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a token is valid (`X-Amz-Expires`), as AWS's signers set it.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// How long fetching credentials for one token may take.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);

/// A signed token and when it expires (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The token (base64url of the presigned URL).
    pub value: String,
    /// Its expiry, in milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// The token for `region`, signed with `creds` at `unix_secs`.
pub fn token(region: &str, creds: &Credentials, unix_secs: u64, user_agent: &str) -> Token {
    let amz_date = sigv4::amz_date(unix_secs);
    let host = format!("kafka.{region}.amazonaws.com");
    let url = sigv4::presign_get(
        &host,
        &[("Action", "kafka-cluster:Connect")],
        Scope {
            amz_date: &amz_date,
            region,
            service: "kafka-cluster",
        },
        TOKEN_LIFETIME.as_secs(),
        creds,
    );
    let url = format!("{url}&User-Agent={}", sigv4::uri_encode(user_agent));
    Token {
        value: URL_SAFE_NO_PAD.encode(url),
        expires_at_ms: ((unix_secs + TOKEN_LIFETIME.as_secs()) * 1000) as i64,
    }
}

/// Makes tokens for one uplink from its credential chain. librdkafka asks for them on the
/// producer's polling thread (a plain thread, not an async worker), which waits here for the
/// chain on the runtime of `handle`.
pub struct TokenSource {
    region: String,
    chain: Chain,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Why no token could be made; the text goes to librdkafka, which reports it as an
/// authentication error on the uplink's status.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The credential chain found nothing (or the metadata endpoints did not answer).
    #[error("MSK IAM token: {0}")]
    Credentials(String),
    /// Asked for on an async worker thread, where it cannot wait.
    #[error("MSK IAM token requested on an async worker thread")]
    WrongThread,
    /// No runtime to fetch credentials on.
    #[error("MSK IAM tokens need a tokio runtime")]
    NoRuntime,
}

impl TokenSource {
    /// A source for `region` with the configured credentials, fetching on the current runtime.
    pub fn new(region: &str, configured: Configured) -> Result<TokenSource, TokenError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| TokenError::NoRuntime)?;
        let chain = Chain::new(configured).map_err(|e| TokenError::Credentials(e.to_string()))?;
        Ok(TokenSource {
            region: region.to_owned(),
            chain,
            handle,
        })
    }

    /// A fresh token, signed now with the chain's current credentials; also the principal
    /// name librdkafka logs (the access key id, which is not a secret).
    pub fn generate(&self) -> Result<(Token, String), TokenError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(TokenError::WrongThread);
        }
        let creds = self
            .handle
            .block_on(async { tokio::time::timeout(CREDENTIALS_TIMEOUT, self.chain.get()).await })
            .map_err(|_| {
                TokenError::Credentials(format!(
                    "no AWS credentials within {} s",
                    CREDENTIALS_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| TokenError::Credentials(e.to_string()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let ua = concat!("ferry/", env!("CARGO_PKG_VERSION"));
        Ok((
            token(&self.region, &creds, now, ua),
            creds.access_key_id.clone(),
        ))
    }

    /// Forgets the cached credentials after the brokers refused a token made with them.
    pub fn invalidate(&self) {
        self.chain.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(session_token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: session_token.map(str::to_owned),
        }
    }

    /// Known answers from AWS's signer (PyPI `aws-msk-iam-sasl-signer-python` 1.0.2 on
    /// botocore 1.43.11), run with its clock fixed at 2025-01-02T03:04:05Z:
    /// `MSKAuthTokenProvider.__construct_auth_token("eu-west-1", Credentials(...))`.
    #[test]
    fn same_token_as_aws_signer() {
        const UA: &str = "aws-msk-iam-sasl-signer-python/1.0.2";
        let t = token("eu-west-1", &creds(None), 1_735_787_045, UA);
        assert_eq!(
            t.value,
            "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI1MDEwMiUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI1MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9YWJhNjliMDEwYmEyMzRiZmJiNmJiMDE4YjYzZDIyOTU2YWZmNzA1YzdmMGRhZTQ3MTU0NDFiNmI3ZWRjNGRhNiZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y"
        );
        assert_eq!(t.expires_at_ms, 1_735_787_945_000);

        let t = token(
            "eu-west-1",
            &creds(Some("FwoGZXIvYXdzEJr//////////wEaDH+session=token")),
            1_735_787_045,
            UA,
        );
        let url = String::from_utf8(URL_SAFE_NO_PAD.decode(&t.value).unwrap()).unwrap();
        assert_eq!(
            url,
            "https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20250102%2Feu-west-1%2Fkafka-cluster%2Faws4_request&X-Amz-Date=20250102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEJr%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEaDH%2Bsession%3Dtoken&X-Amz-Signature=14d8a628ea4575b854e9f6b63254114377df47f8728730df2561a5dfe4359af4&User-Agent=aws-msk-iam-sasl-signer-python%2F1.0.2"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn tokens_from_configured_keys_on_a_plain_thread() {
        let source = TokenSource::new(
            "us-east-1",
            Configured {
                keys: Some(creds(None)),
                profile: None,
            },
        )
        .unwrap();
        assert!(matches!(source.generate(), Err(TokenError::WrongThread)));
        let (t, principal) = std::thread::spawn(move || source.generate())
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(principal, "AKIDEXAMPLE");
        let url = String::from_utf8(URL_SAFE_NO_PAD.decode(&t.value).unwrap()).unwrap();
        assert!(
            url.starts_with(
                "https://kafka.us-east-1.amazonaws.com/?Action=kafka-cluster%3AConnect&"
            ),
            "{url}"
        );
        assert!(
            url.ends_with(concat!("&User-Agent=ferry%2F", env!("CARGO_PKG_VERSION"))),
            "{url}"
        );
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((t.expires_at_ms - now_ms - 900_000).abs() < 5_000, "{t:?}");
    }
}
