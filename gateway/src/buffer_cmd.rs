//! `ferry buffer stats|verify|dead-letter list|requeue|repair|export|import`.
//!
//! The read-only commands never change the file, whether ferry runs, was killed, or stopped
//! cleanly ([`Inspector`] says how); they say on stderr which of the three it was.

use crate::cli::{
    BufferCommand, DataDirArg, DeadLetterCommand, ExportArgs, ImportArgs, SalvageArgs,
};
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
    /// The async runtime could not start, or a file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An argument or an input line is wrong (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The buffer refused what was imported.
    #[error("the buffer refused the import: {0}")]
    Append(#[from] ferry_buffer::AppendError),
}

/// Exit code for a wrong argument or input (EX_USAGE, as for a bad config).
pub const EXIT_USAGE: u8 = 64;

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
        BufferCommand::Export(a) => Some(&a.data_dir),
        BufferCommand::DeadLetter(DeadLetterCommand::Requeue { .. })
        | BufferCommand::Repair(_)
        | BufferCommand::Import(_)
        | BufferCommand::Salvage(_) => None,
    };
    if let BufferCommand::Export(a) = &cmd
        && a.out.is_none()
        && std::env::var_os(CHILD_ENV).is_none()
        && Inspector::in_use(&a.data_dir)
    {
        eprintln!(
            "ferry buffer export: ferry is running on {}; give --out FILE (an export of a running gateway's file may have to be read again, and only a complete one is written)",
            buffer_file(&a.data_dir)
        );
        return Ok(EXIT_USAGE);
    }
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
        BufferCmdError::Usage(msg) => {
            eprintln!("ferry buffer: {msg}");
            Ok(EXIT_USAGE)
        }
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
        BufferCommand::Export(args) => export(&args),
        BufferCommand::Import(args) => import(&args),
        BufferCommand::Salvage(args) => salvage(&args),
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

/// A time argument: RFC 3339 or ms since the epoch.
fn time_arg(name: &str, v: Option<&str>) -> Result<Option<u64>, BufferCmdError> {
    let Some(v) = v else { return Ok(None) };
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(Some(ms));
    }
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            BufferCmdError::Usage(format!(
                "--{name} '{v}' is neither RFC 3339 (2026-12-01T08:00:00Z) nor ms since the epoch: {e}"
            ))
        })?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map(Some)
        .map_err(|_| BufferCmdError::Usage(format!("--{name} '{v}' is before 1970")))
}

/// `ferry buffer export`.
fn export(args: &ExportArgs) -> Result<u8, BufferCmdError> {
    use std::io::Write as _;
    if let Some(g) = &args.gateway_id {
        ferry_config::check_gateway_id(g)
            .map_err(|e| BufferCmdError::Usage(format!("--gateway-id '{g}': {e}")))?;
    }
    for f in &args.topic {
        ferry_config::topic::check_filter(f)
            .map_err(|e| BufferCmdError::Usage(format!("--topic '{f}': {e}")))?;
    }
    let topics = if args.topic.is_empty() {
        ferry_uplink::topics::TopicFilter::all()
    } else {
        ferry_uplink::topics::TopicFilter::new(&args.topic)
    };
    let since = time_arg("since", args.since.as_deref())?.unwrap_or(0);
    let until = time_arg("until", args.until.as_deref())?.unwrap_or(u64::MAX);
    // Written to a temporary file first: a view of a running gateway's file may have to be
    // taken again, and --out is replaced only by a complete export.
    let tmp_dir = staging_dir(args.out.as_deref());
    let ((tmp, rep, exported, gateway), state) = Inspector::consistent(&args.data_dir, |ins| {
        let gateway = match &args.gateway_id {
            Some(g) => g.clone(),
            None => ins.gateway_id()?.unwrap_or_default(),
        };
        let mut tmp = match tempfile::NamedTempFile::new_in(&tmp_dir) {
            Ok(t) => t,
            Err(e) => return Ok((Err(e), Default::default(), 0, gateway)),
        };
        if gateway.is_empty() {
            return Ok((Ok(tmp), Default::default(), 0, gateway));
        }
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let mut failed = None;
        let mut exported = 0u64;
        let rep = ins.export(|r| {
            if !topics.takes(&r.topic) || r.received_at_ms < since || r.received_at_ms >= until {
                return std::ops::ControlFlow::Continue(());
            }
            let mut line = ferry_uplink::meta::export_line(&gateway, r);
            line.push(b'\n');
            match w.write_all(&line) {
                Ok(()) => {
                    exported += 1;
                    std::ops::ControlFlow::Continue(())
                }
                Err(e) => {
                    failed = Some(e);
                    std::ops::ControlFlow::Break(())
                }
            }
        })?;
        let flushed = w.flush();
        drop(w);
        let tmp = match (failed, flushed) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(tmp),
        };
        Ok((tmp, rep, exported, gateway))
    })?;
    say_state(&args.data_dir, state);
    if gateway.is_empty() {
        return Err(BufferCmdError::Usage(format!(
            "{} does not record its gateway id (last written by ferry 0.1): give --gateway-id, the gateway.id it ran with",
            buffer_file(&args.data_dir)
        )));
    }
    let tmp = tmp?;
    deliver(tmp, args.out.as_deref())?;
    eprintln!(
        "exported {exported} of the {} readings in {} segments (gateway {gateway})",
        rep.readings, rep.segments
    );
    for d in &rep.damaged {
        eprintln!(
            "DAMAGED segment {}: {} readings skipped: {}",
            d.segment, d.readings, d.why
        );
    }
    Ok(if rep.damaged.is_empty() { 0 } else { 1 })
}

/// `ferry buffer salvage`.
fn salvage(args: &SalvageArgs) -> Result<u8, BufferCmdError> {
    use std::io::Write as _;
    ferry_config::check_gateway_id(&args.gateway_id)
        .map_err(|e| BufferCmdError::Usage(format!("--gateway-id '{}': {e}", args.gateway_id)))?;
    let tmp_dir = staging_dir(args.out.as_deref());
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
    let mut failed = None;
    let rep = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let rep = ferry_buffer::salvage(&args.file, |r| {
            let mut line = ferry_uplink::meta::export_line(&args.gateway_id, &r);
            line.push(b'\n');
            match w.write_all(&line) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    std::ops::ControlFlow::Break(())
                }
            }
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", args.file.display())))?;
        w.flush()?;
        rep
    };
    if let Some(e) = failed {
        return Err(e.into());
    }
    deliver(tmp, args.out.as_deref())?;
    eprintln!(
        "salvaged {} readings in {} intact segments from {} ({} bytes scanned; {} older copies skipped; {} damaged or false candidates); import them with ferry buffer import",
        rep.readings,
        rep.segments,
        args.file.display(),
        rep.bytes,
        rep.copies,
        rep.rejected
    );
    Ok(0)
}

/// Where an export is written before it is complete: next to `--out` (so that the rename
/// into place is atomic), or the temporary directory for stdout.
fn staging_dir(out: Option<&Path>) -> std::path::PathBuf {
    match out.map(Path::parent) {
        Some(Some(p)) if !p.as_os_str().is_empty() => p.to_path_buf(),
        Some(_) => std::path::PathBuf::from("."),
        None => std::env::temp_dir(),
    }
}

/// Puts a complete export in place: renamed over `out` after an fsync, or copied to stdout.
fn deliver(tmp: tempfile::NamedTempFile, out: Option<&Path>) -> Result<(), BufferCmdError> {
    match out {
        Some(out) => {
            tmp.as_file().sync_all()?;
            tmp.persist(out).map_err(|e| e.error)?;
        }
        None => {
            let mut f = tmp.reopen()?;
            std::io::copy(&mut f, &mut std::io::stdout().lock())?;
        }
    }
    Ok(())
}

/// Readings appended per commit on import.
const IMPORT_BATCH: usize = 1000;

/// `ferry buffer import`.
fn import(args: &ImportArgs) -> Result<u8, BufferCmdError> {
    use std::io::BufRead as _;
    // Every line is checked before any is added, so a bad file adds nothing; stdin is
    // spooled to a temporary file to be read twice.
    let spooled;
    let path = if args.file.as_os_str() == "-" {
        let mut t = tempfile::NamedTempFile::new()?;
        std::io::copy(&mut std::io::stdin().lock(), t.as_file_mut())?;
        spooled = t;
        spooled.path().to_path_buf()
    } else {
        args.file.clone()
    };
    let open = || -> Result<std::io::BufReader<std::fs::File>, BufferCmdError> {
        Ok(std::io::BufReader::new(
            std::fs::File::open(&path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", args.file.display()))
            })?,
        ))
    };
    let mut lines = 0u64;
    for (n, line) in open()?.split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        ferry_uplink::meta::from_export_line(&line).map_err(|e| {
            BufferCmdError::Usage(format!(
                "{} line {}: {e}; nothing was imported",
                args.file.display(),
                n + 1
            ))
        })?;
        lines += 1;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (first, last) = rt.block_on(async {
        // No consumers (so nothing is acked or deleted) and no cap (so nothing is evicted).
        let opts = BufferOptions {
            max_bytes: u64::MAX,
            when_full: ferry_buffer::WhenFull::Reject,
            ..BufferOptions::default()
        };
        let buf = Buffer::open(&args.data_dir, opts)?;
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut ids = (None, None);
        let mut result = Ok(());
        for line in open()?.split(b'\n') {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            batch.push(ferry_uplink::meta::from_export_line(&line).map_err(BufferCmdError::Usage)?);
            if batch.len() == IMPORT_BATCH {
                match buf.append(std::mem::take(&mut batch)).await {
                    Ok(rc) => ids = (ids.0.or(Some(rc.first_id)), Some(rc.last_id)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if result.is_ok() && !batch.is_empty() {
            match buf.append(batch).await {
                Ok(rc) => ids = (ids.0.or(Some(rc.first_id)), Some(rc.last_id)),
                Err(e) => result = Err(e),
            }
        }
        buf.close().await;
        if let Err(e) = result {
            let done = match ids {
                (Some(a), Some(b)) => b - a + 1,
                _ => 0,
            };
            eprintln!(
                "ferry buffer import: {done} readings were imported before the buffer refused the rest; importing the file again adds those {done} again (consumers de-duplicate by ferry_id)"
            );
            return Err(e.into());
        }
        Ok::<_, BufferCmdError>(ids)
    })?;
    match (first, last) {
        (Some(a), Some(b)) => println!(
            "{lines} readings imported into {} (ids {a}..={b} here; each keeps the ferry_id it was exported with)",
            buffer_file(&args.data_dir)
        ),
        _ => println!("nothing to import"),
    }
    Ok(0)
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
