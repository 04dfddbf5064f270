//! systemd integration against the real binary: READY=1 once bound, WATCHDOG=1 fed while the
//! buffer writer answers, STOPPING=1 on SIGTERM.

use ferry_tests::Ferry;
use std::os::unix::net::UnixDatagram;
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
