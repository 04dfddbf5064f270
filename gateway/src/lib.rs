//! # ferry-gateway: the `ferry` binary's library
//!
//! Everything the binary does lives here so tests can call it: the command line ([`cli`]),
//! wiring and shutdown ([`app`]), logging ([`telemetry`]) and the buffer inspection commands
//! ([`buffer_cmd`]), and `ferry demo` ([`demo`]). The listeners and the status page
//! ([`status`]) are components under their own folders; each is a struct with a
//! `run(self, shutdown)` method.
//!
//! See docs/ARCHITECTURE.md for the flow from listener to buffer to uplink.

pub mod app;
pub mod buffer_cmd;
pub mod cli;
#[cfg(feature = "kafka")]
pub mod demo;
pub mod entry;
pub mod http;
pub mod mqtt;
pub mod status;
pub mod systemd;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
