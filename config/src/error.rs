//! Configuration errors: every problem found, each with its key path.

use std::fmt;

/// What kind of problem a [`ConfigError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Io,
    /// The file is not valid TOML.
    Syntax,
    /// A key that does not exist in the configuration tree.
    UnknownKey,
    /// A value of the wrong type (string for a number, unknown enum variant, out of range integer).
    InvalidType,
    /// A well-typed value that breaks a rule (range, format, relation to another key).
    InvalidValue,
    /// A `FERRY_*` environment variable that names no key.
    Env,
    /// A file or directory other users can access although it holds secrets or readings
    /// (a private key readable by others, a data directory open to others).
    Permissions,
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is: a key path such as `buffer.max_bytes` or
    /// `uplinks.cloud.routes[2].filter`, an environment variable name (for
    /// [`ConfigErrorKind::Env`]), or `file:line:column` (for [`ConfigErrorKind::Syntax`]).
    pub path: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
    /// The kind of problem.
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    /// A new error.
    pub fn new(kind: ConfigErrorKind, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
            kind,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// `key` as one segment of a key path: as it is when it is a bare TOML key (`A-Z a-z 0-9 _ -`),
/// else quoted (`uplinks."my uplink"`).
pub(crate) fn path_segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Every problem found in a configuration, in the order found. Never empty when returned as an
/// error. `Display` prints one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn display_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// The problems.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// Iterates over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no problem.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problem reported for exactly `path`, if any.
    pub fn find(&self, path: &str) -> Option<&ConfigError> {
        self.0.iter().find(|e| e.path == path)
    }

    pub(crate) fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
