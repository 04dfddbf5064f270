//! `[[mqtt.users]]`: username and password checks for CONNECT.
//!
//! Clear-text passwords are compared in constant time (`subtle`); `password_hash` values are
//! argon2 PHC strings verified with the `argon2` crate on a blocking thread (argon2 is
//! deliberately slow). Passwords are never logged.

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use ferry_config::{MqttSettings, Secret};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Why the `[[mqtt.users]]` table cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthConfigError {
    /// A `password_hash` is not a valid PHC string.
    #[error(
        "mqtt.users: the password_hash of user '{username}' is not a valid PHC string: {reason}"
    )]
    BadHash {
        /// The user.
        username: String,
        /// The parser's message.
        reason: String,
    },
    /// A user has neither a password nor a password hash.
    #[error("mqtt.users: user '{username}' has neither password nor password_hash")]
    NoPassword {
        /// The user.
        username: String,
    },
}

#[derive(Debug, Clone)]
enum Credential {
    Plain(Secret),
    Hash(Arc<str>),
}

/// What the credentials in a CONNECT are worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The client may connect.
    Allowed,
    /// Unknown user or wrong password (v3.1.1 0x04, v5 0x86).
    BadCredentials,
    /// No credentials while anonymous access is off (v3.1.1 0x05, v5 0x87).
    NotAuthorized,
}

/// The accounts of `[[mqtt.users]]` and the anonymous rule.
#[derive(Debug, Clone)]
pub struct Auth {
    users: HashMap<String, Credential>,
    allow_anonymous: bool,
}

impl Auth {
    /// Builds the table, checking every password hash parses.
    pub fn new(settings: &MqttSettings) -> Result<Auth, AuthConfigError> {
        let mut users = HashMap::new();
        for u in &settings.users {
            let cred = match (&u.password, &u.password_hash) {
                (_, Some(h)) => {
                    PasswordHash::new(h).map_err(|e| AuthConfigError::BadHash {
                        username: u.username.clone(),
                        reason: e.to_string(),
                    })?;
                    Credential::Hash(Arc::from(h.as_str()))
                }
                (Some(p), None) => Credential::Plain(p.clone()),
                (None, None) => {
                    return Err(AuthConfigError::NoPassword {
                        username: u.username.clone(),
                    });
                }
            };
            users.insert(u.username.clone(), cred);
        }
        Ok(Auth {
            users,
            allow_anonymous: settings.allow_anonymous,
        })
    }

    /// Checks a CONNECT's username and password (`None`: the client sent neither).
    pub async fn check(&self, login: Option<(&str, &str)>) -> AuthOutcome {
        let Some((username, password)) = login else {
            return if self.allow_anonymous {
                AuthOutcome::Allowed
            } else {
                AuthOutcome::NotAuthorized
            };
        };
        match self.users.get(username) {
            Some(Credential::Plain(expected)) => {
                if constant_time_eq(expected.expose().as_bytes(), password.as_bytes()) {
                    AuthOutcome::Allowed
                } else {
                    AuthOutcome::BadCredentials
                }
            }
            Some(Credential::Hash(hash)) => {
                let hash = hash.clone();
                let password = password.to_owned();
                let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
                    .await
                    .unwrap_or(false);
                if ok {
                    AuthOutcome::Allowed
                } else {
                    AuthOutcome::BadCredentials
                }
            }
            None => {
                // Same work as a wrong password, so a probe cannot tell users apart by time.
                let _ = constant_time_eq(b"ferry-no-such-user", password.as_bytes());
                AuthOutcome::BadCredentials
            }
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Verifies `password` against an argon2 PHC string.
pub fn verify_hash(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}
