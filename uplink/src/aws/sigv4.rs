//! AWS Signature Version 4: the Kinesis uplink's request headers and the MSK IAM token's
//! presigned URL.
//!
//! Written here on `ring` (HMAC-SHA256, SHA-256), which the tree already links for rustls,
//! rather than with `aws-sigv4`, which would bring the smithy runtime crates into the edge
//! binary for about eighty lines of arithmetic. The known-answer tests below are AWS's own
//! published example, so a mistake here cannot pass them.

use ring::{digest, hmac};
use std::fmt::Write as _;

/// AWS credentials. `Debug` never shows the secret or the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (not a secret).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What is signed: the parts of an HTTP request that SigV4 covers.
#[derive(Debug)]
pub struct Signable<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The path, already URI-encoded (`/` for the JSON APIs).
    pub path: &'a str,
    /// The query string, already canonical (sorted, encoded); empty for none.
    pub query: &'a str,
    /// The headers to sign, names lower-case, `host` and `x-amz-date` among them.
    pub headers: &'a [(&'a str, &'a str)],
    /// The request body.
    pub body: &'a [u8],
}

/// Where and when: the credential scope and the request time.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// `x-amz-date`, `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
    /// The region, e.g. `us-east-1`.
    pub region: &'a str,
    /// The service, e.g. `kinesis`.
    pub service: &'a str,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

/// The canonical request of `req` and its signed-headers list.
fn canonical_request(req: &Signable<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    headers.sort();
    let mut canonical_headers = String::new();
    for (k, v) in &headers {
        let _ = writeln!(canonical_headers, "{k}:{v}");
    }
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        req.query,
        canonical_headers,
        signed,
        sha256_hex(req.body)
    );
    (canonical, signed)
}

/// `YYYYMMDD/REGION/SERVICE/aws4_request`.
fn credential_scope(scope: Scope<'_>) -> String {
    let date = &scope.amz_date[..scope.amz_date.len().min(8)];
    format!("{date}/{}/{}/aws4_request", scope.region, scope.service)
}

/// The value of the `Authorization` header for `req`.
pub fn authorization(req: &Signable<'_>, scope: Scope<'_>, creds: &Credentials) -> String {
    let (canonical, signed_headers) = canonical_request(req);
    let credential_scope = credential_scope(scope);
    let signature = signature(&canonical, scope, creds);
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id
    )
}

/// Percent-encodes `s` as SigV4 does: everything but `A-Z a-z 0-9 - _ . ~`.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A presigned `GET https://HOST/` URL (authentication in the query string, valid for
/// `expires_secs`): `params` first, then the `X-Amz-*` parameters, then `X-Amz-Signature`, in
/// the order AWS's SDKs write them.
pub fn presign_get(
    host: &str,
    params: &[(&str, &str)],
    scope: Scope<'_>,
    expires_secs: u64,
    creds: &Credentials,
) -> String {
    let expires = expires_secs.to_string();
    let credential = format!("{}/{}", creds.access_key_id, credential_scope(scope));
    let mut all: Vec<(&str, &str)> = params.to_vec();
    all.extend([
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", credential.as_str()),
        ("X-Amz-Date", scope.amz_date),
        ("X-Amz-Expires", expires.as_str()),
        ("X-Amz-SignedHeaders", "host"),
    ]);
    if let Some(token) = &creds.session_token {
        all.push(("X-Amz-Security-Token", token.as_str()));
    }
    let encoded: Vec<(String, String)> = all
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    let mut sorted = encoded.clone();
    sorted.sort();
    let join = |pairs: &[(String, String)]| {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let canonical_query = join(&sorted);
    let headers = [("host", host)];
    let (canonical, _) = canonical_request(&Signable {
        method: "GET",
        path: "/",
        query: &canonical_query,
        headers: &headers,
        body: b"",
    });
    let signature = signature(&canonical, scope, creds);
    format!(
        "https://{host}/?{}&X-Amz-Signature={signature}",
        join(&encoded)
    )
}

/// The hex signature of a canonical request.
fn signature(canonical: &str, scope: Scope<'_>, creds: &Credentials) -> String {
    let date = &scope.amz_date[..scope.amz_date.len().min(8)];
    let credential_scope = credential_scope(scope);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{credential_scope}\n{}",
        scope.amz_date,
        sha256_hex(canonical.as_bytes())
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(k_date.as_ref(), scope.region.as_bytes());
    let k_service = hmac(k_region.as_ref(), scope.service.as_bytes());
    let k_signing = hmac(k_service.as_ref(), b"aws4_request");
    hex(hmac(k_signing.as_ref(), string_to_sign.as_bytes()).as_ref())
}

/// `x-amz-date` for a Unix time in seconds.
pub fn amz_date(unix_secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_creds() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// AWS's worked example of Signature Version 4 (the IAM `ListUsers` request of
    /// 2015-08-30T12:36:00Z): its canonical request hash and signature are published.
    #[test]
    fn aws_published_example() {
        let headers = [
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("host", "iam.amazonaws.com"),
            ("x-amz-date", "20150830T123600Z"),
        ];
        let req = Signable {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            body: b"",
        };
        let (canonical, signed) = canonical_request(&req);
        assert_eq!(signed, "content-type;host;x-amz-date");
        assert_eq!(
            sha256_hex(canonical.as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let auth = authorization(
            &req,
            Scope {
                amz_date: "20150830T123600Z",
                region: "us-east-1",
                service: "iam",
            },
            &example_creds(),
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn dates_and_secrets() {
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(amz_date(0), "19700101T000000Z");
        let shown = format!(
            "{:?}",
            Credentials {
                session_token: Some("tok-secret".into()),
                ..example_creds()
            }
        );
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(
            !shown.contains("EXAMPLEKEY") && !shown.contains("tok-secret"),
            "{shown}"
        );
    }
}
