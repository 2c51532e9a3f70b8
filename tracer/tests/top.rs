//! `tcplens top` in a real terminal: tmux runs it (on a tmux server of the test's own)
//! while the test makes connections in a namespace of its own and leaks one; the screen,
//! read back with `tmux capture-pane`, must show the kernel's counts (`ss` in that
//! namespace) and the leaking process with its fd; keys sort and quit; the terminal is
//! restored on every way out.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmux server of the test's own, with one 160x48 pane running `command` then
/// printing how it exited and the terminal's mode; killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        require_root();
        let socket = format!("tcplens-test-{name}-{}", std::process::id());
        let tmux = Tmux { socket };
        // After tcplens: its exit code, whether the terminal is back in canonical mode
        // with echo, then a pause so the pane stays to be read.
        let script = format!(
            "{command}; echo tcplens-exit=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo; sleep 600"
        );
        tmux.run(&[
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "48",
            "-s",
            "top",
            "sh",
            "-c",
            &script,
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux (cargo xtask test installs it)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "top", k]);
        }
    }

    /// Whether the pane shows the alternate screen.
    fn alternate_on(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "top", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits (at most `within`) for the screen to satisfy `ok`; returns it.
    fn wait_for(&self, within: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                start.elapsed() < within,
                "waited {within:?} for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of tcplens in the pane.
    fn tcplens_pid(&self) -> u32 {
        let shell: u32 = self
            .run(&["display-message", "-p", "-t", "top", "#{pane_pid}"])
            .trim()
            .parse()
            .expect("pane pid");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .expect("the pane shell's children");
        children
            .split_whitespace()
            .find_map(|p| {
                let pid: u32 = p.parse().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                (comm.trim() == "tcplens").then_some(pid)
            })
            .expect("tcplens runs in the pane")
    }

    /// After tcplens exited: its exit code, and the terminal restored (canonical mode,
    /// echo, the normal screen).
    fn assert_restored(&self, how: &str) -> String {
        let s = self.wait_for(Duration::from_secs(20), "tcplens to exit", |s| {
            s.contains("tcplens-exit=") && s.contains("icanon")
        });
        assert!(s.contains("tcplens-exit=0"), "{how}: exit code:\n{s}");
        let modes = s
            .lines()
            .skip_while(|l| !l.starts_with("tcplens-exit="))
            .nth(1)
            .unwrap_or_default();
        assert_eq!(
            modes.split_whitespace().collect::<Vec<_>>(),
            ["icanon", "echo"],
            "{how}: the terminal is not back in canonical mode with echo:\n{s}"
        );
        assert!(!self.alternate_on(), "{how}: still on the alternate screen");
        assert!(
            !s.contains(" tcplens top "),
            "{how}: the dashboard was left on the screen:\n{s}"
        );
        s
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The count the header shows for `state`.
fn header_count(screen: &str, state: &str) -> Option<u64> {
    screen.lines().take(8).find_map(|l| {
        let mut words = l.split_whitespace();
        while let Some(w) = words.next() {
            if w == state {
                return words.next()?.parse().ok();
            }
        }
        None
    })
}

/// Sockets per state on local ports `ports` in namespace `ns`, as `ss` counts them.
fn ss_counts(ns: &NamedNetns, ports: &[u16]) -> HashMap<String, u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-Htan"])
        .output()
        .expect("running ss (iproute2)");
    assert!(out.status.success(), "ss: {out:?}");
    let mut counts = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let port = cols
            .get(3)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok());
        if port.is_some_and(|p| ports.contains(&p)) {
            *counts.entry(cols[0].to_string()).or_default() += 1;
        }
    }
    counts
}

/// The screen line of the table row naming `comm`, and its index.
fn row_of(screen: &str, comm: &str) -> Option<(usize, String)> {
    screen
        .lines()
        .enumerate()
        .skip(8)
        .find(|(_, l)| l.starts_with('│') && l.contains(comm) && !l.contains("->"))
        .map(|(i, l)| (i, l.to_string()))
}

#[test]
fn top_shows_the_kernels_counts_and_the_leaking_process_sorts_and_quits() {
    const LEAKY: u16 = 21_801;
    const BUSY: u16 = 21_802;
    let ns = NamedNetns::new("tcplens-top");
    let command = format!(
        "{TCPLENS} top --netns {} -L {LEAKY},{BUSY} --interval 500ms",
        ns.path()
    );
    let tmux = Tmux::start("top", &command);
    tmux.wait_for(Duration::from_secs(30), "the dashboard", |s| {
        s.contains(" tcplens top ") && s.contains("live |")
    });
    assert!(tmux.alternate_on(), "top draws on the alternate screen");

    // leaky-a accepts two connections and never closes them: the peer of the first
    // closes, its socket stays in CLOSE_WAIT. busy-b holds three established.
    let (mut leaky, mut busy, clients) = ns.run(|| {
        let leaky = LeakyServer::start(LEAKY, c"leaky-a", 2);
        let busy = LeakyServer::start(BUSY, c"busy-b", 3);
        let mut clients: Vec<TcpStream> = Vec::new();
        for port in [LEAKY, LEAKY, BUSY, BUSY, BUSY] {
            clients.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        }
        (leaky, busy, clients)
    });
    leaky.accepted(2);
    busy.accepted(3);
    let mut clients = clients.into_iter();
    drop(clients.next()); // leaky-a's first: its server side goes CLOSE_WAIT
    let kept: Vec<TcpStream> = clients.collect();

    let want = ss_counts(&ns, &[LEAKY, BUSY]);
    assert_eq!(
        (
            want.get("LISTEN"),
            want.get("ESTAB"),
            want.get("CLOSE-WAIT")
        ),
        (Some(&2), Some(&4), Some(&1)),
        "the scenario as ss sees it: {want:?}"
    );
    let leak_line = format!("{} leaky-a", leaky.pid);
    let screen = tmux.wait_for(
        Duration::from_secs(20),
        "ss's counts and the leak's holder",
        |s| {
            header_count(s, "LISTEN") == Some(2)
                && header_count(s, "ESTABLISHED") == Some(4)
                && header_count(s, "CLOSE_WAIT") == Some(1)
                && s.lines()
                    .any(|l| l.contains(&leak_line) && l.contains("->"))
        },
    );
    for state in [
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "LAST_ACK",
        "CLOSING",
    ] {
        assert_eq!(header_count(&screen, state), Some(0), "{state}:\n{screen}");
    }
    // The leaks pane: pid, command, the leaked socket's fd in the server, its addresses.
    let leak = screen
        .lines()
        .find(|l| l.contains(&leak_line) && l.contains("->"))
        .expect("the leak's line");
    let after_pid = leak.split(&leak_line).nth(1).unwrap_or_default();
    let fd: u32 = after_pid
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no fd on the leak's line: {leak}"));
    assert_eq!(fd, leaky.fds[0], "{leak}");
    assert!(
        leak.contains(&format!("127.0.0.1:{LEAKY} -> 127.0.0.1:")),
        "{leak}"
    );

    // The table by process, TOTAL first: busy-b (LISTEN + 3 ESTAB) over leaky-a (LISTEN,
    // ESTAB, CLOSE_WAIT).
    let (busy_at, busy_row) = row_of(&screen, "busy-b").expect("busy-b's row");
    let (leaky_at, leaky_row) = row_of(&screen, "leaky-a").expect("leaky-a's row");
    assert!(busy_at < leaky_at, "sorted by TOTAL:\n{screen}");
    let numbers = |row: &str| -> Vec<String> {
        row.trim_matches('│')
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // PID COMMAND TOTAL LISTEN SYN-S SYN-R ESTAB FIN-W1 FIN-W2 TIME-W CLOSE-W LAST-A CLOSING ...
    let check_row = |row: &str, pid: u32, counts: [&str; 11]| {
        let cols = numbers(row);
        assert_eq!(cols[0], pid.to_string(), "{row}");
        assert_eq!(&cols[2..13], counts, "{row}");
    };
    check_row(
        &busy_row,
        busy.pid,
        ["4", "1", "0", "0", "3", "0", "0", "0", "0", "0", "0"],
    );
    check_row(
        &leaky_row,
        leaky.pid,
        ["3", "1", "0", "0", "1", "0", "0", "0", "1", "0", "0"],
    );

    // Right arrow, eight times: from TOTAL to CLOSE-W, leaky-a comes first.
    tmux.keys(&["Right"; 8]);
    let sorted = tmux.wait_for(Duration::from_secs(10), "the CLOSE-W sort", |s| {
        s.contains("CLOSE-W▼")
    });
    let (busy_at, _) = row_of(&sorted, "busy-b").expect("busy-b's row");
    let (leaky_at, _) = row_of(&sorted, "leaky-a").expect("leaky-a's row");
    assert!(leaky_at < busy_at, "sorted by CLOSE-W:\n{sorted}");

    tmux.keys(&["q"]);
    let after = tmux.assert_restored("q");
    assert!(
        after.contains("tcplens: ") && after.contains("events read"),
        "the summary follows the screen:\n{after}"
    );
    drop(kept);
    leaky.stop();
    busy.stop();
}

#[test]
fn ctrl_c_and_sigterm_restore_the_terminal() {
    for how in ["C-c", "SIGTERM"] {
        let tmux = Tmux::start(
            if how == "C-c" { "ctrl-c" } else { "sigterm" },
            &format!("{TCPLENS} top -L 21803"),
        );
        tmux.wait_for(Duration::from_secs(30), "the dashboard", |s| {
            s.contains(" tcplens top ")
        });
        assert!(
            tmux.alternate_on(),
            "{how}: top draws on the alternate screen"
        );
        if how == "C-c" {
            tmux.keys(&["C-c"]);
        } else {
            let pid = tmux.tcplens_pid();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("kill");
        }
        tmux.assert_restored(how);
    }
}

#[test]
fn top_without_a_terminal_says_so_in_one_line() {
    let out = Command::new(TCPLENS)
        .arg("top")
        .output()
        .expect("running tcplens");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tcplens: top draws on a terminal and stdout is not one (watch, stats and leaks print lines)\n"
    );
}

#[test]
fn a_recording_replays_paused_then_step_by_step_to_its_end() {
    const PORT: u16 = 21_804;
    let ns = NamedNetns::new("tcplens-top-replay");
    let file = std::env::temp_dir().join(format!("tcplens-top-{}.rec", std::process::id()));
    let file_arg = file.display().to_string();
    let netns = ns.path();
    let recorder = start_tcplens(&["record", "-o", &file_arg, "--netns", &netns]);
    // 20 connections, the client closing first: 20 client sockets in TIME_WAIT at the end.
    ns.run(|| {
        private_fd_table(); // the row's count is of the sockets this thread closed
        let listener = std::net::TcpListener::bind(("127.0.0.1", PORT)).expect("bind");
        for _ in 0..20 {
            let client = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            drop(client);
            std::thread::sleep(Duration::from_millis(20));
            drop(server);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let f = recorder.stop();
    assert!(f.stderr.contains(" events written to "), "{}", f.stderr);

    let tmux = Tmux::start(
        "replay",
        &format!("{TCPLENS} top --from {file_arg} --interval 200ms --step"),
    );
    let paused = tmux.wait_for(Duration::from_secs(10), "the paused replay", |s| {
        s.contains(": paused")
    });
    assert_eq!(header_count(&paused, "TIME_WAIT"), Some(0), "{paused}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        tmux.screen().contains(": paused"),
        "it stays paused without a key"
    );
    let mut steps = 0;
    let end = loop {
        let s = tmux.screen();
        if s.contains(": end of recording") {
            break s;
        }
        assert!(steps < 200, "no end after {steps} steps:\n{s}");
        tmux.keys(&["n"]);
        steps += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(steps > 1, "stepped {steps} times");
    // The 20 clients' sockets live on as timewait sockets: in FIN_WAIT2 or TIME_WAIT as
    // the recorded timer events show them (a replay has no sock_diag to see the turns).
    let timewait = header_count(&end, "FIN_WAIT2").zip(header_count(&end, "TIME_WAIT"));
    assert_eq!(timewait.map(|(a, b)| a + b), Some(20), "{end}");
    let (_, row) = row_of(&end, "tcplens-test").expect("the test's row");
    assert!(row.split_whitespace().any(|w| w == "20"), "{row}\n{end}");
    assert_eq!(header_count(&end, "ESTABLISHED"), Some(0), "{end}");
    assert_eq!(header_count(&end, "LISTEN"), Some(0), "{end}");
    tmux.keys(&["q"]);
    tmux.assert_restored("q after a replay");
    let _ = std::fs::remove_file(&file);
}
