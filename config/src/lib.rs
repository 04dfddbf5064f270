//! ferry's configuration: one typed tree, loaded from a TOML file and `FERRY_*` environment
//! variables, and validated as a whole before anything starts.
//!
//! # The tree
//!
//! ```text
//! Config
//! ├── gateway        GatewaySettings   id, data_dir, shutdown_grace_ms, logging
//! ├── buffer         BufferSettings    size cap, full behaviour, group commit, compression, TTL
//! ├── mqtt           MqttSettings      MQTT listener
//! │   ├── users[]    MqttUser          [[mqtt.users]]
//! │   └── tls        MqttTls           [mqtt.tls] (optional)
//! ├── http           HttpSettings      HTTP ingestion listener
//! │   ├── tokens[]   HttpToken         [[http.tokens]]
//! │   └── tls        HttpTls           [http.tls] (optional)
//! ├── uplink         Uplinks
//! │   ├── kafka      KafkaUplink       [uplink.kafka], routes[] = [[uplink.kafka.routes]]
//! │   └── mqtt       MqttUplink        [uplink.mqtt], rewrites[] = [[uplink.mqtt.rewrites]]
//! └── status         StatusSettings    /status and /metrics
//! ```
//!
//! Every key is optional and has a default (see [`defaults`]); `Config::default()` is a valid
//! configuration. The `///` comment on each field is its user documentation, and
//! `config/ferry.example.toml` lists every key. Units are part of key names (`_ms`, `_secs`,
//! `_bytes`). Secrets (passwords, tokens) are [`Secret`]s, which print as `***` in `Debug` output.
//!
//! # Loading order
//!
//! [`load`] (or [`load_from_env`], which passes `std::env::vars()`):
//!
//! 1. reads and parses the TOML file, if a path is given (syntax errors carry `file:line:column`);
//! 2. applies the `FERRY_*` environment overrides on top of the file;
//! 3. checks every key against the tree: unknown keys are reported with their full path and the
//!    closest valid key (`buffer.max_byte: unknown key; did you mean 'max_bytes'?`), and every
//!    value of the wrong type is reported with its path;
//! 4. deserializes the result, with defaults for everything not set;
//! 5. runs [`Config::validate`] (ranges, formats, relations between keys).
//!
//! All problems from all stages are returned together as [`ConfigErrors`], one [`ConfigError`]
//! per problem with a key path such as `uplink.kafka.routes[2].filter`.
//!
//! # Environment overrides
//!
//! `FERRY_<PATH>` sets the key `<path>`, where `PATH` is the key path upper-cased with `.`
//! replaced by `_`: `FERRY_BUFFER_MAX_BYTES=1000000`, `FERRY_UPLINK_KAFKA_BROKERS=a:9092,b:9092`,
//! `FERRY_GATEWAY_DATA_DIR=/var/lib/ferry`. Names are resolved against the known key paths, so
//! underscores inside key names work. The value is parsed as a TOML value when it is one
//! (`1000000`, `true`, `[1, 2]`, `{ a = "b" }`), else taken as a string; keys that hold strings
//! always take the text as is. Whole lists and tables can be set as inline TOML, e.g.
//! `FERRY_HTTP_TOKENS='[{ token = "s3cret" }]'`; keys inside `[[...]]` lists cannot be set one
//! by one. Overrides create optional tables as needed (`FERRY_MQTT_TLS_CERT_PATH=...` enables
//! `[mqtt.tls]`).
//!
//! Variables not starting with `FERRY_` are ignored, and so are the few listed in
//! [`IGNORED_ENV_VARS`]. Any other `FERRY_*` variable that names no key is an error (with the
//! closest valid name), so a typo cannot silently leave a default in place.

pub mod defaults;
mod error;
mod load;
mod model;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{ConfigError, ConfigErrorKind, ConfigErrors};
pub use load::{
    ENV_PREFIX, IGNORED_ENV_VARS, env_var_name, key_paths, load, load_from_env, load_str,
};
pub use model::*;
pub use validate::{
    check_gateway_id, check_kafka_topic, check_topic_filter, template_placeholders,
};
