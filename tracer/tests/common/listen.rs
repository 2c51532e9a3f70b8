//! Scenario drivers of the listen path (request sockets, SYN-ACK retransmissions, SYN and
//! accept queues), and the kernel's own ground truth for them (sock_diag through `ss`,
//! the namespace's SNMP counters). Everything runs inside a [`NamedNetns`]; the functions
//! that take no namespace must run on its thread ([`NamedNetns::run`]), where `ss` and
//! other children inherit the namespace.
//!
//! A peer whose SYN-ACKs go nowhere: a `blackhole` route to it does NOT do, the listener
//! then fails to route the SYN-ACK and drops the request at once (IpOutNoRoutes +
//! ListenDrops, no request socket). Instead [`unanswering_peer`] routes [`PEER`] out of
//! one end of a veth pair to a made-up MAC address: the SYN-ACK leaves, the other end
//! discards it (not its address), nothing answers.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::FromRawFd as _;
use std::time::{Duration, Instant};

use nix::libc;

use super::NamedNetns;

/// The address the listeners of these scenarios bind (on `lo`).
pub(crate) const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
/// The peer that sends hand-made SYNs and never answers a SYN-ACK.
pub(crate) const PEER: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);

fn ip(ns: &NamedNetns, args: &[&str]) {
    let ok = std::process::Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(ok.success(), "ip -n {} {args:?}", ns.name);
}

/// Sets up `ns` for SYNs from [`PEER`] to [`SERVER`]: SERVER on `lo`, PEER routed out of
/// veth `lw0` (peer `lw1`, both up, in `ns`) with a permanent neighbour entry, so that the
/// SYN-ACK is sent (the request socket lives) and lost.
pub(crate) fn unanswering_peer(ns: &NamedNetns) {
    let server = format!("{SERVER}/32");
    let peer = format!("{PEER}/32");
    let peer_ip = PEER.to_string();
    ip(ns, &["addr", "add", &server, "dev", "lo"]);
    ip(
        ns,
        &["link", "add", "lw0", "type", "veth", "peer", "name", "lw1"],
    );
    ip(ns, &["link", "set", "lw0", "up"]);
    ip(ns, &["link", "set", "lw1", "up"]);
    ip(ns, &["route", "add", &peer, "dev", "lw0"]);
    ip(
        ns,
        &[
            "neigh",
            "add",
            &peer_ip,
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "lw0",
            "nud",
            "permanent",
        ],
    );
}

/// A listening socket on `addr` with the given `listen(2)` backlog (std's `TcpListener`
/// always asks for 128).
pub(crate) fn listen_with_backlog(addr: SocketAddrV4, backlog: i32) -> TcpListener {
    let sa = sockaddr(addr);
    // SAFETY: plain socket calls with a correctly sized address; the fd is owned by the
    // returned listener (or closed on failure).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&raw const sa).cast(), len) != 0 || libc::listen(fd, backlog) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("bind/listen {addr}: {e}");
        }
        TcpListener::from_raw_fd(fd)
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Starts a non-blocking connect to `to`; on loopback the handshake (or the listener's
/// drop of the SYN) has happened by the time this returns.
pub(crate) fn connect_nonblocking(to: SocketAddrV4) -> TcpStream {
    let sa = sockaddr(to);
    // SAFETY: plain socket calls with a correctly sized address; the fd is owned by the
    // returned stream.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let r = libc::connect(fd, (&raw const sa).cast(), len);
        let e = std::io::Error::last_os_error();
        assert!(
            r == 0 || e.raw_os_error() == Some(libc::EINPROGRESS),
            "connect {to}: {e}"
        );
        TcpStream::from_raw_fd(fd)
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        let mut words = c.chunks(2);
        for w in &mut words {
            let hi = u32::from(w[0]) << 8;
            sum += hi | w.get(1).map_or(0, |&b| u32::from(b));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP flags of [`raw_segment`].
pub(crate) const SYN: u8 = 0x02;
pub(crate) const RST: u8 = 0x04;

/// An IPv4 packet carrying a bare TCP segment (SYN with an MSS option, or another flag
/// set without options), checksums filled in.
pub(crate) fn raw_segment(from: SocketAddrV4, to: SocketAddrV4, seq: u32, flags: u8) -> Vec<u8> {
    let opts: &[u8] = if flags & SYN != 0 {
        &[2, 4, 0x05, 0xb4] // MSS 1460
    } else {
        &[]
    };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = ((20 + opts.len()) as u8 / 4) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(opts);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends each packet through one `IPPROTO_RAW` socket (the header is ours, the source
/// address may be any); returns when the first was handed to the kernel, by the test's
/// clock (read just before its `sendto`).
pub(crate) fn send_raw(packets: &[Vec<u8>]) -> Instant {
    // SAFETY: a raw socket, sendto of fully initialised buffers, then close.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        );
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut first = None;
        for p in packets {
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let to = sockaddr(SocketAddrV4::new(dst, 0));
            first.get_or_insert_with(Instant::now);
            let n = libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(
                n,
                p.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
        first.expect("at least one packet")
    }
}

/// Sends a SYN from [`PEER`]:`sport` to `to` with sequence `seq`: the request socket
/// appears; the SYN-ACK is lost (after [`unanswering_peer`]). The send time.
pub(crate) fn send_syn(sport: u16, to: SocketAddrV4, seq: u32) -> Instant {
    send_raw(&[raw_segment(SocketAddrV4::new(PEER, sport), to, seq, SYN)])
}

/// Sends one SYN from [`PEER`] per source port in `sports` to `to`, back to back.
pub(crate) fn syn_flood(sports: std::ops::Range<u16>, to: SocketAddrV4) -> Instant {
    let packets: Vec<Vec<u8>> = sports
        .map(|p| raw_segment(SocketAddrV4::new(PEER, p), to, 1000 + u32::from(p), SYN))
        .collect();
    send_raw(&packets)
}

/// Runs `ss` (in the calling thread's namespace) and returns its stdout.
pub(crate) fn ss(args: &[&str]) -> String {
    let out = std::process::Command::new("ss")
        .args(args)
        .output()
        .expect("running ss (iproute2)");
    assert!(out.status.success(), "ss {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("ss prints UTF-8")
}

/// One request socket as sock_diag shows it (`ss -tn state syn-recv -o`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub local: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// SYN-ACK retransmissions so far (the last number of `timer:(on,…,N)`,
    /// inet_diag's `idiag_retrans` = the request's `num_retrans`).
    pub retrans: u32,
}

/// The request sockets (state SYN-RECV) of the namespace.
pub(crate) fn requests() -> Vec<Request> {
    ss(&["-tnHo", "state", "syn-recv"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer timer:(on,992ms,0)
            let parse = |s: &str| {
                s.parse::<SocketAddrV4>()
                    .unwrap_or_else(|e| panic!("{s} in {l}: {e}"))
            };
            let timer = cols
                .iter()
                .find(|c| c.starts_with("timer:("))
                .unwrap_or_else(|| panic!("no timer in {l}"));
            let retrans = timer
                .trim_end_matches(')')
                .rsplit(',')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no retransmit count in {l}"));
            Request {
                local: parse(cols[2]),
                peer: parse(cols[3]),
                retrans,
            }
        })
        .collect()
}

/// A listener's queues as `ss -lnt` shows them: Recv-Q = accept queue length
/// (`sk_ack_backlog`), Send-Q = the backlog (`sk_max_ack_backlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerQueues {
    pub accept_queue: u32,
    pub backlog: u32,
}

/// The queues of the listener on `addr`.
pub(crate) fn listener_queues(addr: SocketAddrV4) -> ListenerQueues {
    let out = ss(&["-lntH"]);
    let want = addr.to_string();
    let found: Vec<ListenerQueues> = out
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(3) == Some(&want.as_str())).then(|| ListenerQueues {
                accept_queue: cols[1].parse().expect("Recv-Q"),
                backlog: cols[2].parse().expect("Send-Q"),
            })
        })
        .collect();
    assert_eq!(found.len(), 1, "one listener on {addr} in {out}");
    found[0]
}

/// Client sockets in `state` (an `ss` state name) towards `to`.
pub(crate) fn clients_in(state: &str, to: SocketAddrV4) -> usize {
    let filter = format!("dst {to}");
    ss(&["-tnH", "state", state, &filter])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A normal accept, timed by the test: from just before `connect()` to the return of
/// `accept()` (the child ESTABLISHED and taken off the accept queue).
pub(crate) struct Accepted {
    pub took: Duration,
    pub client: SocketAddrV4,
    /// The peer address `accept()` reported.
    pub peer_seen: SocketAddrV4,
}

pub(crate) fn normal_accept(at: SocketAddrV4) -> Accepted {
    let listener = listen_with_backlog(at, 16);
    let t0 = Instant::now();
    let client = TcpStream::connect(at).expect("connect");
    let (server, from) = listener.accept().expect("accept");
    let took = t0.elapsed();
    let as_v4 = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(a) => panic!("IPv6 {a}"),
    };
    let accepted = Accepted {
        took,
        client: as_v4(client.local_addr().expect("client address")),
        peer_seen: as_v4(from),
    };
    drop((server, client));
    accepted
}

/// What [`synack_loss`] observed of the one request socket, by the test's clock.
#[derive(Debug)]
pub(crate) struct SynAckLoss {
    /// When the SYN was sent.
    pub sent: Instant,
    /// Each retransmit count sock_diag showed, with when the poll that first showed it
    /// ended (the latest the change can have happened).
    pub seen: Vec<(u32, Instant)>,
    /// When the poll that first found the request gone ended.
    pub gone: Instant,
    /// For each change (`seen[1..]`, then gone): when the poll before it began, the
    /// earliest the change can have happened.
    pub not_before: Vec<Instant>,
}

/// A SYN from [`PEER`]:`sport` to a listener on `at` (its SYN-ACKs lost), the request
/// polled through sock_diag every `poll` until it is gone (or `limit` passes).
pub(crate) fn synack_loss(
    at: SocketAddrV4,
    sport: u16,
    poll: Duration,
    limit: Duration,
) -> SynAckLoss {
    let listener = listen_with_backlog(at, 16);
    let peer = SocketAddrV4::new(PEER, sport);
    let sent = send_syn(sport, at, 1000);
    let mut seen: Vec<(u32, Instant)> = Vec::new();
    let mut not_before = Vec::new();
    let mut previous = sent;
    let gone = loop {
        // A change shows in a poll if it happened before the poll ended (`ss` takes a
        // while, long under emulation), and after the previous poll began.
        let began = Instant::now();
        let mine: Vec<Request> = requests().into_iter().filter(|r| r.peer == peer).collect();
        let now = Instant::now();
        match mine.as_slice() {
            [] => {
                not_before.push(previous);
                break now;
            }
            [r] => {
                assert_eq!(r.local, at, "{r:?}");
                if seen.last().map(|s| s.0) != Some(r.retrans) {
                    if !seen.is_empty() {
                        not_before.push(previous);
                    }
                    seen.push((r.retrans, now));
                }
                previous = began;
            }
            more => panic!("several requests from {peer}: {more:?}"),
        }
        assert!(
            now - sent < limit,
            "request still there after {limit:?}: {seen:?}"
        );
        std::thread::sleep(poll);
    };
    drop(listener);
    SynAckLoss {
        sent,
        seen,
        gone,
        not_before,
    }
}

/// [`synack_loss`] with `tcp_synack_retries` 2 in the calling thread's namespace, polled
/// every 10 ms: two SYN-ACK retransmissions, then the request is dropped (within 30 s).
pub(crate) fn two_synack_retries(at: SocketAddrV4, sport: u16) -> SynAckLoss {
    super::sysctl("net/ipv4/tcp_synack_retries", "2");
    synack_loss(
        at,
        sport,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )
}

/// After [`accept_queue_full`]: the kernel's view, taken while the clients whose SYN was
/// dropped were still pending.
#[derive(Debug)]
pub(crate) struct QueueFull {
    pub queues: ListenerQueues,
    pub established: usize,
    pub syn_sent: usize,
}

/// `listen(fd, backlog)` on `at`, never accepting; `clients` connect one after the other
/// (non-blocking). The listener and the established clients stay open until the returned
/// guard is dropped; the clients still in SYN-SENT are closed before returning, so that
/// no SYN retransmission adds to the counters after the caller reads them.
pub(crate) fn accept_queue_full(
    at: SocketAddrV4,
    backlog: i32,
    clients: usize,
) -> (QueueFull, (TcpListener, Vec<TcpStream>)) {
    let listener = listen_with_backlog(at, backlog);
    let conns: Vec<TcpStream> = (0..clients).map(|_| connect_nonblocking(at)).collect();
    // Loopback handshakes run in connect() itself, as a rule; allow a moment anyway.
    let deadline = Instant::now() + Duration::from_millis(500);
    let view = loop {
        let view = QueueFull {
            queues: listener_queues(at),
            established: clients_in("established", at),
            syn_sent: clients_in("syn-sent", at),
        };
        if view.established + view.syn_sent == clients || Instant::now() >= deadline {
            break view;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A SYN-SENT client has a peer address only once connected.
    let (established, pending): (Vec<TcpStream>, Vec<TcpStream>) =
        conns.into_iter().partition(|c| c.peer_addr().is_ok());
    drop(pending);
    (view, (listener, established))
}
