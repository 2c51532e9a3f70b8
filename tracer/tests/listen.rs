//! The listen path, real kernel, each scenario in a network namespace of its own: request
//! sockets as the timer programs report them and as tcplens follows them (the SYN queue,
//! SYN-ACK retransmissions, how each request ended), against what the test measured and the
//! kernel's own counts (sock_diag, nstat).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use TimerOp::{Arm, Cancel, Expire};
use common::listen::*;
use common::{Capture, NamedNetns, sysctl};
use tracer::model::{RequestEvent, TcpState, TimerOp};

/// The request events of the connection from `peer` (the request's remote end).
fn requests_from(cap: &Capture, peer: SocketAddrV4) -> Vec<RequestEvent> {
    cap.requests
        .iter()
        .filter(|r| r.id.daddr == *peer.ip() && r.id.dport == peer.port())
        .copied()
        .collect()
}

#[test]
fn a_request_is_armed_at_the_syn_and_cancelled_at_the_final_ack() {
    let ns = NamedNetns::new("tl-req-accept");
    let netns = u32::try_from(ns.inode()).expect("namespace inode");
    let mut cap = Capture::everything();
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7200);
    let accepted = ns.run(move || normal_accept(at));
    let client = accepted.client;
    cap.wait_for(Duration::from_secs(5), |_| false);
    let reqs = requests_from(&cap, client);
    let ops: Vec<TimerOp> = reqs.iter().map(|r| r.op).collect();
    assert_eq!(ops, [TimerOp::Arm, TimerOp::Cancel], "{reqs:#?}");
    let listener = cap
        .events
        .iter()
        .find(|t| (t.old, t.new) == (TcpState::Close, TcpState::Listen) && t.id.sport == 7200)
        .expect("the listener's CLOSE -> LISTEN");
    for r in &reqs {
        assert_eq!(r.req, reqs[0].req, "one request socket");
        assert_eq!(r.listener, listener.id.cookie, "the listener's cookie");
        assert_eq!(r.id.netns, netns);
        assert_eq!(
            (r.id.saddr, r.id.sport),
            (std::net::IpAddr::V4(*at.ip()), at.port())
        );
        assert_eq!(r.retrans, 0);
    }
    // The child is made between the two: its LISTEN -> SYN_RECV.
    let child = cap
        .events
        .iter()
        .find(|t| (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv) && t.id.netns == netns)
        .expect("the child's LISTEN -> SYN_RECV");
    assert!(reqs[0].ts_ns <= child.ts_ns && child.ts_ns <= reqs[1].ts_ns);
}

#[test]
fn an_unanswered_request_shows_each_synack_retransmission_then_expires() {
    let ns = NamedNetns::new("tl-req-synack");
    unanswering_peer(&ns);
    let mut cap = Capture::everything();
    let at = SocketAddrV4::new(SERVER, 7201);
    let loss = ns.run(move || {
        sysctl("net/ipv4/tcp_synack_retries", "2");
        synack_loss(
            at,
            40_000,
            Duration::from_millis(10),
            Duration::from_secs(30),
        )
    });
    cap.wait_for(Duration::from_secs(1), |_| false);
    let reqs = requests_from(&cap, SocketAddrV4::new(PEER, 40_000));
    let seen: Vec<(TimerOp, u8)> = reqs.iter().map(|r| (r.op, r.retrans)).collect();

    assert_eq!(
        seen,
        [
            (Arm, 0),
            (Cancel, 0),
            (Expire, 0),
            (Arm, 1),
            (Cancel, 1),
            (Expire, 1),
            (Arm, 2),
            (Cancel, 2),
            (Expire, 2),
        ],
        "{loss:?}"
    );
    assert_eq!(ns.nstat("TcpExtTCPSynRetrans"), 2);
}
