//! `ferry buffer stats|verify|dead-letter list|requeue|repair`.
//!
//! The read-only commands never change the file, whether ferry runs, was killed, or stopped
//! cleanly ([`Inspector`] says how); they say on stderr which of the three it was.

use crate::cli::{BufferCommand, DataDirArg, DeadLetterCommand};
use ferry_buffer::{Buffer, BufferOptions, FileState, Inspector};
use std::fmt::Write as _;
use std::path::Path;

/// Why a buffer command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferCmdError {
    /// Opening the buffer failed.
    #[error(transparent)]
    Open(#[from] ferry_buffer::OpenError),
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] ferry_buffer::ReadError),
    /// No consistent view of the file.
    #[error(transparent)]
    Inspect(#[from] ferry_buffer::InspectError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] ferry_buffer::AckError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Set in the child process that reads a running gateway's file.
const CHILD_ENV: &str = "FERRY_INSPECT_CHILD";
/// Exit code of that child when every view was torn by a commit (EX_TEMPFAIL).
const EXIT_TORN: u8 = 75;
/// Child processes tried before giving up.
const CHILD_ATTEMPTS: usize = 4;

/// Runs a buffer command, printing to stdout. Returns the exit code.
pub fn run(cmd: BufferCommand) -> Result<u8, BufferCmdError> {
    let read_only_dir = match &cmd {
        BufferCommand::Stats(d) | BufferCommand::Verify(d) => Some(&d.data_dir),
        BufferCommand::DeadLetter(DeadLetterCommand::List { dir, .. }) => Some(&dir.data_dir),
        BufferCommand::DeadLetter(DeadLetterCommand::Requeue { .. }) | BufferCommand::Repair(_) => {
            None
        }
    };
    if let Some(dir) = read_only_dir
        && std::env::var_os(CHILD_ENV).is_none()
        && Inspector::in_use(dir)
    {
        return in_child();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        // redb's panics on a torn view are expected here and retried: keep them off stderr.
        std::panic::set_hook(Box::new(|_| {}));
    }
    run_here(cmd).or_else(|e| match e {
        BufferCmdError::Inspect(ferry_buffer::InspectError::Busy { .. })
            if std::env::var_os(CHILD_ENV).is_some() =>
        {
            Ok(EXIT_TORN)
        }
        e => Err(e),
    })
}

/// Runs this same command in a child process, again if it dies: a view of a running
/// gateway's file torn by a commit can abort redb (see [`Inspector`]), and that must cost
/// only an attempt, not the command.
fn in_child() -> Result<u8, BufferCmdError> {
    use std::io::Write as _;
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    for _ in 0..CHILD_ATTEMPTS {
        let out = std::process::Command::new(&exe)
            .args(&args)
            .env(CHILD_ENV, "1")
            .stdin(std::process::Stdio::null())
            .output()?;
        match out.status.code() {
            Some(code) if code != i32::from(EXIT_TORN) && code != 101 => {
                std::io::stdout().write_all(&out.stdout)?;
                std::io::stderr().write_all(&out.stderr)?;
                return Ok(u8::try_from(code).unwrap_or(1));
            }
            _ => {}
        }
    }
    eprintln!(
        "ferry buffer: the file changed while it was read (a running gateway committing), {CHILD_ATTEMPTS} times in a row; try again"
    );
    Ok(EXIT_TORN)
}

fn run_here(cmd: BufferCommand) -> Result<u8, BufferCmdError> {
    match cmd {
        BufferCommand::Stats(dir) => {
            let ((st, lags), state) = Inspector::consistent(&dir.data_dir, |ins| {
                let st = ins.stats()?;
                let lags: Vec<(String, ferry_buffer::Lag)> = st
                    .cursors
                    .keys()
                    .map(|c| Ok((c.clone(), ins.lag(c)?)))
                    .collect::<Result<_, ferry_buffer::ReadError>>()?;
                Ok((st, lags))
            })?;
            say_state(&dir.data_dir, state);
            if dir.json {
                let v = serde_json::json!({
                    "file_state": state_name(state),
                    "format_version": st.format_version,
                    "readings": st.readings,
                    "segments": st.segments,
                    "stored_bytes": st.stored_bytes,
                    "dead_letters": st.dead_letters,
                    "dead_letter_bytes": st.dead_letter_bytes,
                    "next_reading_id": st.next_reading_id,
                    "newest_segment": st.newest_segment,
                    "oldest_received_ms": st.oldest_received_ms,
                    "file_bytes": st.file_bytes,
                    "quarantined": st.quarantined,
                    "consumers": lags.iter().map(|(c, l)| (c.clone(), serde_json::json!({
                        "acked_segment": st.cursors.get(c),
                        "lag_readings": l.readings,
                        "lag_bytes": l.bytes,
                        "oldest_unsent_ms": l.oldest_received_ms,
                    }))).collect::<serde_json::Map<_, _>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let mut out = String::new();
                let _ = writeln!(
                    out,
                    "buffer          {}",
                    dir.data_dir.join(ferry_buffer::FILE_NAME).display()
                );
                let _ = writeln!(out, "format version  {}", st.format_version);
                let _ = writeln!(out, "readings        {}", st.readings);
                let _ = writeln!(out, "segments        {}", st.segments);
                let _ = writeln!(out, "stored bytes    {}", st.stored_bytes);
                let _ = writeln!(out, "file bytes      {}", st.file_bytes);
                let _ = writeln!(
                    out,
                    "dead letters    {} ({} bytes)",
                    st.dead_letters, st.dead_letter_bytes
                );
                let _ = writeln!(out, "next reading id {}", st.next_reading_id);
                if let Some(ms) = st.oldest_received_ms {
                    let age = ferry_buffer::now_ms().saturating_sub(ms) / 1000;
                    let _ = writeln!(out, "oldest reading  {age} s ago");
                }
                for (c, l) in &lags {
                    let _ = writeln!(
                        out,
                        "consumer {c:<6} acked segment {}, {} readings ({} bytes) not yet sent",
                        st.cursors.get(c).copied().unwrap_or(0),
                        l.readings,
                        l.bytes
                    );
                }
                for q in &st.quarantined {
                    let _ = writeln!(out, "QUARANTINED     {}", q.display());
                }
                print!("{out}");
            }
            Ok(0)
        }
        BufferCommand::Verify(dir) => {
            let (rep, state) = Inspector::consistent(&dir.data_dir, Inspector::verify)?;
            say_state(&dir.data_dir, state);
            if dir.json {
                println!(
                    "{}",
                    serde_json::json!({"segments": rep.segments, "readings": rep.readings, "problems": rep.problems})
                );
            } else {
                println!(
                    "{} segments, {} readings checked",
                    rep.segments, rep.readings
                );
                for p in &rep.problems {
                    println!("PROBLEM: {p}");
                }
                if rep.problems.is_empty() {
                    println!("ok");
                }
            }
            Ok(if rep.problems.is_empty() { 0 } else { 1 })
        }
        BufferCommand::DeadLetter(DeadLetterCommand::List { dir, limit, after }) => {
            let (list, state) =
                Inspector::consistent(&dir.data_dir, |ins| ins.dead_letters(after, limit))?;
            say_state(&dir.data_dir, state);
            print_dead(&dir, &list);
            Ok(0)
        }
        BufferCommand::DeadLetter(DeadLetterCommand::Requeue { dir, ids }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let n = rt.block_on(async {
                // No consumers (so nothing is acked or deleted) and no cap (so nothing is
                // evicted): requeue only moves dead letters back into the stream.
                let opts = BufferOptions {
                    max_bytes: u64::MAX,
                    when_full: ferry_buffer::WhenFull::Reject,
                    ..BufferOptions::default()
                };
                let buf = Buffer::open(&dir.data_dir, opts)?;
                let n = buf.requeue((!ids.is_empty()).then_some(ids)).await;
                buf.close().await;
                Ok::<_, BufferCmdError>(n?)
            })?;
            println!("{n} dead letters requeued");
            Ok(0)
        }
        BufferCommand::Repair(dir) => {
            // One open attempt tells; repairing a copy in memory first would do the work twice.
            if Inspector::file_state(&dir.data_dir)? == FileState::Closed {
                println!(
                    "{}: closed cleanly, nothing to repair",
                    buffer_file(&dir.data_dir)
                );
                return Ok(0);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                // Opening for writing repairs (or quarantines a file beyond repair); no
                // consumer and no cap, so nothing is acked or evicted.
                let opts = BufferOptions {
                    max_bytes: u64::MAX,
                    when_full: ferry_buffer::WhenFull::Reject,
                    ..BufferOptions::default()
                };
                let buf = Buffer::open(&dir.data_dir, opts)?;
                buf.close().await;
                Ok::<_, BufferCmdError>(())
            })?;
            println!("{}: repaired", buffer_file(&dir.data_dir));
            Ok(0)
        }
    }
}

fn buffer_file(data_dir: &Path) -> String {
    data_dir.join(ferry_buffer::FILE_NAME).display().to_string()
}

fn state_name(state: FileState) -> &'static str {
    match state {
        FileState::Closed => "closed",
        FileState::NotClosedCleanly => "not_closed_cleanly",
        FileState::InUse => "in_use",
    }
}

/// One line on stderr when the file was not simply closed.
fn say_state(data_dir: &Path, state: FileState) {
    let file = buffer_file(data_dir);
    match state {
        FileState::Closed => {}
        FileState::NotClosedCleanly => eprintln!(
            "{file}: not closed cleanly; ferry will repair it on start (`ferry buffer repair` does it now). These figures come from a repaired copy in memory; the file is unchanged."
        ),
        FileState::InUse => eprintln!(
            "{file}: in use by a running ferry; these figures are from the moment of reading, and the file is unchanged."
        ),
    }
}

fn print_dead(dir: &DataDirArg, list: &[ferry_buffer::DeadLetter]) {
    if dir.json {
        let v: Vec<_> = list
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.reading.id,
                    "topic": d.reading.topic,
                    "device": d.reading.device,
                    "uplink": d.consumer,
                    "reason": d.reason,
                    "dead_at_ms": d.dead_at_ms,
                    "payload_bytes": d.reading.payload.len(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no dead letters");
    }
    for d in list {
        println!(
            "{:>10}  {:<6}  {:<24}  {}  ({})",
            d.reading.id, d.consumer, d.reading.topic, d.reason, d.reading.device
        );
    }
}
