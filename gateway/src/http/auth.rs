//! Bearer-token authentication for the ingest endpoints (`[[http.tokens]]`).
//!
//! Tokens are compared in constant time ([`subtle`]); every configured token is compared, so
//! the time taken does not tell which one nearly matched. Tokens are never logged: only their
//! `name` (or their position in the list) is.

use super::problem::IngestError;
use axum::http::{HeaderMap, header};
use ferry_config::HttpToken;
use subtle::ConstantTimeEq;

/// Who sent a request, as far as the token says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    /// The token's label (`name`, else `tokens[i]`); `None` when ingest is open.
    pub token: Option<String>,
    /// The device the token is bound to, if any.
    pub device: Option<String>,
}

impl Principal {
    /// The device id for a reading that names `asked` (from the body or the `X-Ferry-Device`
    /// header), or `None` for the default. Fails if the token is bound to another device.
    pub fn device_for(&self, asked: Option<&str>) -> Result<Option<String>, IngestError> {
        match (&self.device, asked) {
            (Some(bound), Some(asked)) if bound != asked => Err(IngestError::Forbidden(format!(
                "the token {} is bound to device '{bound}' and may not submit readings for device '{asked}'",
                self.token.as_deref().unwrap_or("?")
            ))),
            (Some(bound), _) => Ok(Some(bound.clone())),
            (None, Some(asked)) => Ok(Some(asked.to_string())),
            (None, None) => Ok(None),
        }
    }
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Vec<(Vec<u8>, String, Option<String>)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// From `[[http.tokens]]`.
    pub fn new(cfg: &[HttpToken]) -> Tokens {
        Tokens {
            tokens: cfg
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        t.token.expose().as_bytes().to_vec(),
                        t.name.clone().unwrap_or_else(|| format!("tokens[{i}]")),
                        t.device.clone(),
                    )
                })
                .collect(),
        }
    }

    /// Whether ingest is open (no tokens configured).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks the `Authorization` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, IngestError> {
        if self.is_open() {
            return Ok(Principal::default());
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(IngestError::Unauthorized(
                "this endpoint needs an 'Authorization: Bearer <token>' header".into(),
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| {
                IngestError::Unauthorized(
                    "the Authorization header is not of the form 'Bearer <token>'".into(),
                )
            })?;
        let mut found: Option<&(Vec<u8>, String, Option<String>)> = None;
        for t in &self.tokens {
            // No early exit: every token is compared.
            if bool::from(t.0.as_slice().ct_eq(presented.as_bytes())) {
                found = Some(t);
            }
        }
        match found {
            Some((_, name, device)) => Ok(Principal {
                token: Some(name.clone()),
                device: device.clone(),
            }),
            None => Err(IngestError::Unauthorized(
                "the bearer token is not one of http.tokens".into(),
            )),
        }
    }
}
