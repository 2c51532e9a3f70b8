//! Real kernel: each socket's own cgroup (also for transitions that run in softirq on top
//! of another process), `--cgroup` in the kernel, an accepted socket's owner from its
//! first event, and each connection's bytes, RTT and retransmits at its end, against what
//! the kernel itself reports (TCP_INFO).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tracer::model::TcpState;
use tracer::source::cgroup::{CgroupFilter, CgroupNames, cgroup2_mount};
use tracer::source::sockdiag::dump_here;

/// A cgroup the test makes under the cgroup2 root, removed (once empty) when dropped.
struct TestCgroup {
    dir: PathBuf,
    /// Its path relative to the cgroup2 root, as tcplens prints it.
    rel: String,
    id: u64,
    /// Its `cgroup.procs`, open for writing: a child writes "0" to move itself in.
    procs: std::fs::File,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let root = cgroup2_mount().expect("a cgroup2 mount");
        let rel = format!("/{name}-{}", std::process::id());
        let dir = root.join(&rel[1..]);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("mkdir in the cgroup2 root");
        let id = std::fs::metadata(&dir).expect("cgroup dir").ino();
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .expect("cgroup.procs");
        TestCgroup {
            dir,
            rel,
            id,
            procs,
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited (and were reaped): it is empty.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The cgroup v2 id of this process (`0::/path` in /proc/self/cgroup).
fn own_cgroup_id() -> u64 {
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let root = cgroup2_mount().expect("a cgroup2 mount");
    std::fs::metadata(root.join(path.trim_start_matches('/')))
        .expect("own cgroup dir")
        .ino()
}

/// Waits until tcplens printed `n` lines and nothing more came for a while.
fn settle_lines(t: &Running, n: usize) {
    let deadline = Instant::now() + slack(Duration::from_secs(10));
    while t.lines_so_far().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(slack(Duration::from_millis(300)));
}

#[test]
fn each_socket_carries_its_own_cgroup_and_the_filter_keeps_one() {
    const PORT_A: u16 = 21401;
    const PORT_B: u16 = 21402;
    let ns = NamedNetns::new("tl-cgroups");
    let netns = ns.inode().to_string();
    let a = TestCgroup::new("tcplens-test-a");
    let b = TestCgroup::new("tcplens-test-b");
    let mine = own_cgroup_id();
    assert!(mine != a.id && mine != b.id);

    let all = start_tcplens(&["watch", "--format", "json", "--netns", &netns]);
    let only_a = start_tcplens(&[
        "watch", "--format", "json", "--netns", &netns, "--cgroup", &a.rel,
    ]);
    let (a_fd, b_fd) = (a.procs.as_raw_fd(), b.procs.as_raw_fd());
    let ns_inode = u32::try_from(ns.inode()).unwrap();
    let (server_a, server_b, client_in_a, listed) = ns.run(move || {
        let hold = Duration::from_millis(50);
        let server_a = ForkedServer::start_in(PORT_A, c"t14-server-a", hold, Some(a_fd));
        let server_b = ForkedServer::start_in(PORT_B, c"t14-server-b", hold, Some(b_fd));
        // What sock_diag says of the listeners (the start-up snapshot's and `leaks`' source).
        let listed: Vec<(u16, u64)> = dump_here(&[TcpState::Listen], ns_inode)
            .expect("sock_diag")
            .into_iter()
            .map(|s| (s.id.sport, s.cgroup))
            .collect();
        // This thread (in the test's own cgroup) is server A's client.
        let mut c = TcpStream::connect(("127.0.0.1", PORT_A)).expect("connect");
        c.write_all(b"hello").unwrap();
        drop(c);
        let a_pid = server_a.pid;
        server_a.finish();
        // A client in cgroup A, of server B: it closes first, so its socket ends in
        // TIME_WAIT, which the kernel cannot filter (a timewait socket has no cgroup).
        let client = forked_client(PORT_B, c"t14-client-a", a_fd);
        let b_pid = server_b.pid;
        server_b.finish();
        (a_pid, b_pid, client, listed)
    });
    // Listeners A and B (2 each), their children (5 each), the test's client of A and the
    // A client of B (5 each: SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT; the
    // full socket's CLOSE as it turns timewait is not a step of the TCP view).
    settle_lines(&all, 2 * 2 + 2 * 5 + 2 * 5);
    let lines = json_lines(&succeeded(all.stop()));
    let kept = json_lines(&succeeded(only_a.stop()));

    let mut listed = listed;
    listed.sort_unstable();
    assert_eq!(
        listed,
        [(PORT_A, a.id), (PORT_B, b.id)],
        "INET_DIAG_CGROUP_ID"
    );
    // A passive child's first line (LISTEN -> SYN_RECV) has no cookie on kernels that set
    // that state before giving the child its own (6.1: it still carries its listener's,
    // which tcplens does not repeat); its address joins it to its next line, which has.
    let by_cookie = |lines: &[Value]| {
        let mut m: HashMap<u64, Vec<Value>> = HashMap::new();
        for (i, l) in lines.iter().enumerate() {
            let cookie = l["cookie"].as_u64().or_else(|| {
                lines[i + 1..]
                    .iter()
                    .find(|n| n["sk"] == l["sk"])
                    .and_then(|n| n["cookie"].as_u64())
            });
            m.entry(cookie.unwrap_or_else(|| panic!("no cookie: {l}")))
                .or_default()
                .push(l.clone());
        }
        m
    };
    let sockets = by_cookie(&lines);
    // Each socket's cgroup, the same on all its lines (softirq ones included).
    let mut cgroup_of = HashMap::new();
    for (cookie, ls) in &sockets {
        let ids: BTreeSet<u64> = ls.iter().filter_map(|l| l["cgroup_id"].as_u64()).collect();
        assert_eq!(ids.len(), 1, "one cgroup per socket: {ls:#?}");
        cgroup_of.insert(*cookie, *ids.first().unwrap());
    }
    let a_sockets: BTreeSet<u64> = sockets
        .iter()
        .filter(|(_, ls)| ls.iter().any(|l| l["sport"] == PORT_A))
        .map(|(c, _)| *c)
        .collect();
    let b_sockets: BTreeSet<u64> = sockets
        .iter()
        .filter(|(_, ls)| ls.iter().any(|l| l["sport"] == PORT_B))
        .map(|(c, _)| *c)
        .collect();
    let client_a: BTreeSet<u64> = sockets
        .iter()
        .filter(|(_, ls)| ls.iter().any(|l| l["dport"] == PORT_B))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!((a_sockets.len(), b_sockets.len()), (2, 2), "{lines:#?}");
    assert_eq!(client_a.len(), 1, "{lines:#?}");
    for c in &a_sockets {
        assert_eq!(cgroup_of[c], a.id, "server A's sockets: {:#?}", sockets[c]);
    }
    for c in &b_sockets {
        assert_eq!(cgroup_of[c], b.id, "server B's sockets: {:#?}", sockets[c]);
    }
    let client_a = *client_a.first().unwrap();
    assert_eq!(cgroup_of[&client_a], a.id);
    assert_eq!(
        sockets[&client_a][0]["owner_pid"],
        u64::from(client_in_a),
        "its connect(), in its own context"
    );
    for (c, id) in &cgroup_of {
        if !a_sockets.contains(c) && !b_sockets.contains(c) && *c != client_a {
            assert_eq!(*id, mine, "the test's own client: {:#?}", sockets[c]);
        }
    }
    assert_eq!(cgroup_of.len(), 6, "{lines:#?}");
    // Named: the path under the cgroup2 root, not a container.
    let line_a = &sockets[a_sockets.first().unwrap()][0];
    assert_eq!(line_a["cgroup"], a.rel.as_str(), "{line_a}");
    assert!(line_a["container"].is_null() && line_a["pod_uid"].is_null());

    // Child A's handshake ran in softirq on top of another task than server A (asleep in
    // accept(): the client's connect() on loopback, or ksoftirqd): its cgroup is still the
    // socket's, A, and its owner server A's from its very first event on. (By socket: on
    // 6.1 its first line has no peer yet.)
    let child_a: Vec<&Value> = a_sockets
        .iter()
        .map(|c| &sockets[c])
        .find(|ls| ls.iter().any(|l| l["dport"] != 0))
        .expect("child A")
        .iter()
        .collect();
    let step = |old: &str, new: &str| {
        *child_a
            .iter()
            .find(|l| l["old"] == old && l["new"] == new)
            .unwrap_or_else(|| panic!("{old} -> {new} of child A: {child_a:#?}"))
    };
    for (old, new) in [
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
    ] {
        let l = step(old, new);
        if new != "CLOSE_WAIT" {
            // (The client's FIN may wait in the socket's backlog and run in server A's
            // read().)
            assert_ne!(
                l["pid"],
                u64::from(server_a),
                "not in server A's context: {l}"
            );
        }
        assert_eq!(l["cgroup_id"], a.id, "{l}");
        assert_eq!(l["owner_pid"], u64::from(server_a), "inherited: {l}");
        assert_eq!(l["owner_comm"], "t14-server-a", "{l}");
    }
    // Server B's child, too, when its client was another process in cgroup A.
    let child_b_first = lines
        .iter()
        .find(|l| l["sport"] == PORT_B && l["new"] == "SYN_RECV")
        .expect("child B");
    assert_ne!(child_b_first["pid"], u64::from(server_b));
    assert_eq!(child_b_first["owner_pid"], u64::from(server_b));
    assert_eq!(child_b_first["cgroup_id"], b.id);
    // The A client's TIME_WAIT (derived from its timewait socket's timer) keeps its cgroup.
    let tw = sockets[&client_a]
        .iter()
        .find(|l| l["new"] == "TIME_WAIT")
        .unwrap_or_else(|| panic!("the A client's TIME_WAIT: {:#?}", sockets[&client_a]));
    assert_eq!(
        (tw["via"].as_str(), tw["cgroup_id"].as_u64()),
        (Some("timewait"), Some(a.id))
    );

    // `--cgroup A`: exactly the lines of A's sockets, TIME_WAIT included.
    let want: Vec<&Value> = lines.iter().filter(|l| l["cgroup_id"] == a.id).collect();
    let got: Vec<&Value> = kept.iter().collect();
    let key = |l: &&Value| (l["sk"].clone(), l["old"].clone(), l["new"].clone());
    assert_eq!(
        got.iter().map(key).collect::<Vec<_>>(),
        want.iter().map(key).collect::<Vec<_>>(),
        "{kept:#?}"
    );
    assert_eq!(want.len(), 2 + 5 + 5, "listener, child and client of A");
}

/// The cgroup id -> path index over the real hierarchy, and `--cgroup`'s userspace test
/// (sock_diag's snapshot): a cgroup and those below it.
#[test]
fn cgroup_paths_and_the_filters_userspace_test() {
    let parent = TestCgroup::new("tcplens-test-index");
    let sub = parent.dir.join("sub");
    std::fs::create_dir(&sub).expect("mkdir below it");
    let sub_id = std::fs::metadata(&sub).unwrap().ino();
    let root = cgroup2_mount().unwrap();
    let root_id = std::fs::metadata(&root).unwrap().ino();
    let mut names = CgroupNames::new(root.clone());
    let filter = CgroupFilter::resolve(&parent.dir.display().to_string());
    let relative = CgroupFilter::resolve(&parent.rel);
    let bare = CgroupFilter::resolve(parent.rel.trim_start_matches('/'));
    let not_cgroup = CgroupFilter::resolve("/tcplens-no-such-cgroup");
    let kept = filter.clone().map(|f| {
        (
            f.keeps(parent.id, &mut names),
            f.keeps(sub_id, &mut names),
            f.keeps(root_id, &mut names),
        )
    });
    let sub_path = names.path(sub_id).map(str::to_string);
    std::fs::remove_dir(&sub).unwrap();
    assert_eq!(sub_path, Some(format!("{}/sub", parent.rel)));
    assert_eq!(names.path(root_id), Some("/"));
    // Removed since: the path it had.
    assert_eq!(names.path(sub_id).map(str::to_string), sub_path);
    let filter = filter.expect("the test's cgroup");
    assert_eq!(
        (filter.id, filter.path.as_str()),
        (parent.id, parent.rel.as_str())
    );
    assert_eq!(relative, Ok(filter.clone()));
    assert_eq!(bare, Ok(filter));
    // Its own sockets and those below it, not its parent's.
    assert_eq!(kept, Ok((true, true, false)));
    let err = not_cgroup.unwrap_err();
    assert!(err.contains("tcplens-no-such-cgroup"), "{err}");
}

/// `struct tcp_info` (uapi `linux/tcp.h`), the fields this test reads, by offset.
struct TcpInfo {
    /// `tcpi_state`: 7 is CLOSE.
    state: u8,
    total_retrans: u32,
    bytes_acked: u64,
    bytes_received: u64,
    min_rtt_us: u32,
}

fn tcp_info(s: &TcpStream) -> TcpInfo {
    let mut raw = [0u8; 232];
    let mut len = raw.len() as nix::libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes.
    let rc = unsafe {
        nix::libc::getsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            raw.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    assert!(rc == 0 && len >= 152, "TCP_INFO: {rc} {len}");
    let u32_at = |o: usize| u32::from_ne_bytes(raw[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().unwrap());
    TcpInfo {
        state: raw[0],
        total_retrans: u32_at(100),
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
        min_rtt_us: u32_at(148),
    }
}

fn life_of(lives: &[Value], sport: u16, dport: u16) -> &Value {
    lives
        .iter()
        .find(|l| l["sport"] == sport && l["dport"] == dport)
        .unwrap_or_else(|| panic!("no life {sport} > {dport}: {lives:#?}"))
}

#[test]
fn bytes_and_rtt_at_the_end_of_a_connection_are_the_kernels() {
    const PORT: u16 = 21403;
    const OUT: usize = 100_000;
    const BACK: usize = 5_000;
    let ns = NamedNetns::new("tl-bytes");
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "--netns",
        &ns.inode().to_string(),
    ]);
    let (client_port, client_info, server_info) = ns.run(|| {
        let l = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&vec![7u8; OUT]).unwrap();
        let mut got = vec![0u8; OUT];
        s.read_exact(&mut got).unwrap();
        s.write_all(&[9u8; BACK]).unwrap();
        let mut back = vec![0u8; BACK];
        c.read_exact(&mut back).unwrap();
        // The client shuts down first, then the server, each keeping its descriptor: once
        // both are CLOSE (the client's connection carried on by a timewait socket, the
        // server's after LAST_ACK) their counters are final, the ones tcplens read at
        // their -> CLOSE, retransmissions included (emulated kernels retransmit now and
        // then, even on loopback).
        let port = c.local_addr().unwrap().port();
        let mut eof = [0u8; 1];
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(s.read(&mut eof).unwrap(), 0);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.read(&mut eof).unwrap(), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (tcp_info(&c).state, tcp_info(&s).state) != (7, 7) {
            assert!(Instant::now() < deadline, "both sides CLOSE");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (client_info, server_info) = (tcp_info(&c), tcp_info(&s));
        drop((c, s, l));
        (port, client_info, server_info)
    });
    std::thread::sleep(slack(Duration::from_millis(500)));
    let lives = json_lines(&succeeded(timeline.stop()));
    let client = life_of(&lives, client_port, PORT);
    let server = life_of(&lives, PORT, client_port);
    assert_eq!(client["role"], "active");
    assert_eq!(server["role"], "passive");

    // What the kernel counts, in sequence space: the client's bytes_acked is its payload
    // plus its SYN and its FIN (once acked), its bytes_received the payload back plus the
    // server's FIN; the server's acked has no SYN-ACK in it (a child starts past it).
    assert_eq!(client["bytes_acked"], OUT as u64 + 2, "{client}");
    assert_eq!(client["bytes_received"], BACK as u64 + 1, "{client}");
    assert_eq!(server["bytes_acked"], BACK as u64 + 1, "{server}");
    assert_eq!(server["bytes_received"], OUT as u64 + 1, "{server}");
    // The same as TCP_INFO says at the end, retransmissions too.
    for (life, info) in [(client, &client_info), (server, &server_info)] {
        assert_eq!(
            (
                &life["bytes_acked"],
                &life["bytes_received"],
                &life["retrans"]
            ),
            (
                &Value::from(info.bytes_acked),
                &Value::from(info.bytes_received),
                &Value::from(info.total_retrans)
            ),
            "{life}"
        );
        let srtt = life["srtt_us"].as_u64().expect("srtt");
        let min = life["min_rtt_us"].as_u64().expect("min rtt");
        // The lowest sample can only have gone down since TCP_INFO read it.
        assert!(
            min > 0 && min <= u64::from(info.min_rtt_us),
            "{life} vs {}",
            info.min_rtt_us
        );
        assert!(
            srtt >= min,
            "a smoothed RTT is never below the lowest sample: {life}"
        );
    }
}

fn ip(args: &[&str]) {
    let ok = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(ok.success(), "ip {args:?}");
}

/// Two namespaces joined by a veth pair; the client's packets to the server are dropped
/// (its neighbour entry points at a made-up MAC) until it retransmitted twice, then
/// delivered.
#[test]
fn retransmits_at_the_end_are_the_kernels() {
    const PORT: u16 = 21404;
    let client_ns = NamedNetns::new("tl-rtx-c");
    let server_ns = NamedNetns::new("tl-rtx-s");
    ip(&[
        "link",
        "add",
        "rtx0",
        "netns",
        &client_ns.name,
        "type",
        "veth",
        "peer",
        "name",
        "rtx1",
        "netns",
        &server_ns.name,
    ]);
    ip(&[
        "-n",
        &client_ns.name,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        "rtx0",
    ]);
    ip(&[
        "-n",
        &server_ns.name,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        "rtx1",
    ]);
    ip(&["-n", &client_ns.name, "link", "set", "rtx0", "up"]);
    ip(&["-n", &server_ns.name, "link", "set", "rtx1", "up"]);
    let mac = {
        let out = std::process::Command::new("ip")
            .args(["-n", &server_ns.name, "-br", "link", "show", "rtx1"])
            .output()
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .nth(2)
            .expect("rtx1's MAC")
            .to_string()
    };
    let client_name = client_ns.name.clone();
    let neigh = move |lladdr: &str| {
        ip(&[
            "-n",
            &client_name,
            "neigh",
            "replace",
            "10.77.0.2",
            "lladdr",
            lladdr,
            "dev",
            "rtx0",
            "nud",
            "permanent",
        ]);
    };
    neigh(&mac);
    let server_addr = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), PORT);
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "--netns",
        &client_ns.inode().to_string(),
    ]);
    let listener = server_ns.run(move || TcpListener::bind(server_addr).unwrap());
    let (client_port, retrans) = client_ns.run(move || {
        let mut c = TcpStream::connect(server_addr).unwrap();
        // The server's packets still arrive; the client's go nowhere.
        neigh("02:00:00:00:00:77");
        c.write_all(&[1u8; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tcp_info(&c).total_retrans < 2 {
            assert!(Instant::now() < deadline, "no retransmission");
            std::thread::sleep(Duration::from_millis(10));
        }
        neigh(&mac);
        // Delivered and acked by the retransmission that follows.
        while tcp_info(&c).bytes_acked < 1001 {
            assert!(Instant::now() < deadline, "never delivered");
            std::thread::sleep(Duration::from_millis(10));
        }
        let retrans = tcp_info(&c).total_retrans;
        let port = c.local_addr().unwrap().port();
        drop(c);
        (port, retrans)
    });
    let (mut s, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 1000);
    drop(s);
    std::thread::sleep(slack(Duration::from_millis(500)));
    let lives = json_lines(&succeeded(timeline.stop()));
    let client = life_of(&lives, client_port, PORT);
    assert!(
        retrans >= 3,
        "at least two lost and one delivered: {retrans}"
    );
    assert_eq!(client["retrans"], u64::from(retrans), "{client}");
    assert_eq!(client["bytes_acked"], 1002, "{client}");
}
