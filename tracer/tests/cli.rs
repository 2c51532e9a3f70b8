//! The built `tcplens` binary, run as a user would: real kernel, real sockets in a
//! namespace of the test's own, output parsed back.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// tcplens's stdout and stderr after a successful run.
fn finish(r: Running) -> (String, String) {
    let f = r.wait();
    assert!(
        f.status.success(),
        "tcplens failed: {}, stderr: {}",
        f.status,
        f.stderr
    );
    (f.stdout, f.stderr)
}

fn one_connection(port: u16) -> u32 {
    in_netns(move || {
        private_fd_table(); // the test checks who closed the listener
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop(client);
        drop(server);
        drop(listener);
        gettid()
    })
}

#[test]
fn watch_json_as_a_user_runs_it() {
    const PORT: u16 = 21101;
    let started = Instant::now();
    let running = start_tcplens(&[
        "watch",
        "--format",
        "json",
        "--duration",
        "2s",
        "-L",
        &PORT.to_string(),
    ]);
    one_connection(PORT);
    let (out, rest) = finish(running);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "--duration 2s stopped in time"
    );

    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // -L keeps the listener (2) and the accepted child (5).
    let seq: Vec<(String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["old"].as_str().unwrap().into(),
                v["new"].as_str().unwrap().into(),
            )
        })
        .collect();
    let listen = ("CLOSE".to_string(), "LISTEN".to_string());
    assert_eq!(seq.len(), 7, "{out}");
    assert_eq!(seq[0], listen);
    let keys = [
        "time",
        "ts_ns",
        "sk",
        "cookie",
        "netns",
        "family",
        "saddr",
        "sport",
        "daddr",
        "dport",
        "old",
        "new",
        "old_ns",
        "pid",
        "comm",
        "owner_pid",
        "owner_comm",
        "cgroup_id",
        "cgroup",
        "container",
        "runtime",
        "pod_uid",
        "via",
    ];
    let pid = u64::from(std::process::id());
    for v in &lines {
        let obj = v.as_object().unwrap();
        assert_eq!(
            obj.keys().map(String::as_str).collect::<Vec<_>>().len(),
            keys.len(),
            "{v}"
        );
        for k in keys {
            assert!(obj.contains_key(k), "{k} missing in {v}");
        }
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["saddr"], "127.0.0.1");
        assert_eq!(v["sport"], u64::from(PORT));
        assert!(v["sk"].as_str().unwrap().starts_with("0xffff"), "{v}");
        assert!(v["cookie"].as_u64().is_some_and(|c| c > 0), "{v}");
        assert_eq!(v["netns"], lines[0]["netns"], "one namespace: {v}");
        assert_eq!(
            v["via"], "tracepoint",
            "the server side never enters TIME_WAIT"
        );
    }
    // The listener: created and closed by this process, which owns it.
    let l = &lines[0];
    assert_eq!(l["pid"], pid);
    assert_eq!(l["comm"], THREAD_NAME);
    assert_eq!(l["owner_pid"], pid);
    assert_eq!(l["owner_comm"], THREAD_NAME);
    assert!(l["old_ns"].is_null(), "entry into CLOSE was not seen: {l}");
    // The child's first event has an unknown old_ns; its later ones are timed.
    let child: Vec<&Value> = lines.iter().filter(|v| v["dport"] != 0).collect();
    assert_eq!(child.len(), 5);
    assert!(child[0]["old_ns"].is_null());
    assert!(child[1..].iter().all(|v| v["old_ns"].is_u64()), "{child:?}");
    // Wall time is derived from the kernel's monotonic time with one fixed offset.
    let offsets: Vec<i128> = lines
        .iter()
        .map(|v| {
            let t: jiff::Timestamp = v["time"].as_str().unwrap().parse().unwrap();
            t.as_nanosecond() - i128::from(v["ts_ns"].as_u64().unwrap())
        })
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] == w[1]), "{offsets:?}");
    let now = jiff::Timestamp::now().as_nanosecond();
    let first: jiff::Timestamp = lines[0]["time"].as_str().unwrap().parse().unwrap();
    assert!(
        (now - first.as_nanosecond()).abs() < 10_000_000_000,
        "time is today's"
    );
    assert_nothing_lost(&rest);
}

#[test]
fn watch_text_and_sigterm() {
    const PORT: u16 = 21102;
    let running = start_tcplens(&["watch", "-L", &PORT.to_string()]);
    one_connection(PORT);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (out, rest) = finish(running);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "header and 7 transitions: {out}");
    assert!(lines[0].starts_with("TIME         CPU-TASK"), "{out}");
    assert!(
        lines[1].contains("127.0.0.1:21102") && lines[1].contains("CLOSE        -> LISTEN"),
        "{out}"
    );
    assert!(lines[7].contains("LISTEN       -> CLOSE"), "{out}");
    assert!(
        rest.contains("tcplens: 9 events read (0 timewait, 2 request), 0 lost\n"),
        "{rest}"
    );
}

/// Bad input: one line on stderr, exit code 1, no panic.
fn fails_with(cmd: &mut Command, expect: &str) {
    let out = cmd.output().expect("running tcplens");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("tcplens: "), "{stderr}");
    assert!(stderr.contains(expect), "{stderr:?} lacks {expect:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "no output on error");
}

#[test]
fn bad_flags_are_one_line_errors() {
    fails_with(
        Command::new(TCPLENS).args(["watch", "--duration", "soon"]),
        "--duration",
    );
    fails_with(
        Command::new(TCPLENS).args(["watch", "-L", "99999"]),
        "not a port",
    );
    fails_with(
        Command::new(TCPLENS).args(["watch", "--ring-size", "3M"]),
        "power of two",
    );
    fails_with(
        Command::new(TCPLENS).args(["watch", "--format", "xml"]),
        "xml",
    );
    fails_with(Command::new(TCPLENS).args(["sniff"]), "sniff");
    // Values that used to overflow or panic.
    fails_with(
        Command::new(TCPLENS).args(["watch", "--duration", "99999999999y"]),
        "at most a year",
    );
    fails_with(
        Command::new(TCPLENS).args(["stats", "--interval", "400d"]),
        "at most a year",
    );
    fails_with(
        Command::new(TCPLENS).args(["timeline", "--max-sockets", "18446744073709551615"]),
        "at most 100000000",
    );
    // The missing argument and the valid values are named.
    fails_with(Command::new(TCPLENS).args(["record"]), "--output <FILE>");
    fails_with(
        Command::new(TCPLENS).args(["watch", "--format", "xml"]),
        "text, json",
    );
    fails_with(
        Command::new(TCPLENS).args(["leaks", "--state", "OPEN"]),
        "CLOSE_WAIT",
    );
}

#[test]
fn without_privileges_says_so() {
    require_root(); // to become someone else
    fails_with(
        Command::new(TCPLENS)
            .args(["watch", "--duration", "1s"])
            .uid(65534)
            .gid(65534),
        "permission denied: tcplens needs root",
    );
}

/// A recording written by the library's writer: two socket lives on port 8080.
fn recording() -> Vec<u8> {
    use tracer::clock::WallClock;
    use tracer::model::{Comm, Family, KernelEvent, SocketId, Task, TcpState::*, Transition, Via};
    use tracer::source::record::RecordWriter;
    let mut w = RecordWriter::new(
        Vec::new(),
        WallClock {
            boot_offset_ns: 1_795_299_000_000_000_000,
        },
    )
    .unwrap();
    for (sk, base) in [(1u64, 1_000_000_000u64), (2, 2_000_000_000)] {
        for (old, new, at) in [
            (Listen, SynRecv, 0),
            (SynRecv, Established, 10_000),
            (Established, CloseWait, 1_000_000),
            (CloseWait, LastAck, 251_000_000),
            (LastAck, Close, 251_050_000),
        ] {
            w.event(&KernelEvent::Transition(Transition {
                ts_ns: base + at,
                sk,
                id: SocketId {
                    cookie: sk,
                    netns: 4_026_531_840,
                    family: Family::Ipv4,
                    saddr: "10.0.0.1".parse().unwrap(),
                    sport: 8080,
                    daddr: "10.0.0.2".parse().unwrap(),
                    dport: 50000 + sk as u16,
                },
                old,
                new,
                task: Task {
                    pid: 77,
                    tid: 77,
                    comm: Comm::from_name("srv"),
                },
                via: Via::Tracepoint,
                cpu: Some(0),
                jiffies: 0,
                cgroup: 0,
                facts: None,
            }))
            .unwrap();
        }
    }
    w.into_inner()
}

#[test]
fn replay_needs_no_root_and_reports_corruption_by_offset() {
    require_root(); // to become someone else
    let dir = std::env::temp_dir();
    let good = dir.join(format!("tcplens-cli-good-{}.rec", std::process::id()));
    let cut = dir.join(format!("tcplens-cli-cut-{}.rec", std::process::id()));
    let bytes = recording();
    assert_eq!(bytes.len(), 32 + 10 * (4 + tracer_common::EVENT_SIZE));
    std::fs::write(&good, &bytes).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 40]).unwrap(); // inside the last record
    for p in [&good, &cut] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }

    // As nobody: replay works without privileges.
    let out = Command::new(TCPLENS)
        .args(["stats", "--format", "json", "--from"])
        .arg(&good)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["states"]["CLOSE_WAIT"]["count"], 2);
    let p50 = v["states"]["CLOSE_WAIT"]["p50_ns"].as_u64().unwrap();
    assert!(p50.abs_diff(250_000_000) <= 250_000, "{p50}");

    // Truncated: what was read is reported (one socket's life), then one error line with
    // the byte offset of the broken record, exit code 1.
    let out = Command::new(TCPLENS)
        .args(["timeline", "--format", "json", "--from"])
        .arg(&cut)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lives: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lives.len(),
        2,
        "one closed life and one cut short: {lives:?}"
    );
    assert_eq!(lives[0]["end"], "closed");
    assert_eq!(lives[1]["end"], "still_open");
    let last_record = 32 + 9 * (4 + tracer_common::EVENT_SIZE);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("truncated at byte {last_record}: in a record"))
            && stderr.contains("9 events read"),
        "{stderr}"
    );
    std::fs::remove_file(&good).ok();
    std::fs::remove_file(&cut).ok();

    // Not a recording at all.
    fails_with(
        Command::new(TCPLENS).args(["stats", "--from", "/proc/self/status"]),
        "bad magic",
    );
    fails_with(
        Command::new(TCPLENS).args(["stats", "--from", "/nonexistent/x"]),
        "/nonexistent/x",
    );
}
