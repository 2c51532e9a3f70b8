//! Real kernel: the eBPF program loaded into this kernel, real sockets driven in a network
//! namespace of the test's own, exact transition sequences asserted.
//!
//! Every scenario uses its own port, so scenarios running in parallel (and the host's
//! traffic, which never uses these ports) cannot mix into each other's assertions.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use tracer::model::{Family, TcpState::*, Transition};
use tracer::source::kernel::KernelFilter;

fn localhost() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// What a scenario thread reports about itself.
struct Ran {
    tid: u32,
    client_port: u16,
}

fn assert_endpoints(life: &[Transition], local: (IpAddr, u16), remote: (IpAddr, u16)) {
    for t in life {
        assert_eq!((t.id.saddr, t.id.sport), local, "local end of {t:?}");
        if born_bare(t) {
            continue;
        }
        assert_eq!((t.id.daddr, t.id.dport), remote, "remote end of {t:?}");
    }
}

/// A child's LISTEN -> SYN_RECV on a kernel that reports it before giving the child its
/// peer's address and its request's cookie (Linux 6.1; the tracker joins it with the
/// child's next event): no peer then, and only then.
fn born_bare(t: &Transition) -> bool {
    (t.old, t.new) == (Listen, SynRecv) && t.id.daddr.is_unspecified() && t.id.dport == 0
}

fn assert_task_is_us(t: &Transition, tid: u32) {
    assert_eq!(t.task.pid, std::process::id(), "pid of {t:?}");
    assert_eq!(t.task.tid, tid, "tid of {t:?}");
    assert_eq!(t.task.comm.to_str_lossy(), THREAD_NAME, "comm of {t:?}");
}

#[test]
fn active_and_passive_open_and_close() {
    const PORT: u16 = 21001;
    let mut cap = Capture::everything();
    let ran = in_netns(|| {
        private_fd_table(); // the test checks which task closed the sockets
        let Pair {
            listener,
            client,
            mut server,
            client_port,
        } = connect_pair("127.0.0.1", PORT);
        drop(client); // active close first
        let mut buf = [0u8; 16];
        assert_eq!(
            server.read(&mut buf).unwrap(),
            0,
            "EOF after the peer's FIN"
        );
        drop(server); // then the passive side closes
        drop(listener);
        Ran {
            tid: gettid(),
            client_port,
        }
    });
    let lives = cap.lives_on_port(PORT, 12);
    assert_eq!(
        lives.len(),
        3,
        "client, server child and listener: {lives:#?}"
    );

    // 1. The active side.
    let client = life_starting(&lives, (Close, SynSent));
    assert_eq!(
        states(&client),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close),
        ]
    );
    // At connect() the local port is not chosen yet; it is from the next event on.
    assert_eq!((client[0].id.sport, client[0].id.dport), (0, PORT));
    assert_endpoints(
        &client[1..],
        (localhost(), ran.client_port),
        (localhost(), PORT),
    );
    assert_task_is_us(&client[0], ran.tid); // connect runs in the caller
    assert_task_is_us(&client[2], ran.tid); // so does its close()
    assert!(client.iter().all(|t| t.id.family == Family::Ipv4));

    // 2. The passive side: the accepted child, then the listener itself.
    let child = life_starting(&lives, (Listen, SynRecv));
    assert_eq!(
        states(&child),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close),
        ]
    );
    assert_endpoints(&child, (localhost(), PORT), (localhost(), ran.client_port));
    assert_task_is_us(&child[3], ran.tid); // the server's close()
    let listener = life_starting(&lives, (Close, Listen));
    assert_eq!(states(&listener), [(Close, Listen), (Listen, Close)]);
    assert_eq!((listener[0].id.sport, listener[0].id.dport), (PORT, 0));
    assert_task_is_us(&listener[0], ran.tid);
    assert_task_is_us(&listener[1], ran.tid);

    // Timestamps are the kernel's and ordered within each socket.
    for life in &lives {
        assert!(
            life.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns),
            "{life:#?}"
        );
    }
    assert_eq!(cap.lost(), 0);
}

#[test]
fn connection_refused() {
    const PORT: u16 = 21002;
    let mut cap = Capture::everything();
    let tid = in_netns(|| {
        let err = TcpStream::connect(("127.0.0.1", PORT)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        gettid()
    });
    let lives = cap.lives_on_port(PORT, 2);
    assert_eq!(lives.len(), 1, "{lives:#?}");
    assert_eq!(states(&lives[0]), [(Close, SynSent), (SynSent, Close)]);
    assert_task_is_us(&lives[0][0], tid);
    assert_eq!(lives[0][1].id.dport, PORT);
}

#[test]
fn abortive_close_with_linger_zero_resets_the_peer() {
    const PORT: u16 = 21003;
    let mut cap = Capture::everything();
    let ran = in_netns(|| {
        private_fd_table(); // the test checks which task closed the sockets
        let Pair {
            listener: _listener,
            client,
            mut server,
            client_port,
        } = connect_pair("127.0.0.1", PORT);
        set_linger_zero(&client);
        drop(client); // RST instead of FIN
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        Ran {
            tid: gettid(),
            client_port,
        }
    });
    // client 3, child 3, listener 2 (the listener closes when the namespace thread ends)
    let lives = cap.lives_on_port(PORT, 8);
    let client = life_starting(&lives, (Close, SynSent));
    assert_eq!(
        states(&client),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, Close)
        ]
    );
    assert_task_is_us(&client[2], ran.tid); // the abortive close runs in close()
    let child = life_starting(&lives, (Listen, SynRecv));
    assert_eq!(
        states(&child),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, Close)
        ]
    );
    assert_endpoints(&child, (localhost(), PORT), (localhost(), ran.client_port));
}

#[test]
fn simultaneous_close_goes_through_closing() {
    // The client's FIN is held back behind data the server's full receive buffer cannot
    // take (zero window), so it is still unacknowledged in FIN_WAIT1 when the server's FIN
    // arrives: FIN_WAIT1 -> CLOSING, deterministically.
    const PORT: u16 = 21004;
    let mut cap = Capture::everything();
    let (client_port, received) = in_netns(|| {
        let (client_port, sent, received) = crossing_fins(PORT);
        assert_eq!(received, sent, "all data arrives before the FIN");
        (client_port, received)
    });
    assert!(received > 0);
    let lives = cap.lives_on_port(PORT, 12);
    let client = life_starting(&lives, (Close, SynSent));
    assert_eq!(
        states(&client),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, Closing),
            (Closing, Close),
        ]
    );
    assert_endpoints(
        &client[1..],
        (localhost(), client_port),
        (localhost(), PORT),
    );
    let child = life_starting(&lives, (Listen, SynRecv));
    assert_eq!(
        states(&child),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close),
        ]
    );
}

#[test]
fn half_close_then_the_peer_keeps_sending() {
    const PORT: u16 = 21005;
    let mut cap = Capture::everything();
    let (tid, got) = in_netns(|| {
        let Pair {
            listener: _listener,
            mut client,
            mut server,
            ..
        } = connect_pair("127.0.0.1", PORT);
        client.write_all(b"request").unwrap();
        client.shutdown(Shutdown::Write).unwrap(); // half-close: FIN_WAIT1 -> FIN_WAIT2
        let mut req = Vec::new();
        server.read_to_end(&mut req).unwrap(); // EOF: server in CLOSE_WAIT
        assert_eq!(req, b"request");
        for _ in 0..3 {
            server.write_all(b"still talking;").unwrap(); // the peer keeps sending
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(server); // CLOSE_WAIT -> LAST_ACK
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        (gettid(), got)
    });
    assert_eq!(got, b"still talking;still talking;still talking;");
    let lives = cap.lives_on_port(PORT, 12);
    let client = life_starting(&lives, (Close, SynSent));
    assert_eq!(
        states(&client),
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close),
        ]
    );
    assert_task_is_us(&client[2], tid); // shutdown() runs in the caller
    let child = life_starting(&lives, (Listen, SynRecv));
    assert_eq!(
        states(&child),
        [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close),
        ]
    );
    // The half-closed client sat in FIN_WAIT2 while the server went on writing (3 x 20 ms).
    let fin_wait2 = client[4].ts_ns - client[3].ts_ns;
    assert!(fin_wait2 >= 60_000_000, "FIN_WAIT2 lasted {fin_wait2} ns");
}

#[test]
fn ipv6_loopback_addresses() {
    const PORT: u16 = 21006;
    let mut cap = Capture::everything();
    let ran = in_netns(|| {
        let Pair {
            listener,
            client,
            server,
            client_port,
        } = connect_pair("::1", PORT);
        drop(client);
        drop(server);
        drop(listener);
        Ran {
            tid: gettid(),
            client_port,
        }
    });
    let lives = cap.lives_on_port(PORT, 12);
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let client = life_starting(&lives, (Close, SynSent));
    assert_eq!(
        states(&client)[..2],
        [(Close, SynSent), (SynSent, Established)]
    );
    assert_endpoints(&client[1..], (lo6, ran.client_port), (lo6, PORT));
    assert_eq!(client[0].id.daddr, lo6);
    assert_task_is_us(&client[0], ran.tid);
    let child = life_starting(&lives, (Listen, SynRecv));
    assert_endpoints(&child, (lo6, PORT), (lo6, ran.client_port));
    let listener = life_starting(&lives, (Close, Listen));
    assert_eq!(listener[0].id.saddr, lo6);
    assert!(
        lives.iter().flatten().all(|t| t.id.family == Family::Ipv6),
        "{lives:#?}"
    );
}

#[test]
fn kernel_filters_drop_and_keep() {
    const KEPT_L: u16 = 21007; // -L
    const KEPT_D: u16 = 21008; // -D
    const V6: u16 = 21009; // -6
    let mut by_lport = Capture::start(KernelFilter {
        lports: vec![KEPT_L],
        ..KernelFilter::default()
    });
    let mut by_rport = Capture::start(KernelFilter {
        rports: vec![KEPT_D],
        ..KernelFilter::default()
    });
    let mut v6_only = Capture::start(KernelFilter {
        family: Some(Family::Ipv6),
        ..KernelFilter::default()
    });
    let mut everything = Capture::everything();
    in_netns(|| {
        for (host, port) in [("127.0.0.1", KEPT_L), ("127.0.0.1", KEPT_D), ("::1", V6)] {
            let p = connect_pair(host, port);
            drop(p.client);
            drop(p.server);
        }
    });
    // The unfiltered capture sees all three connections in full: 12 transitions each.
    for port in [KEPT_L, KEPT_D, V6] {
        let lives = everything.lives_on_port(port, 12);
        assert_eq!(
            lives.iter().flatten().count(),
            12,
            "port {port}: {lives:#?}"
        );
    }
    by_lport.wait_for(Duration::from_millis(300), |_| false);
    by_rport.wait_for(Duration::from_millis(300), |_| false);
    v6_only.wait_for(Duration::from_millis(300), |_| false);

    // -L: only the listener's and the accepted child's events (local port = KEPT_L) of
    // the whole host, all 7 of them.
    assert!(
        by_lport.events.iter().all(|t| t.id.sport == KEPT_L),
        "{:#?}",
        by_lport.events
    );
    let kept = lives(&by_lport.events);
    let listener = life_starting(&kept, (Close, Listen));
    assert_eq!(states(&listener), [(Close, Listen), (Listen, Close)]);
    let child = life_starting(&kept, (Listen, SynRecv));
    assert_eq!(child.len(), 5);
    assert_eq!(kept.len(), 2);

    // -D: only the client of KEPT_D, all 5 of its transitions.
    assert!(
        by_rport.events.iter().all(|t| t.id.dport == KEPT_D),
        "{:#?}",
        by_rport.events
    );
    let kept = lives(&by_rport.events);
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(states(&kept[0]).len(), 5);
    assert_eq!(kept[0][0].id.dport, KEPT_D);

    // -6: no IPv4 event at all; the IPv6 connection in full.
    assert!(v6_only.events.iter().all(|t| t.id.family == Family::Ipv6));
    assert_eq!(v6_only.on_port(V6).len(), 12);
    assert!(v6_only.on_port(KEPT_L).is_empty());
    for cap in [&by_lport, &by_rport, &v6_only, &everything] {
        assert_eq!(cap.lost(), 0);
    }
}

#[test]
fn socket_addresses_are_stable_identities() {
    // One socket's events share one skaddr, and two live sockets never share one.
    const PORT: u16 = 21010;
    let mut cap = Capture::everything();
    in_netns(|| {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], PORT))).unwrap();
        let a = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let b = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let (sa, _) = listener.accept().unwrap();
        let (sb, _) = listener.accept().unwrap();
        drop((a, b, sa, sb, listener));
    });
    let lives = cap.lives_on_port(PORT, 2 + 2 * 10);
    assert_eq!(lives.len(), 5, "{lives:#?}");
    let mut sks: Vec<u64> = lives.iter().map(|l| l[0].sk).collect();
    sks.sort_unstable();
    sks.dedup();
    assert_eq!(sks.len(), 5, "five live sockets, five addresses");
}
