//! The `ferry` command: parse the command line, load the config, run. `src/main.rs` only
//! calls [`main`]; the e2e test crate builds the same entry point as its own binary, so cargo
//! always builds it before those tests run.

use crate::cli::{Cli, Command};
use crate::{app, buffer_cmd, status, telemetry};
use clap::Parser;
use std::process::ExitCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Exit code for a configuration error (EX_CONFIG is 78, but 64 = EX_USAGE is what
/// `ferry check-config` and operators' scripts expect).
const EXIT_CONFIG: u8 = 64;

/// Exit code when the buffer file was written by a newer ferry (65 = EX_DATAERR). The
/// systemd unit does not restart on it: restarting cannot help, an operator must act.
const EXIT_NEWER_BUFFER: u8 = 65;

/// Whether `e` or one of its sources is the buffer's "newer format" refusal.
fn is_newer_buffer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let open = err.downcast_ref::<ferry_buffer::OpenError>().or_else(|| {
            match err.downcast_ref::<app::StartError>() {
                // `#[error(transparent)]` hides the OpenError from `source()`.
                Some(app::StartError::Buffer(o)) => Some(o),
                _ => None,
            }
        });
        if matches!(
            open,
            Some(ferry_buffer::OpenError::UnsupportedFormat { .. })
        ) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Runs the `ferry` command line and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or_default() {
        Command::Run(args) => {
            let config = match ferry_config::load_from_env(args.config.as_deref()) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!(
                        "ferry: the configuration has {} problem(s):\n{errors}",
                        errors.len()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            telemetry::init(&config.gateway);
            ferry_uplink::fold::set_summary_every(std::time::Duration::from_secs(
                config.status.log_summary_secs,
            ));
            for w in config.warnings() {
                tracing::warn!(problem = %w, "The configuration has an unsafe setting; ferry runs anyway.");
            }
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "ferry stopped with an error.");
                    eprintln!("ferry: {e:#}");
                    if is_newer_buffer(e.as_ref()) {
                        ExitCode::from(EXIT_NEWER_BUFFER)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::CheckConfig { file, explain } => match ferry_config::load_from_env(Some(&file)) {
            Ok(config) => {
                for w in config.warnings() {
                    eprintln!("{}: warning: {w}", file.display());
                }
                if explain {
                    print!("{}", ferry_uplink::explain(&config));
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} problem(s):\n{errors}", file.display(), errors.len());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Buffer(cmd) => match buffer_cmd::run(cmd) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("ferry: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Status(args) => match status(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("ferry status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => match demo(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry demo: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn status(args: crate::cli::StatusArgs) -> Result<u8, BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(status::client::fetch(&args.url, args.token.as_deref()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::client::render(&report));
    }
    Ok(if report.summary.level == status::api::Level::Down {
        2
    } else {
        0
    })
}

#[cfg(not(feature = "kafka"))]
fn demo(_: crate::cli::DemoArgs) -> Result<(), BoxError> {
    Err("this build of ferry has no Kafka uplink, which the demo shows".into())
}

#[cfg(feature = "kafka")]
fn demo(args: crate::cli::DemoArgs) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()?;
    rt.block_on(crate::demo::run(args))?;
    Ok(())
}

fn run(config: ferry_config::Config) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()?;
    rt.block_on(async {
        let gateway = app::Gateway::start(config).await?;
        gateway.run(app::shutdown_signal()).await?;
        Ok::<(), BoxError>(())
    })
}
