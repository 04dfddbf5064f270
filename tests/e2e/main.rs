//! ferry's end-to-end tests: one test binary (linking one is most of what a test costs in CI),
//! one module per `<component>_<aspect>`. Each starts the real `ferry` binary through
//! [`ferry_tests::Ferry`] and talks to it as devices, operators and uplinks do. Where the test
//! for a given behaviour lives: docs/ARCHITECTURE.md, "Where is the test for X".
//!
//! Run one module with `cargo test -p ferry-tests --test e2e MODULE::`.

mod buffer_corruption;
mod buffer_crash;
mod buffer_disk_full;
mod cli_commands;
mod deploy_systemd;
mod gateway_crash_loop;
mod gateway_security;
mod gateway_upgrade;
mod http_hostile;
mod http_ingest;
mod mqtt_broker;
mod mqtt_hostile;
mod mqtt_ingest;
mod mqtt_kill;
mod mqtt_mosquitto;
mod status_api;
mod status_browser;
mod status_demo;
mod support;
mod uplink_downlink;
mod uplink_kafka;
mod uplink_kafka_tls;
mod uplink_kinesis;
mod uplink_mqtt;
mod uplink_outage;
mod uplink_pubsub;
