//! Real kernel: TIME_WAIT followed through the timewait socket's timer, as `tcplens`
//! reports it. Each scenario runs in a network namespace of its own; the long one (natural
//! expiry, about 62 s) runs in parallel with the others.

mod common;

use std::collections::HashSet;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;

fn finish(r: Running) -> String {
    let f = r.wait();
    assert!(f.status.success(), "tcplens failed: {}", f.stderr);
    assert_nothing_lost(&f.stderr);
    assert!(
        !f.stderr.contains("TIME_WAIT tracking unavailable"),
        "{}",
        f.stderr
    );
    f.stdout
}

fn names(life: &Value) -> Vec<String> {
    life["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect()
}

/// `ss -Htan state time-wait` in the calling thread's namespace: (local port, remote port).
fn ss_time_wait() -> Vec<(u16, u16)> {
    let out = Command::new("ss")
        .args(["-Htan", "state", "time-wait"])
        .output()
        .expect("running ss");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let port = |c: &str| c.rsplit(':').next()?.parse().ok();
            Some((port(cols.get(2)?)?, port(cols.get(3)?)?))
        })
        .collect()
}

/// An active socket's TCP view through TIME_WAIT.
const THROUGH_TIME_WAIT: [&str; 6] = [
    "SYN_SENT",
    "ESTABLISHED",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
];

/// The timer wheel runs a 60 s timer in a bucket of 512 jiffies (2.048 s at HZ=250): a
/// TIME_WAIT lasts from 60 s to 60 s + one bucket.
const WHEEL_SLACK: Duration = Duration::from_millis(2_100);

#[test]
fn natural_expiry_in_both_orders() {
    const PORT: u16 = 21501;
    let port = PORT.to_string();
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "-D",
        &port,
        "--duration",
        "66s",
    ]);
    let watch = start_tcplens(&[
        "watch",
        "--format",
        "json",
        "-D",
        &port,
        "--duration",
        "66s",
    ]);
    let measured = in_netns(|| {
        private_fd_table(); // the owner the test checks is the closer
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        // A: the application closes first, the peer's FIN comes 300 ms later.
        let a = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let a_port = a.local_addr().unwrap().port();
        let (a_srv, _) = listener.accept().unwrap();
        drop(a);
        let a_closed = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        drop(a_srv);
        let a_entry = Instant::now();
        let a_fin_wait2 = a_entry - a_closed;
        // B: the peer's FIN comes while the application still holds the socket (it shut
        // down its side only): TIME_WAIT straight from FIN_WAIT2.
        let b = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let b_port = b.local_addr().unwrap().port();
        let (b_srv, _) = listener.accept().unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let b_closed = Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        drop(b_srv);
        let b_entry = Instant::now();
        let b_fin_wait2 = b_entry - b_closed;
        std::thread::sleep(Duration::from_millis(50));
        drop(b);
        // When does each leave TIME_WAIT, as ss sees it?
        let mut gone = [None, None];
        let deadline = Instant::now() + Duration::from_secs(64);
        while gone.iter().any(Option::is_none) && Instant::now() < deadline {
            let tw = ss_time_wait();
            for (i, (p, entry)) in [(a_port, a_entry), (b_port, b_entry)].iter().enumerate() {
                if gone[i].is_none() && !tw.iter().any(|&(l, _)| l == *p) {
                    gone[i] = Some(entry.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        [
            (a_port, gone[0], a_fin_wait2),
            (b_port, gone[1], b_fin_wait2),
        ]
    });
    let out = finish(timeline);
    let me = u64::from(std::process::id());
    for (client_port, gone, fin_wait2) in measured {
        let gone = gone.expect("the timewait socket left TIME_WAIT within 64 s");
        let lives = on_port(json_lines(&out), client_port);
        assert_eq!(lives.len(), 1, "{lives:#?}");
        let life = &lives[0];
        assert_eq!(names(life), THROUGH_TIME_WAIT);
        assert_eq!(life["end"], "time_wait_expired", "{life}");
        assert_eq!(life["role"], "active");
        assert_eq!(life["owner_pid"], me, "the owner carries through: {life}");
        let tw = state_ns(life, "TIME_WAIT");
        assert!(
            tw >= 60_000_000_000 && tw <= (Duration::from_mins(1) + WHEEL_SLACK).as_nanos() as u64,
            "TIME_WAIT {tw} ns"
        );
        assert!(
            near(tw, gone, slack(Duration::from_millis(100))),
            "TIME_WAIT {tw} ns; ss saw it go after {gone:?}"
        );
        let fw2 = state_ns(life, "FIN_WAIT2");
        // From the close to the peer's FIN, as the test timed them.
        assert!(
            near(fw2, fin_wait2, slack(Duration::from_millis(15))),
            "FIN_WAIT2 {fw2} ns, measured {fin_wait2:?}"
        );
    }
    // watch: the derived transitions, marked, and never the kernel's FIN_WAIT2 -> CLOSE.
    let lines = json_lines(&finish(watch));
    for (client_port, ..) in measured {
        let mine: Vec<&Value> = lines.iter().filter(|v| v["sport"] == client_port).collect();
        let steps: Vec<(String, String, String)> = mine
            .iter()
            .map(|v| {
                (
                    v["old"].as_str().unwrap().into(),
                    v["new"].as_str().unwrap().into(),
                    v["via"].as_str().unwrap().into(),
                )
            })
            .collect();
        let s = |o: &str, n: &str, v: &str| (o.to_string(), n.to_string(), v.to_string());
        // (The first, CLOSE -> SYN_SENT, has local port 0.)
        assert_eq!(
            steps[2..],
            [
                s("FIN_WAIT1", "FIN_WAIT2", "tracepoint"),
                s("FIN_WAIT2", "TIME_WAIT", "timewait"),
                s("TIME_WAIT", "CLOSE", "timewait"),
            ],
            "{mine:#?}"
        );
        assert_eq!(mine[4]["owner_pid"], me);
        assert!(mine[4]["old_ns"].as_u64().unwrap() >= 60_000_000_000);
    }
}

/// A client socket bound to `local_port` with SO_REUSEADDR, connected to `port`.
#[test]
fn port_reuse_kills_time_wait() {
    const PORT: u16 = 21502;
    const CLIENT_PORT: u16 = 45502;
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "-L",
        &CLIENT_PORT.to_string(),
        "--duration",
        "4s",
    ]);
    let in_time_wait = in_netns(|| {
        sysctl("net/ipv4/tcp_tw_reuse", "1");
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let c = connect_from(CLIENT_PORT, PORT);
        let (srv, _) = listener.accept().unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
        drop(srv);
        let entry = Instant::now();
        // tcp_tw_reuse takes a timewait socket over once it is a second old.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(ss_time_wait(), [(CLIENT_PORT, PORT)]);
        let again = connect_from(CLIENT_PORT, PORT);
        let held = entry.elapsed();
        assert_eq!(
            ss_time_wait(),
            [],
            "the reuse took the timewait socket's place"
        );
        let (_srv, _) = listener.accept().unwrap();
        drop(again);
        held
    });
    let lives = on_port(json_lines(&finish(timeline)), CLIENT_PORT);
    let first = lives
        .iter()
        .find(|l| l["end"] == "time_wait_killed" && l["states"].as_array().unwrap().len() == 6)
        .unwrap_or_else(|| panic!("a killed TIME_WAIT: {lives:#?}"));
    assert_eq!(first["role"], "active");
    let tw = state_ns(first, "TIME_WAIT");
    assert!(
        near(tw, in_time_wait, Duration::from_millis(50)),
        "TIME_WAIT {tw} ns, test measured {in_time_wait:?}"
    );
}

#[test]
fn orphan_fin_wait2_times_out() {
    const PORT: u16 = 21504;
    let port = PORT.to_string();
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "-D",
        &port,
        "--duration",
        "4s",
    ]);
    let client_port = in_netns(|| {
        sysctl("net/ipv4/tcp_fin_timeout", "2");
        let p = connect_pair("127.0.0.1", PORT);
        drop(p.client); // the peer never closes: FIN_WAIT2 until tcp_fin_timeout
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(ss_time_wait(), []);
        drop(p.server);
        p.client_port
    });
    let lives = on_port(json_lines(&finish(timeline)), client_port);
    assert_eq!(lives.len(), 1, "{lives:#?}");
    let life = &lives[0];
    assert_eq!(
        names(life),
        ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    );
    assert_eq!(life["end"], "closed");
    // 2 s, rounded up by the timer wheel (500 jiffies: buckets of 64 jiffies, 256 ms).
    let fw2 = state_ns(life, "FIN_WAIT2");
    assert!(
        (2_000_000_000..=2_300_000_000).contains(&fw2),
        "FIN_WAIT2 {fw2} ns"
    );
}

#[test]
fn simultaneous_close_enters_time_wait_on_both_sides() {
    // As in kernel.rs (`crossing_fins`): the client goes FIN_WAIT1 -> CLOSING; the server's own FIN was acked
    // first, so it goes FIN_WAIT2 -> TIME_WAIT. (Both sides in CLOSING needs the two FINs
    // in flight at once, which loopback without netem cannot hold deterministically.)
    const PORT: u16 = 21505;
    let timeline = start_tcplens(&["timeline", "--format", "json", "--duration", "3s"]);
    let client_port = in_netns(|| {
        let (client_port, sent, received) = crossing_fins(PORT);
        assert_eq!(received, sent);
        std::thread::sleep(Duration::from_millis(300));
        let tw: HashSet<(u16, u16)> = ss_time_wait().into_iter().collect();
        assert_eq!(
            tw,
            HashSet::from([(client_port, PORT), (PORT, client_port)]),
            "both sides in TIME_WAIT"
        );
        client_port
    });
    let lives = on_port(json_lines(&finish(timeline)), client_port);
    assert_eq!(lives.len(), 2, "{lives:#?}");
    for life in &lives {
        let n = names(life);
        let via = if life["role"] == "active" {
            "CLOSING"
        } else {
            "FIN_WAIT2"
        };
        assert_eq!(
            n[n.len() - 4..],
            ["FIN_WAIT1", via, "TIME_WAIT", "CLOSE"],
            "{life}"
        );
        // The namespace ended with the test: the kernel purged its timewait sockets.
        assert_eq!(life["end"], "time_wait_killed");
        let tw = state_ns(life, "TIME_WAIT");
        assert!(
            (300_000_000..3_000_000_000).contains(&tw),
            "TIME_WAIT {tw} ns"
        );
    }
}

#[test]
fn live_time_wait_count_equals_ss() {
    const PORT: u16 = 21506;
    const N: usize = 200;
    let port = PORT.to_string();
    let stats = start_tcplens(&[
        "stats",
        "--format",
        "json",
        "-D",
        &port,
        "--interval",
        "1s",
        "--duration",
        "6s",
    ]);
    let (all_in, counted, ss_count) = in_netns(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let pairs: Vec<(TcpStream, TcpStream)> = (0..N)
            .map(|_| {
                let c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
                (c, listener.accept().unwrap().0)
            })
            .collect();
        // The applications close first (the common order); the peers' FINs come 200 ms
        // later, which turns the timewait sockets from FIN_WAIT2 to TIME_WAIT, mostly
        // without a timer event.
        let servers: Vec<TcpStream> = pairs.into_iter().map(|(_, s)| s).collect();
        std::thread::sleep(Duration::from_millis(200));
        drop(servers);
        std::thread::sleep(Duration::from_millis(50));
        let all_in = SystemTime::now();
        std::thread::sleep(Duration::from_millis(2600));
        let counted = SystemTime::now();
        let ss_count = ss_time_wait().len();
        (all_in, counted, ss_count)
    });
    assert_eq!(ss_count, N);
    let reports = json_lines(&finish(stats));
    let in_window: Vec<&Value> = reports
        .iter()
        .filter(|r| {
            let t: jiff::Timestamp = r["time"].as_str().unwrap().parse().unwrap();
            let t = SystemTime::from(t);
            t > all_in && t < counted
        })
        .collect();
    assert!(in_window.len() >= 2, "interval reports: {reports:#?}");
    for r in in_window {
        assert_eq!(r["live"]["TIME_WAIT"], ss_count as u64, "{r}");
    }
}

/// The next sequence number `s` will send (`TCP_REPAIR` lets a privileged process read
/// it; repair mode is left again right away).
fn write_seq(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    const TCP_REPAIR: i32 = 19;
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_SEND_QUEUE: i32 = 2;
    let fd = s.as_raw_fd();
    let set = |opt: i32, v: i32| {
        // SAFETY: setsockopt on an open socket with an i32 value.
        let r = unsafe {
            nix::libc::setsockopt(fd, nix::libc::IPPROTO_TCP, opt, (&raw const v).cast(), 4)
        };
        assert_eq!(
            r,
            0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
    };
    set(TCP_REPAIR, 1);
    set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let mut seq: u32 = 0;
    let mut len: nix::libc::socklen_t = 4;
    // SAFETY: getsockopt into a u32 of the given length.
    let r = unsafe {
        nix::libc::getsockopt(
            fd,
            nix::libc::IPPROTO_TCP,
            TCP_QUEUE_SEQ,
            (&raw mut seq).cast(),
            &raw mut len,
        )
    };
    assert_eq!(r, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    set(TCP_REPAIR, 0);
    seq
}

/// Sends a bare RST from 127.0.0.1:`sport` to 127.0.0.1:`dport` with sequence `seq`,
/// through a raw socket (the kernel adds the IP header).
fn send_rst(sport: u16, dport: u16, seq: u32) {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[12] = 5 << 4; // data offset: 5 words
    h[13] = 0x04; // RST
    // Checksum over the pseudo-header (127.0.0.1 twice, protocol 6, length 20) and header.
    let mut sum: u32 = 0x7f00 + 0x0001 + 0x7f00 + 0x0001 + 6 + 20;
    for w in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // SAFETY: a raw socket, one sendto of a fully initialised buffer, then close.
    unsafe {
        let fd = nix::libc::socket(
            nix::libc::AF_INET,
            nix::libc::SOCK_RAW,
            nix::libc::IPPROTO_TCP,
        );
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = nix::libc::sockaddr_in {
            sin_family: nix::libc::AF_INET as nix::libc::sa_family_t,
            sin_port: 0,
            sin_addr: nix::libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let n = nix::libc::sendto(
            fd,
            h.as_ptr().cast(),
            h.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<nix::libc::sockaddr_in>() as nix::libc::socklen_t,
        );
        assert_eq!(n, 20, "sendto: {}", std::io::Error::last_os_error());
        nix::libc::close(fd);
    }
}

#[test]
fn rst_kills_time_wait() {
    const PORT: u16 = 21503;
    let port = PORT.to_string();
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "-D",
        &port,
        "--duration",
        "3s",
    ]);
    let (client_port, in_time_wait) = in_netns(|| {
        sysctl("net/ipv4/tcp_rfc1337", "0");
        let p = connect_pair("127.0.0.1", PORT);
        drop(p.client);
        std::thread::sleep(Duration::from_millis(100));
        // The server's FIN will carry this sequence number; the timewait socket then
        // expects seq + 1 next, and an RST there "assassinates" it (RFC 1337).
        let seq = write_seq(&p.server);
        drop(p.server);
        let entry = Instant::now();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(ss_time_wait(), [(p.client_port, PORT)]);
        send_rst(PORT, p.client_port, seq.wrapping_add(1));
        let held = entry.elapsed();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ss_time_wait(), [], "the RST killed the timewait socket");
        (p.client_port, held)
    });
    let lives = on_port(json_lines(&finish(timeline)), client_port);
    assert_eq!(lives.len(), 1, "{lives:#?}");
    let life = &lives[0];
    assert_eq!(names(life), THROUGH_TIME_WAIT);
    assert_eq!(life["end"], "time_wait_killed");
    let tw = state_ns(life, "TIME_WAIT");
    assert!(
        near(tw, in_time_wait, Duration::from_millis(30)),
        "TIME_WAIT {tw} ns, test measured {in_time_wait:?}"
    );
}

#[test]
fn no_timewait_shows_the_kernel_view() {
    const PORT: u16 = 21507;
    let port = PORT.to_string();
    let timeline = start_tcplens(&[
        "timeline",
        "--format",
        "json",
        "--no-timewait",
        "-D",
        &port,
        "--duration",
        "2s",
    ]);
    let client_port = in_netns(|| {
        let p = connect_pair("127.0.0.1", PORT);
        drop(p.client);
        std::thread::sleep(Duration::from_millis(100));
        drop(p.server);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ss_time_wait(), [(p.client_port, PORT)]);
        p.client_port
    });
    let f = timeline.wait();
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stderr.contains("(0 timewait, "), "{}", f.stderr);
    let lives = on_port(json_lines(&f.stdout), client_port);
    assert_eq!(lives.len(), 1, "{lives:#?}");
    assert_eq!(
        names(&lives[0]),
        ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    );
    assert_eq!(lives[0]["end"], "closed");
}
