//! Real kernel: tcplens on a host as it really is. Namespaces come and go under a refresh,
//! the metrics endpoint is flooded with idle connections, a process names itself with
//! terminal control bytes, the reader of tcplens's output goes away.

mod common;

use std::io::Read as _;
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn namespaces_that_come_and_go_during_leaks_refreshes_are_skipped() {
    const PORT: u16 = 21501;
    let tcplens = start_tcplens(&[
        "leaks",
        "--threshold",
        "1s",
        "--interval",
        "100ms",
        "--duration",
        "5s",
        "--format",
        "json",
        "-L",
        "21501",
    ]);
    let started = Instant::now();
    // One leak to report all along, in a namespace that stays.
    let server = in_netns(|| {
        let mut server = LeakyServer::start(PORT, c"leaky-ns", 1);
        let client = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        server.accepted(1);
        drop(client);
        server
    });
    // A name under /run/netns whose namespace is gone: the plain file `ip netns delete`
    // leaves between its unmount and its unlink (setns on it fails with EINVAL).
    std::fs::create_dir_all("/run/netns").expect("/run/netns");
    let stale = "/run/netns/tcplens-stale";
    std::fs::write(stale, b"").expect("a stale /run/netns entry");
    // Meanwhile namespaces appear and vanish, each with a process in it (so tcplens finds
    // it by /proc as well as under /run/netns).
    let mut cycles = 0;
    while started.elapsed() < Duration::from_millis(4_300) {
        let name = format!("tcplens-churn-{}", cycles % 4);
        let mut ns = NamedNetns::new(&name);
        let mut sleeper = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "0.05"])
            .spawn()
            .expect("ip netns exec");
        std::thread::sleep(Duration::from_millis(20));
        ns.delete();
        let _ = sleeper.wait();
        cycles += 1;
    }
    let f = tcplens.wait();
    server.stop();
    std::fs::remove_file(stale).expect("removing the stale entry");
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    assert!(!f.stderr.contains("error"), "{}", f.stderr);
    assert!(cycles >= 20, "only {cycles} namespaces came and went");
    let reports = json_lines(&f.stdout);
    // A report every 100 ms for 5 s, and the leak in every one after its threshold.
    assert!(reports.len() >= 25, "{} reports", reports.len());
    let with_leak = reports
        .iter()
        .filter(|r| r["sockets"].as_array().is_some_and(|s| s.len() == 1))
        .count();
    assert!(with_leak >= 15, "{with_leak} of {} reports", reports.len());
}

/// CPU time (user + system) of a process so far, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit_once(") ").expect("stat format").1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of stat(5), counted from 3 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

#[test]
fn the_metrics_endpoint_answers_under_a_flood_of_idle_connections() {
    require_root();
    // tcplens may hold 1 100 descriptors; the flood is 1 200 connections that never send.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=1100:1100", "--", TCPLENS]).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "-L",
        "21502",
    ]);
    let tcplens = start_command(cmd);
    let addr = tcplens.metrics_addr();
    // This process needs room for them too.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 4096, 4096)
        .expect("raising RLIMIT_NOFILE");
    let idle: Vec<TcpStream> = (0..1_200)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    assert!(idle.len() >= 1_000, "{} idle connections made", idle.len());

    // A scrape is answered at once, and tcplens is not spinning meanwhile.
    let cpu_before = cpu_time(tcplens.pid());
    let t0 = Instant::now();
    let (status, body) = http_get(addr, "/metrics");
    let took = t0.elapsed();
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE tcplens_sockets gauge"), "{body}");
    assert!(took < Duration::from_secs(2), "the scrape took {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time(tcplens.pid()).checked_sub(cpu_before).unwrap();
    let wall = t0.elapsed();
    assert!(
        spent < wall / 2,
        "tcplens used {spent:?} of CPU in {wall:?} with idle connections open"
    );

    // Only /metrics, only GET and HEAD.
    assert_eq!(http_get(addr, "/").0, 404);
    assert_eq!(http_get(addr, "/favicon.ico").0, 404);
    let (status, head, _) = http_request(addr, "POST", "/metrics");
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    let (status, head, body) = http_request(addr, "HEAD", "/metrics");
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );

    // The flood was not kept: all but the newest connections were closed by tcplens.
    let made = idle.len();
    let closed = idle.iter().filter(|c| closed_by_peer(c)).count();
    assert!(
        closed >= made - 64,
        "{closed} of {made} idle connections closed"
    );
    let f = tcplens.stop();
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
}

/// Whether the peer closed `c` (EOF or reset), without waiting.
fn closed_by_peer(c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match (&*c).read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn control_bytes_in_a_process_name_reach_the_terminal_escaped() {
    const PORT: u16 = 21503;
    let tcplens = start_tcplens(&["watch", "-L", "21503"]);
    in_netns(|| {
        let server = ForkedServer::start(PORT, c"ev\x1b[2Jx\ny", Duration::from_millis(50));
        let client = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        server.finish();
    });
    let f = tcplens.stop();
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert!(!f.stdout.contains('\x1b'), "a raw ESC reached the terminal");
    // The server's own transitions (listen, its close) name it, escaped, on one line.
    let named: Vec<&str> = f
        .stdout
        .lines()
        .filter(|l| l.contains(r"ev\x1b[2Jx\x0ay"))
        .collect();
    assert!(named.len() >= 2, "{}", f.stdout);
    assert!(
        named
            .iter()
            .any(|l| l.contains("CLOSE_WAIT") && l.contains("LAST_ACK")),
        "{named:?}"
    );
}

/// Runs `tcplens ARGS 2>&1 | head -1` in bash; returns tcplens's exit code and what head
/// printed.
fn through_head(args: &str) -> (i32, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "\"$0\" {args} 2>&1 | head -1; echo \"rc=${{PIPESTATUS[0]}}\""
        ))
        .arg(TCPLENS)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let rc = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rc="))
        .and_then(|rc| rc.parse().ok())
        .unwrap_or(-1);
    (rc, stdout)
}

#[test]
fn a_reader_that_goes_away_ends_tcplens_quietly() {
    require_root();
    // Nothing to print: the closing summary meets a closed stderr.
    let (rc, out) = through_head("watch -L 21504 --duration 1s");
    assert_eq!(rc, 0, "{out}");
    assert!(out.starts_with("tcplens: tracing"), "{out}");
    // Lines to print: stdout is closed under them.
    let traffic = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(500));
        in_netns(|| {
            let l = std::net::TcpListener::bind(("127.0.0.1", 21505)).unwrap();
            for _ in 0..20 {
                let c = TcpStream::connect(("127.0.0.1", 21505)).unwrap();
                drop(l.accept().unwrap());
                drop(c);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    let (rc, out) = through_head("watch -L 21505 --duration 3s");
    traffic.join().unwrap();
    assert_eq!(rc, 0, "{out}");
}

#[test]
fn the_first_stats_window_is_as_long_as_the_interval() {
    let tcplens = start_tcplens(&[
        "stats",
        "--interval",
        "1s",
        "--duration",
        "2500ms",
        "--format",
        "json",
        "-L",
        "21506",
    ]);
    let tracing_at = Instant::now();
    let (first_at, first) = tcplens
        .wait_for_line(Duration::from_secs(5), |_| true)
        .expect("a first report");
    let f = tcplens.wait();
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    let window = Duration::from_nanos(v["window_ns"].as_u64().unwrap());
    // From tracing's start (just before its line reached us) to the report (just before
    // its line reached us).
    let measured = first_at - tracing_at;
    let diff = window.abs_diff(measured);
    assert!(
        diff < Duration::from_millis(250),
        "first window {window:?}, measured {measured:?}"
    );
}

#[test]
fn stats_reports_evictions_at_the_socket_cap() {
    const PORT: u16 = 21507;
    let tcplens = start_tcplens(&[
        "stats",
        "--max-sockets",
        "10",
        "--format",
        "json",
        "-L",
        "21507",
    ]);
    // A listener and 30 accepted connections held open: 31 sockets on the local port, 10
    // tracked at most.
    let held = in_netns(|| {
        let l = std::net::TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let pairs: Vec<_> = (0..30)
            .map(|_| {
                let c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect();
        (l, pairs)
    });
    std::thread::sleep(Duration::from_millis(200));
    let f = tcplens.stop();
    drop(held);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let v = json_lines(&f.stdout);
    let last = v.last().expect("a report");
    assert_eq!(last["evicted"], 21, "{last}");
    assert!(
        f.stderr
            .contains("21 sockets evicted at the --max-sockets cap"),
        "{}",
        f.stderr
    );
}
