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
//! ├── uplinks        BTreeMap<String, UplinkSettings>
//! │   └── NAME       UplinkSettings    [uplinks.NAME]: type, enabled, topics
//! │       └── kind   UplinkKind        the keys of the type:
//! │                  ├── Kafka(KafkaUplink)      type = "kafka", routes[] = [[uplinks.NAME.routes]]
//! │                  ├── Kinesis(KinesisUplink)  type = "kinesis": an Amazon Kinesis data stream
//! │                  ├── Mqtt(MqttUplink)        type = "mqtt", rewrites[] = [[uplinks.NAME.rewrites]]
//! │                  └── Pubsub(PubsubUplink)    type = "pubsub": a Google Cloud Pub/Sub topic
//! └── status         StatusSettings    /status and /metrics
//! ```
//!
//! Uplinks are named: any number of `[uplinks.NAME]` tables, each with a `type` and the keys of
//! that type, e.g.
//!
//! ```toml
//! [uplinks.cloud]
//! type = "kafka"
//! brokers = "k1:9092"
//!
//! [uplinks.local]
//! type = "mqtt"
//! topics = ["alarms/#"]
//! url = "mqtt://broker.lan"
//!
//! [uplinks.aws]
//! type = "kinesis"
//! stream = "arn:aws:kinesis:eu-west-1:123456789012:stream/readings"
//!
//! [uplinks.gcp]
//! type = "pubsub"
//! project = "my-project"
//! topic = "readings"
//! ```
//!
//! NAME (1 to 64 characters of `a-z 0-9 _ -`) also names the uplink's cursor in the buffer.
//! No uplink is configured by default; without one, ferry only buffers.
//!
//! Every key except an uplink's `type` and the names only the user knows (a Kinesis uplink's
//! `stream`, a Pub/Sub uplink's `project` and `topic`) is optional and has a default (see
//! [`defaults`]); `Config::default()` is a valid configuration. The `///` comment on each field
//! is its user documentation, and `config/ferry.example.toml` lists every key. Units are part
//! of key names (`_ms`, `_secs`, `_bytes`). Secrets (passwords, tokens, AWS secret keys) are
//! [`Secret`]s, which print as `***` in `Debug` output and are never echoed in errors.
//!
//! # Loading order
//!
//! [`load`] (or [`load_from_env`], which passes `std::env::vars()`):
//!
//! 1. reads and parses the TOML file, if a path is given (syntax errors carry `file:line:column`);
//! 2. applies the `FERRY_*` environment overrides on top of the file;
//! 3. checks every key against the tree: unknown keys are reported with their full path and the
//!    closest valid key (`buffer.max_byte: unknown key; did you mean 'max_bytes'?`), every
//!    value of the wrong type is reported with its path, and the keys of each uplink are
//!    checked against its `type` (`` uplinks.cloud.url: `url` is a key of type mqtt; this uplink
//!    is type kafka ``);
//! 4. deserializes the result, with defaults for everything not set;
//! 5. runs [`Config::validate`] (ranges, formats, relations between keys).
//!
//! All problems from all stages are returned together as [`ConfigErrors`], one [`ConfigError`]
//! per problem with a key path such as `uplinks.cloud.routes[2].filter`.
//!
//! # Environment overrides
//!
//! `FERRY_<PATH>` sets the key `<path>`, where `PATH` is the key path upper-cased with `.`
//! replaced by `_`: `FERRY_BUFFER_MAX_BYTES=1000000`, `FERRY_GATEWAY_DATA_DIR=/var/lib/ferry`.
//! Names are resolved against the known key paths, so underscores inside key names work.
//!
//! `FERRY_UPLINKS_<NAME>_<KEY>` sets `uplinks.<name>.<key>`, e.g.
//! `FERRY_UPLINKS_CLOUD_BROKERS=a:9092,b:9092`. KEY is a key an uplink takes (`type`,
//! `enabled`, `topics`, or a key of any type), upper-cased, and NAME the rest of the name; of
//! the ways to split a name, one whose NAME is an uplink of the file wins, then the one with the
//! longest KEY. NAME is the uplink of the file whose name, upper-cased with `-` as `_`, it is
//! (`FERRY_UPLINKS_EDGE_1_URL` sets `url` of `[uplinks.edge-1]`); otherwise the variable creates
//! the uplink NAME lower-cased, which then needs a `FERRY_UPLINKS_<NAME>_TYPE` too. ferry 0.1's
//! `FERRY_UPLINK_KAFKA_*` and `FERRY_UPLINK_MQTT_*` are errors naming the variable to use now.
//!
//! The value is parsed as a TOML value when it is one (`1000000`, `true`, `[1, 2]`,
//! `{ a = "b" }`), else taken as a string; keys that hold strings (in an uplink: in any type)
//! always take the text as is. Whole lists and tables can be set as inline TOML, e.g.
//! `FERRY_HTTP_TOKENS='[{ token = "s3cret" }]'` or `FERRY_UPLINKS_CLOUD_TOPICS='["a/#"]'`; keys
//! inside `[[...]]` lists cannot be set one by one. Overrides create optional tables as needed
//! (`FERRY_MQTT_TLS_CERT_PATH=...` enables `[mqtt.tls]`).
//!
//! Variables not starting with `FERRY_` are ignored, and so are the few listed in
//! [`IGNORED_ENV_VARS`]. Any other `FERRY_*` variable that names no key is an error (with the
//! closest valid name), so a typo cannot silently leave a default in place.

pub mod defaults;
mod error;
pub mod kafka_cloud;
mod load;
mod model;
pub mod topic;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{ConfigError, ConfigErrorKind, ConfigErrors};
pub use load::{
    ENV_PREFIX, IGNORED_ENV_VARS, env_var_name, key_paths, load, load_from_env, load_str,
    redacted_toml,
};
pub use model::*;
pub use validate::{
    check_endpoint, check_gateway_id, check_kafka_topic, check_pubsub_project, check_pubsub_topic,
    check_uplink_name,
};
