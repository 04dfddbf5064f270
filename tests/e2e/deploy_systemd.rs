//! systemd integration against the real binary: READY=1 once bound, WATCHDOG=1 fed while the
//! buffer writer answers, STOPPING=1 on SIGTERM; logs to journald's native socket when stderr
//! is the journal.

use ferry_tests::{Ferry, bin_path};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ferry_notifies_systemd_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut ferry = Ferry::start_with_env(
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut got: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if got.iter().any(|m| m.contains("READY=1"))
            && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
        {
            break;
        }
    }
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "no READY=1 in {got:?}"
    );
    assert!(
        got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "the watchdog was not fed every ~200 ms: {got:?}"
    );
    let status = ferry
        .terminate(Duration::from_secs(10))
        .expect("ferry exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

/// A log that goes to a file (or a pipe, or journald's stream) has no colour codes: they are
/// for a person at a terminal only.
#[test]
fn a_log_written_to_a_file_has_no_escape_codes() {
    let mut ferry = Ferry::start("");
    let start = Instant::now();
    while !ferry.log().contains("No uplink") && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    ferry.terminate(Duration::from_secs(5));
    let log = ferry.log();
    assert!(log.lines().count() >= 2, "{log}");
    assert!(log.contains("No uplink"), "{log}");
    assert!(!log.contains('\u{1b}'), "ESC in the log:\n{log:?}");
}

/// One journald native-protocol datagram: its fields (`KEY=value` lines, or `KEY`, a 64-bit
/// little-endian length and the value, for values holding a newline).
fn journal_fields(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            d = &rest[8 + len + 1..];
        }
    }
    out
}

/// Runs ferry as systemd would with its stderr in the journal: `JOURNAL_STREAM` names the
/// device and inode of its stderr (`journal_stream` true) or of something else, and
/// /run/systemd/journal/socket is a socket of this test's, in a mount namespace of ferry's
/// own (so the machine's journald, if any, is left alone). Returns the journal entries
/// received and what ferry wrote to stderr.
fn run_under_journal(journal_stream: bool) -> (Vec<BTreeMap<String, String>>, String) {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let sock = UnixDatagram::bind(jdir.join("socket")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"journal\"\ndata_dir = \"{}\"\n\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let stream = if journal_stream {
        format!("{}:{}", meta.dev(), meta.ino())
    } else {
        format!("{}:{}", meta.dev(), meta.ino() + 1)
    };
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
             && mount --bind \"$1\" /run/systemd/journal && exec \"$2\" run --config \"$3\"",
        )
        .arg("sh")
        .arg(&jdir)
        .arg(bin_path("ferry"))
        .arg(&config);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRY_") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd
        .env("JOURNAL_STREAM", &stream)
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn unshare");
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = sock.recv(&mut buf)
            && n > 0
        {
            entries.push(journal_fields(&buf[..n]));
        }
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let started = |m: &str| m.contains("The status page is served");
        if entries
            .iter()
            .any(|e| e.get("MESSAGE").is_some_and(|m| started(m)))
            || started(&log)
        {
            break;
        }
    }
    // unshare (without --fork) and sh exec'd ferry: the child is ferry.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (entries, std::fs::read_to_string(&stderr_path).unwrap())
}

/// Under systemd with stderr in the journal, each event reaches journald through its native
/// protocol with its fields as journal fields, and nothing is written to stderr; when
/// `JOURNAL_STREAM` names another stream (a child that inherited it), ferry writes to stderr.
#[test]
fn under_systemd_the_journal_gets_structured_fields() {
    let test = "under_systemd_the_journal_gets_structured_fields";
    if !ferry_tests::require_tool("unshare", test) {
        return;
    }
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    if !uid.is_ok_and(|u| u.trim_ascii() == b"0") {
        let msg = "a mount namespace for journald's socket path needs root";
        if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: {msg} (FERRY_REQUIRE_TOOLS=1)");
        }
        eprintln!("\n=====\nSKIPPED {test}: {msg}\n=====\n");
        return;
    }
    let (entries, stderr) = run_under_journal(true);
    let find = |needle: &str| {
        entries
            .iter()
            .find(|e| e.get("MESSAGE").is_some_and(|m| m.contains(needle)))
            .unwrap_or_else(|| {
                panic!("no journal entry with {needle:?} in {entries:#?}\nstderr: {stderr}")
            })
    };
    let open = find("The buffer is open.");
    assert_eq!(open["PRIORITY"], "6", "{open:?}");
    assert_eq!(open["SYSLOG_IDENTIFIER"], "ferry", "{open:?}");
    assert_eq!(open["TARGET"], "ferry_gateway::app", "{open:?}");
    assert!(open["DATA_DIR"].ends_with("/data"), "{open:?}");
    assert_eq!(open["READINGS"], "0", "{open:?}");
    assert!(
        open.contains_key("CODE_FILE") && open.contains_key("CODE_LINE"),
        "{open:?}"
    );
    let http = find("HTTP ingest is open");
    assert_eq!(http["PRIORITY"], "4", "{http:?}");
    assert!(http["ADDR"].starts_with("127.0.0.1:"), "{http:?}");
    assert!(
        !stderr.contains("The buffer is open"),
        "the log went to stderr as well: {stderr}"
    );

    let (entries, stderr) = run_under_journal(false);
    assert!(
        entries.is_empty(),
        "JOURNAL_STREAM named another stream: {entries:?}"
    );
    assert!(stderr.contains("The buffer is open"), "{stderr}");
}
