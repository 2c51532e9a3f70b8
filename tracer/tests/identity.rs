//! Real kernel: socket identity. Every life is the kernel's socket (its cookie) in its
//! network namespace, TIME_WAIT included, under reuse, churn and equal 4-tuples in two
//! namespaces; counts are the kernel's own (nstat). Each scenario has a named namespace of
//! its own, which tcplens filters on (`--netns PATH`).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;

/// The timer wheel runs a 60 s timer in a bucket of 512 jiffies (2.048 s at HZ=250): a
/// TIME_WAIT lasts at most 60 s plus one bucket.
const TIME_WAIT_MAX: Duration = Duration::from_millis(62_100);

fn span_ns(life: &Value, state: &str) -> Option<u64> {
    life["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == state)
        .and_then(|s| s["ns"].as_u64())
}

fn finish(r: Running) -> Vec<Value> {
    let f = r.stop();
    assert!(f.status.success(), "tcplens failed: {}", f.stderr);
    assert_nothing_lost(&f.stderr);
    json_lines(&f.stdout)
}

/// The repro: the server closes first, and one client port connects three times,
/// 0.5 s apart. Each SYN kills the previous connection's TIME_WAIT, and the kernel hands
/// the freed timewait socket's memory to the next one: three TIME_WAITs (nstat TcpExtTW),
/// each in its own life, the first two killed when the next SYN came.
#[test]
fn a_reused_four_tuple_gives_each_connection_its_time_wait() {
    const PORT: u16 = 21601;
    const CLIENT_PORT: u16 = 41601;
    let mut ns = NamedNetns::new("tcplens-reuse");
    let timeline = start_tcplens(&["timeline", "--format", "json", "--netns", &ns.path()]);
    // (the client's close: the server's TIME_WAIT begins; the next connect: it ends)
    let times = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let mut times = Vec::new();
        for _ in 0..3 {
            let connected = Instant::now();
            let mut client = connect_from(CLIENT_PORT, PORT);
            let (server, _) = listener.accept().unwrap();
            drop(server); // the server closes first
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).unwrap(), 0);
            drop(client);
            times.push((connected, Instant::now()));
            std::thread::sleep(Duration::from_millis(500));
        }
        times
    });
    let kernel_tw = ns.nstat("TcpExtTW");
    let inode = ns.inode();
    ns.delete(); // the last TIME_WAIT is killed with its namespace
    std::thread::sleep(Duration::from_millis(300));
    // This test's port only: once the namespace is gone, its inode number (the filter)
    // may be given to another test's new namespace.
    let lives = on_port(finish(timeline), PORT);

    assert_eq!(kernel_tw, 3, "the kernel made three TIME_WAITs");
    let servers: Vec<&Value> = lives
        .iter()
        .filter(|l| l["sport"] == PORT && l["dport"] == CLIENT_PORT)
        .collect();
    assert_eq!(servers.len(), 3, "{servers:#?}");
    let with_tw = lives.iter().filter(|l| span_ns(l, "TIME_WAIT").is_some());
    assert_eq!(with_tw.count() as u64, kernel_tw, "{lives:#?}");
    let cookies: HashSet<u64> = servers
        .iter()
        .map(|l| l["cookie"].as_u64().unwrap())
        .collect();
    assert_eq!(cookies.len(), 3, "three sockets, three cookies");
    for (i, life) in servers.iter().enumerate() {
        assert_eq!(
            state_names(life),
            [
                "NEW_SYN_RECV",
                "SYN_RECV",
                "ESTABLISHED",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE"
            ],
            "{life}"
        );
        assert_eq!(life["end"], "time_wait_killed", "{life}");
        assert_eq!(life["netns"].as_u64(), Some(inode));
        if i < 2 {
            // From the client's close to the next connect, by the test's own clock.
            let want = times[i + 1].0 - times[i].1;
            let got = span_ns(life, "TIME_WAIT").unwrap();
            assert!(
                near(got, want, Duration::from_millis(50)),
                "TIME_WAIT of connection {i}: {got} ns, the test measured {want:?}"
            );
        }
    }
}

/// Loopback churn for 5 s in a namespace, then the namespace is deleted: every TIME_WAIT
/// the kernel made (TcpExtTW) is one socket's TIME_WAIT, no two connections share a life,
/// and every life ends as the kernel ended it.
///
/// On this project's 6.18 host, about one run in ten has one server socket (of some 100k)
/// whose transitions after FIN_WAIT1 no tracepoint reported: its `FIN_WAIT1 -> FIN_WAIT2`,
/// its timewait timer's arm and its `FIN_WAIT2 -> CLOSE` are missing together, with no
/// program skipped or ring record dropped, and a bpftrace witness on `timer:timer_start`
/// counted exactly the arms tcplens got. tcplens ends such a life `unseen` when its
/// address is reused (and says so); the test holds each of them to that shape and counts
/// them against the kernel's TIME_WAITs, so that a tracker that loses or joins a socket
/// still fails.
#[test]
fn under_churn_the_time_waits_are_the_kernels() {
    const PORT: u16 = 21602;
    let mut ns = NamedNetns::new("tcplens-churn");
    let timeline = start_tcplens(&["timeline", "--format", "json", "--netns", &ns.path()]);
    let connections = ns.run(|| churn(PORT, Duration::from_secs(5), 2));
    let kernel_tw = ns.nstat("TcpExtTW");
    let kernel_opens = ns.nstat("TcpActiveOpens");
    ns.delete();
    std::thread::sleep(Duration::from_millis(500));
    let f = timeline.stop();
    assert!(f.status.success(), "tcplens failed: {}", f.stderr);
    let all = json_lines(&f.stdout);
    assert_nothing_lost(&f.stderr);
    assert!(connections > 1_000, "churn made {connections} connections");
    eprintln!(
        "churn: {connections} connections; TcpExtTW {kernel_tw}, TcpActiveOpens {kernel_opens}"
    );
    let ours = |l: &&Value| l["sport"] == PORT || l["dport"] == PORT;
    let lives: Vec<&Value> = all.iter().filter(ours).collect();
    let mut by_cookie: HashMap<u64, Vec<&Value>> = HashMap::new();
    for l in &lives {
        by_cookie
            .entry(l["cookie"].as_u64().unwrap())
            .or_default()
            .push(l);
    }
    // Sockets the kernel stopped showing after FIN_WAIT1 (see above): a server's life that
    // ends there, unseen or still open, and no TIME_WAIT under its cookie.
    let mut unshown = 0u64;
    for (cookie, socket) in &by_cookie {
        let first = socket[0];
        let states = state_names(first);
        let cut_short = first["role"] == "passive"
            && states.last() == Some(&"FIN_WAIT1")
            && ["unseen", "still_open"].contains(&first["end"].as_str().unwrap());
        if first["end"] == "unseen" {
            assert!(
                cut_short,
                "ended unseen: {first}\nthe lives of its 4-tuple: {:#?}",
                same_four_tuple(&all, first)
            );
        }
        // One life per socket, but for a cut-short one whose timewait socket's timer
        // showed up later: that is a life of its own (first seen mid-life, in TIME_WAIT).
        match socket.as_slice() {
            [_] => {}
            [_, rest] if cut_short && rest["first_seen_mid_life"] == true => {}
            _ => panic!("{} lives of socket {cookie}: {socket:#?}", socket.len()),
        }
        let timewait = socket.iter().any(|l| state_names(l).contains(&"TIME_WAIT"));
        if cut_short && !timewait {
            unshown += 1;
        }
    }
    let unseen = lives.iter().filter(|l| l["end"] == "unseen").count() as u64;
    eprintln!("churn: {unseen} lives cut short by the kernel ({unshown} with no TIME_WAIT seen)");
    assert!(
        unseen.max(unshown) * 10_000 <= connections,
        "{unseen} lives ended unseen, {unshown} without their TIME_WAIT, in {connections} connections"
    );
    let with_tw = by_cookie
        .values()
        .filter(|socket| socket.iter().any(|l| state_names(l).contains(&"TIME_WAIT")))
        .count() as u64;
    // When they differ: the server sockets with no TIME_WAIT (each should have had one).
    let without_tw: Vec<&&Value> = by_cookie
        .values()
        .filter(|socket| {
            socket[0]["role"] == "passive"
                && !socket.iter().any(|l| state_names(l).contains(&"TIME_WAIT"))
        })
        .flat_map(|socket| socket.iter())
        .take(6)
        .collect();
    assert_eq!(
        with_tw + unshown,
        kernel_tw,
        "sockets with a TIME_WAIT (+ {unshown} the kernel did not show) vs TcpExtTW; server sockets without one: {without_tw:#?}"
    );
    let clients = lives.iter().filter(|l| l["role"] == "active").count() as u64;
    assert_eq!(clients, kernel_opens, "client lives vs TcpActiveOpens");
    for life in &lives {
        let states = state_names(life);
        let syn_sent = states.iter().filter(|s| **s == "SYN_SENT").count();
        assert!(syn_sent <= 1, "two connections in one life: {life}");
        if let Some(ns) = span_ns(life, "TIME_WAIT") {
            assert!(ns <= TIME_WAIT_MAX.as_nanos() as u64, "{life}");
            assert!(
                ["time_wait_killed", "time_wait_expired"].contains(&life["end"].as_str().unwrap()),
                "{life}"
            );
        }
    }
}

/// The lives with the addresses and ports of `life` (either way round), in the order they
/// ended.
fn same_four_tuple<'a>(lives: &'a [Value], life: &Value) -> Vec<&'a Value> {
    let ends = |l: &Value| {
        let a = format!("{}:{}", l["saddr"], l["sport"]);
        let b = format!("{}:{}", l["daddr"], l["dport"]);
        if a <= b { (a, b) } else { (b, a) }
    };
    lives.iter().filter(|l| ends(l) == ends(life)).collect()
}

/// `threads` clients connect to 127.0.0.1:`port` as fast as they can for `time`, each
/// reading to the server's close (the server closes first) and then closing. Returns how
/// many connections were made.
fn churn(port: u16, time: Duration, threads: usize) -> u64 {
    let listener = Arc::new(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let (stop_clients, stop_servers) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let done = Arc::new(AtomicU64::new(0));
    let servers: Vec<_> = (0..threads)
        .map(|_| {
            let (l, stop) = (listener.clone(), stop_servers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((c, _)) = l.accept() {
                        drop(c);
                    }
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done) = (stop_clients.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
                        // A handshake the server side never completed (its final ACK
                        // dropped at a full accept queue, with SYN cookies: nothing
                        // retries) would leave this read waiting forever.
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let _ = c.read(&mut buf);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(time);
    stop_clients.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    stop_servers.store(true, Ordering::Relaxed);
    for _ in 0..threads {
        // Wake each acceptor (these connections count too: they are real ones).
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.read(&mut [0u8; 1]);
        }
    }
    for s in servers {
        s.join().unwrap();
    }
    done.load(Ordering::Relaxed)
}

/// Two namespaces run the same connection at the same time, with identical 4-tuples
/// (127.0.0.1:41603 -> 127.0.0.1:21603, as sidecars on loopback do): two separate lives
/// each, with their own namespace, TIME_WAIT included; `--netns` keeps one namespace.
#[test]
fn equal_four_tuples_in_two_namespaces_stay_apart() {
    const PORT: u16 = 21603;
    const CLIENT_PORT: u16 = 41603;
    let mut a = NamedNetns::new("tcplens-same-a");
    let mut b = NamedNetns::new("tcplens-same-b");
    let all = start_tcplens(&["timeline", "--format", "json", "-D", &PORT.to_string()]);
    let servers_all = start_tcplens(&["timeline", "--format", "json", "-L", &PORT.to_string()]);
    let only_a = start_tcplens(&["timeline", "--format", "json", "--netns", &a.path()]);
    let both = Arc::new(Barrier::new(2));
    std::thread::scope(|s| {
        for ns in [&a, &b] {
            let both = both.clone();
            s.spawn(move || {
                ns.run(move || {
                    let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
                    let mut client = connect_from(CLIENT_PORT, PORT);
                    let (server, _) = listener.accept().unwrap();
                    both.wait(); // both connections are up: the same 4-tuple twice
                    drop(server);
                    assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0);
                    drop(client);
                    both.wait();
                    std::thread::sleep(Duration::from_millis(100));
                });
            });
        }
    });
    let (ino_a, ino_b) = (a.inode(), b.inode());
    // `--netns a` stops while a lives: once it is deleted, the kernel may give its inode
    // number to a namespace another test makes (seen: a churn's, 949 connections), and the
    // filter is that number. Its lives still open then end as still open.
    let only_a = finish(only_a);
    a.delete();
    b.delete();
    std::thread::sleep(Duration::from_millis(300));
    let (all, servers_all) = (finish(all), finish(servers_all));

    let tuple = |l: &&Value, sport: u16, dport: u16| l["sport"] == sport && l["dport"] == dport;
    let clients: Vec<&Value> = all.iter().filter(|l| tuple(l, CLIENT_PORT, PORT)).collect();
    let servers: Vec<&Value> = servers_all
        .iter()
        .filter(|l| tuple(l, PORT, CLIENT_PORT))
        .collect();
    for (lives, view) in [(&clients, "client"), (&servers, "server")] {
        let netns: HashSet<u64> = lives.iter().map(|l| l["netns"].as_u64().unwrap()).collect();
        assert_eq!(netns, HashSet::from([ino_a, ino_b]), "{view}: {lives:#?}");
        assert_eq!(lives.len(), 2, "{view}: {lives:#?}");
    }
    for c in &clients {
        assert_eq!(
            state_names(c),
            ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            "{c}"
        );
        assert_eq!(c["end"], "closed");
    }
    for s in &servers {
        assert_eq!(
            state_names(s),
            [
                "NEW_SYN_RECV",
                "SYN_RECV",
                "ESTABLISHED",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE"
            ],
            "{s}"
        );
        assert_eq!(s["end"], "time_wait_killed", "{s}");
    }
    // --netns: namespace a only, and all of it (listener, client, server).
    assert!(
        only_a.iter().all(|l| l["netns"].as_u64() == Some(ino_a)),
        "{only_a:#?}"
    );
    let roles: HashMap<&str, usize> = only_a.iter().fold(HashMap::new(), |mut m, l| {
        *m.entry(l["role"].as_str().unwrap()).or_default() += 1;
        m
    });
    assert_eq!(
        roles,
        HashMap::from([("listener", 1), ("active", 1), ("passive", 1)]),
        "{only_a:#?}"
    );
}

/// The application closes first, the peer's FIN comes 300 ms later: the kernel turns the
/// timewait socket's FIN_WAIT2 into TIME_WAIT, often without any timer event. `watch`
/// shows it within a second, stamped with the time it happened; a `timeline` that stops
/// meanwhile shows the socket in TIME_WAIT, as the kernel has it.
#[test]
fn the_turn_to_time_wait_shows_within_a_second() {
    const PORT: u16 = 21604;
    let mut ns = NamedNetns::new("tcplens-turn");
    let watch = start_tcplens(&["watch", "--format", "json", "--netns", &ns.path()]);
    let timeline = start_tcplens(&["timeline", "--format", "json", "--netns", &ns.path()]);
    let (client_port, closed, fin) = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let client = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let (server, _) = listener.accept().unwrap();
        drop(client); // the application closes first: FIN_WAIT2, as a timewait socket
        let closed = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        drop(server); // the peer's FIN
        let fin = (Instant::now(), SystemTime::now());
        std::thread::sleep(Duration::from_millis(50));
        (client_port, closed, fin)
    });
    let is_turn = |l: &str| {
        let v: Value = serde_json::from_str(l).unwrap();
        v["sport"] == client_port && v["old"] == "FIN_WAIT2" && v["new"] == "TIME_WAIT"
    };
    let (arrived, line) = watch
        .wait_for_line(Duration::from_secs(3), is_turn)
        .expect("a FIN_WAIT2 -> TIME_WAIT line");
    let late = arrived.duration_since(fin.0);
    // Within the second between flip checks (more under emulation, where the check
    // itself takes a while).
    assert!(
        late < slack(Duration::from_secs(1)),
        "shown {late:?} after the FIN"
    );
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["via"], "timewait");
    let stamped: jiff::Timestamp = v["time"].as_str().unwrap().parse().unwrap();
    let fin_wall = jiff::Timestamp::try_from(fin.1).unwrap();
    let off = (stamped.as_nanosecond() - fin_wall.as_nanosecond()).unsigned_abs();
    assert!(
        off < 10_000_000,
        "stamped {stamped}, the FIN was at {fin_wall}"
    );
    let fin_wait2 = fin.0 - closed;
    let got = v["old_ns"].as_u64().unwrap();
    assert!(
        near(got, fin_wait2, slack(Duration::from_millis(10))),
        "{got} vs {fin_wait2:?}"
    );

    // Stopped now, while the socket sits in TIME_WAIT.
    let lives = finish(timeline);
    let client: Vec<&Value> = lives.iter().filter(|l| l["sport"] == client_port).collect();
    assert_eq!(client.len(), 1, "{lives:#?}");
    assert_eq!(client[0]["end"], "still_open");
    assert_eq!(
        state_names(client[0]),
        [
            "SYN_SENT",
            "ESTABLISHED",
            "FIN_WAIT1",
            "FIN_WAIT2",
            "TIME_WAIT"
        ]
    );
    ns.delete();
    finish(watch);
}

/// The capabilities the deploy files grant are all tcplens needs, TIME_WAIT included: run
/// under exactly that set (a root service whose bounding set is the unit's), it follows a
/// socket into TIME_WAIT.
#[test]
fn the_shipped_capabilities_keep_time_wait_on() {
    const PORT: u16 = 21605;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/tcplens.service")).unwrap();
    let caps_of = |key: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in the unit"));
        line[key.len()..]
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_lowercase())
            .collect()
    };
    let bounding = caps_of("CapabilityBoundingSet=");
    assert_eq!(bounding, caps_of("AmbientCapabilities="));
    // The DaemonSet grants the same set.
    let ds = std::fs::read_to_string(root.join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let add = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities in the DaemonSet");
    let mut ds_caps: Vec<String> = add
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_lowercase())
        .collect();
    let mut unit_caps = bounding.clone();
    ds_caps.sort();
    unit_caps.sort();
    assert_eq!(
        ds_caps, unit_caps,
        "the DaemonSet and the unit grant the same"
    );

    let mut ns = NamedNetns::new("tcplens-caps");
    let set = format!(
        "-all,{}",
        bounding
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    // As systemd runs it: root, with the unit's bounding set (so exactly those effective).
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--bounding-set", &set, "--", TCPLENS]).args([
        "watch",
        "--format",
        "json",
        "--netns",
        &ns.path(),
    ]);
    let watch = start_command(cmd);
    assert!(watch.preamble.is_empty(), "{:?}", watch.preamble);
    let effective = std::fs::read_to_string(format!("/proc/{}/status", watch.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        .unwrap();
    let effective = u64::from_str_radix(&effective, 16).unwrap();
    assert_eq!(
        effective.count_ones() as usize,
        bounding.len(),
        "{effective:x}"
    );
    ns.run(|| {
        let p = connect_pair("127.0.0.1", PORT);
        drop(p.server); // the server closes first...
        let mut client = p.client;
        assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0);
        drop(client); // ...and enters TIME_WAIT when the client's FIN comes
        std::thread::sleep(Duration::from_millis(50));
    });
    ns.delete();
    std::thread::sleep(Duration::from_millis(300));
    let out = finish(watch);
    let via_timewait: Vec<&Value> = out.iter().filter(|v| v["via"] == "timewait").collect();
    let steps: Vec<(&str, &str)> = via_timewait
        .iter()
        .filter(|v| v["sport"] == PORT)
        .map(|v| (v["old"].as_str().unwrap(), v["new"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [("FIN_WAIT2", "TIME_WAIT"), ("TIME_WAIT", "CLOSE")],
        "{out:#?}"
    );
}

/// A recording replays into the same lives as the live run saw: the same sockets (cookies),
/// joins and ends, and the same durations within a jiffy (live, a silent turn to TIME_WAIT
/// is stamped by sock_diag; a replay places it from the timer's expiry).
#[test]
fn a_recording_replays_the_same_lives() {
    const PORT: u16 = 21606;
    const CLIENT_PORT: u16 = 41606;
    let mut ns = NamedNetns::new("tcplens-replay");
    let file = std::env::temp_dir().join(format!("tcplens-replay-{}.rec", std::process::id()));
    let file_arg = file.to_str().unwrap().to_string();
    let record = start_tcplens(&["record", "-o", &file_arg, "--netns", &ns.path()]);
    let live = start_tcplens(&["timeline", "--format", "json", "--netns", &ns.path()]);
    ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        for _ in 0..2 {
            let mut client = connect_from(CLIENT_PORT, PORT);
            let (server, _) = listener.accept().unwrap();
            drop(server);
            assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0);
            drop(client);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    ns.delete();
    std::thread::sleep(Duration::from_millis(300));
    let live = finish(live);
    let recorded = record.stop();
    assert!(recorded.status.success(), "{}", recorded.stderr);
    let replay = std::process::Command::new(TCPLENS)
        .args(["timeline", "--format", "json", "--from", &file_arg])
        .output()
        .unwrap();
    std::fs::remove_file(&file).ok();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed = json_lines(&String::from_utf8_lossy(&replay.stdout));

    let by_cookie = |lives: &[Value]| -> HashMap<u64, Value> {
        lives
            .iter()
            .map(|l| (l["cookie"].as_u64().unwrap(), l.clone()))
            .collect()
    };
    // This test's port only, as in a_reused_four_tuple_gives_each_connection_its_time_wait.
    let (live, replayed) = (on_port(live, PORT), on_port(replayed, PORT));
    let (live, replayed) = (by_cookie(&live), by_cookie(&replayed));
    assert_eq!(
        live.len(),
        5,
        "a listener, two clients, two servers: {live:#?}"
    );
    assert_eq!(
        live.keys().collect::<HashSet<_>>(),
        replayed.keys().collect::<HashSet<_>>()
    );
    for (cookie, l) in &live {
        let r = &replayed[cookie];
        for key in ["end", "role", "sport", "dport", "netns", "owner_pid"] {
            assert_eq!(l[key], r[key], "{key} of {cookie}: {l} vs {r}");
        }
        assert_eq!(state_names(l), state_names(r), "{l} vs {r}");
        for (a, b) in l["states"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["states"].as_array().unwrap())
        {
            if let (Some(x), Some(y)) = (a["ns"].as_u64(), b["ns"].as_u64()) {
                // Within a tick at HZ=250 (more under emulation, where the tick drifts).
                assert!(
                    x.abs_diff(y) <= slack(Duration::from_millis(4)).as_nanos() as u64,
                    "{} of {cookie}: {x} vs {y}",
                    a["state"]
                );
            }
        }
    }
}

/// Lost events leave sockets the tracker believes alive (their close was lost): the next
/// sock_diag listing (every 10 s, later while the host thread is busy) ends them `unseen`,
/// counts them, and the live counts are the kernel's again, and stay so. A ring buffer of
/// one page and a burst of connections make the loss.
#[test]
fn sockets_whose_end_was_lost_go_within_one_resync() {
    const PORT: u16 = 21607;
    const BURST: usize = 3_000;
    let mut ns = NamedNetns::new("tcplens-resync");
    let stats = start_tcplens(&[
        "stats",
        "--format",
        "json",
        "--interval",
        "1s",
        "--ring-size",
        "4K",
        "--netns",
        &ns.path(),
    ]);
    // Sockets counted alive that are neither the listener nor in TIME_WAIT (the clients').
    let phantoms = |r: &Value| -> u64 {
        r["live"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(state, _)| !["LISTEN", "TIME_WAIT"].contains(&state.as_str()))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum()
    };
    // Bursts until a report after one shows a socket counted alive: which closes the full
    // ring drops is up to the scheduling, and a lost close whose socket address the burst
    // reuses ends `unseen` (reused) at once. Once the bursts stop, only a listing can end
    // what is left. The listener stays open (LISTEN) until the end.
    let mut listener = ns.run(move || TcpListener::bind(("127.0.0.1", PORT)).unwrap());
    let mut burst_ended;
    let mut bursts = 0;
    loop {
        bursts += 1;
        (listener, burst_ended) = ns.run(move || {
            let server = std::thread::spawn(move || {
                for _ in 0..BURST {
                    let (mut s, _) = listener.accept().unwrap();
                    let _ = s.read(&mut [0u8; 1]); // the client closes first
                }
                listener
            });
            for _ in 0..BURST {
                drop(TcpStream::connect(("127.0.0.1", PORT)).unwrap());
            }
            (server.join().unwrap(), Instant::now())
        });
        let deadline = Instant::now() + slack(Duration::from_secs(5));
        let first_after = loop {
            let after = stats
                .lines_so_far()
                .into_iter()
                .find(|(at, _)| *at > burst_ended);
            if let Some((_, l)) = after {
                break serde_json::from_str::<Value>(&l).unwrap();
            }
            assert!(Instant::now() < deadline, "no report after the burst");
            std::thread::sleep(Duration::from_millis(50));
        };
        if phantoms(&first_after) > 0 {
            break;
        }
        assert!(
            bursts < 5,
            "five bursts of {BURST} connections left no socket counted alive past a report"
        );
    }
    let reports_from = |t: Instant| -> Vec<Value> {
        stats
            .lines_so_far()
            .into_iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, l)| serde_json::from_str(&l).unwrap())
            .collect()
    };
    // The first report since the burst with no phantom left: a listing has judged them.
    let deadline = Instant::now() + slack(Duration::from_secs(40));
    let clear = |l: &str| phantoms(&serde_json::from_str(l).unwrap()) == 0;
    let first_clear = || {
        let lines = stats.lines_so_far();
        lines
            .into_iter()
            .find(|(at, l)| *at > burst_ended && clear(l))
            .map(|(at, _)| at)
    };
    let cleared = loop {
        if let Some(at) = first_clear() {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no listing ended the phantoms: {:#?}",
            reports_from(burst_ended)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // It and the two reports after it: the live counts stay the kernel's.
    let settled = loop {
        let settled = reports_from(cleared);
        if settled.len() >= 3 {
            break settled;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(5),
            "reports stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(listener);
    let f = stats.stop();
    ns.delete();
    assert!(f.status.success(), "{}", f.stderr);
    let reports = json_lines(&f.stdout);
    let last = reports.last().expect("a final report");
    assert!(
        last["lost_events"].as_u64().unwrap() > 0,
        "the burst overflowed the ring: {last}"
    );
    assert!(
        reports.iter().any(|r| phantoms(r) > 0),
        "lost closes left sockets counted alive: {reports:#?}"
    );
    for r in settled {
        assert_eq!(phantoms(&r), 0, "{r}");
        assert!(r["ended_unseen"]["gone"].as_u64().unwrap() > 0, "{r}");
    }
}
