//! The command line.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// ferry: an edge IoT ingestion gateway. Devices publish over MQTT and HTTP; ferry keeps every
/// acknowledged reading on disk until the upstream (Kafka, MQTT) has it.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run(RunArgs),
    /// Validate a config file: prints every problem with its key path and exits 64, or exits 0.
    CheckConfig {
        /// The TOML file to check (FERRY_* environment overrides apply too).
        file: PathBuf,
        /// Also print what each uplink will use: its keys with every default filled in,
        /// what a Kafka `cloud` preset derived, and the librdkafka properties. Secrets are
        /// shown as ***.
        #[arg(long)]
        explain: bool,
    },
    /// Inspect or repair a buffer, stopped or running.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Ask a running ferry how it is doing (GET /api/status) and print a short table. Exits 1
    /// if it cannot be reached, 2 if data is not getting out.
    Status(StatusArgs),
    /// Try ferry in one command: a temporary buffer, an in-process Kafka mock as the upstream,
    /// and simulated sensors over MQTT and HTTP. Open the printed URL; press Enter to simulate
    /// an upstream outage.
    Demo(DemoArgs),
}

/// Arguments of `ferry status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Base URL of the status endpoints: the HTTP listener, or `status.listen`.
    #[arg(
        long,
        env = "FERRY_STATUS_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Bearer token (`status.token`), if one is configured.
    #[arg(long, env = "FERRY_STATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the raw JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulate an upstream outage (15 s) every this many seconds, as well as on Enter.
    #[arg(long, value_name = "SECS")]
    pub outage_every: Option<u64>,
    /// How long each simulated outage lasts, in seconds.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub outage_secs: u64,
    /// Number of simulated sensors (about two thirds publish over MQTT, the rest over HTTP).
    #[arg(long, default_value_t = 6)]
    pub sensors: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
}

impl Default for Command {
    fn default() -> Self {
        Command::Run(RunArgs::default())
    }
}

/// Arguments of `ferry run`.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Config file (TOML). Without one, ferry runs on its built-in defaults plus FERRY_*
    /// environment overrides.
    #[arg(long, short, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `ferry buffer …`
#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Counters, cursors and backlog of a buffer. Read-only: works while ferry runs and after a
    /// crash, and never changes the file.
    Stats(DataDirArg),
    /// Decode every segment and dead letter and check checksums and counters. Read-only, like
    /// `stats`. Exits 1 if a problem is found.
    Verify(DataDirArg),
    /// Repair a buffer that was not closed cleanly, as ferry does on start (a file beyond
    /// repair is moved aside into quarantine). The gateway must be stopped.
    Repair(DataDirArg),
    /// Dead-letter table.
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
    /// Write the readings still in the buffer as NDJSON (one JSON envelope a line, with the
    /// `ferry_id` each is sent with), acking nothing: to carry a site's backlog out when its
    /// link is down. Read-only, like `stats`; also reads what is intact of a damaged or
    /// quarantined file (give its folder: a file named `buffer.redb` in it), skipping and
    /// listing the segments that fail their checksum (exit 1 then).
    Export(ExportArgs),
    /// Append the readings of an export to this buffer, keeping the `ferry_id` they were
    /// exported with, so consumers de-duplicate them against the first gateway's. Every line
    /// is checked before any is added. The gateway must be stopped: this opens the buffer
    /// for writing.
    Import(ImportArgs),
    /// Read what is intact of a buffer file redb cannot open (one moved to `quarantine/`)
    /// and write its readings as an export does, for `ferry buffer import`. Segments that
    /// fail their checksum are lost; older copies of segments already forwarded may come back
    /// (consumers de-duplicate them by `ferry-id`). Never changes the file.
    Salvage(SalvageArgs),
}

/// Arguments of `ferry buffer salvage`.
#[derive(Debug, Args)]
pub struct SalvageArgs {
    /// The damaged file, e.g. `/var/lib/ferry/quarantine/buffer-1764000000000.redb`.
    pub file: PathBuf,
    /// The `gateway.id` of the gateway that wrote it (the file's own record of it is in the
    /// part redb cannot read).
    #[arg(long)]
    pub gateway_id: String,
    /// Write to this file (replaced only once complete) instead of stdout.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Arguments of `ferry buffer export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// ferry's data directory (gateway.data_dir).
    #[arg(long, default_value = "./ferry-data")]
    pub data_dir: PathBuf,
    /// Write to this file (replaced only once the export is complete) instead of stdout.
    /// Needed while ferry runs.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Only readings whose topic matches one of these MQTT topic filters (repeatable).
    #[arg(long)]
    pub topic: Vec<String>,
    /// Only readings received at or after this time (RFC 3339, or ms since the epoch).
    #[arg(long)]
    pub since: Option<String>,
    /// Only readings received before this time (RFC 3339, or ms since the epoch).
    #[arg(long)]
    pub until: Option<String>,
    /// The gateway id to name the readings with, when the file does not record it (a buffer
    /// last written by ferry 0.1). Default: the one recorded in the file.
    #[arg(long)]
    pub gateway_id: Option<String>,
}

/// Arguments of `ferry buffer import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// ferry's data directory (gateway.data_dir).
    #[arg(long, default_value = "./ferry-data")]
    pub data_dir: PathBuf,
    /// The export (NDJSON); `-` reads stdin.
    pub file: PathBuf,
}

/// `ferry buffer dead-letter …`
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters (read-only, like `stats`).
    List {
        #[command(flatten)]
        dir: DataDirArg,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only readings with an id above this.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Put dead letters back into the stream (all, or the given reading ids). The gateway must
    /// be stopped: this opens the buffer for writing.
    Requeue {
        #[command(flatten)]
        dir: DataDirArg,
        /// Reading ids to requeue; all when none are given.
        ids: Vec<u64>,
    },
}

/// The data directory argument.
#[derive(Debug, Args)]
pub struct DataDirArg {
    /// ferry's data directory (gateway.data_dir).
    #[arg(long, default_value = "./ferry-data")]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
