//! The listen path, real kernel, each scenario in a network namespace of its own: request
//! sockets as the timer programs report them and as tcplens follows them (the SYN queue,
//! SYN-ACK retransmissions, how each request ended), against what the test measured and the
//! kernel's own counts (sock_diag, nstat).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use TimerOp::{Arm, Cancel, Expire};
use common::listen::*;
use common::{
    Capture, NamedNetns, Running, http_get, json_lines, start_tcplens, state_names, state_ns,
    sysctl,
};
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

/// `tcplens listen --format json` in namespace `ns`, reporting every `interval`.
fn listen_in(ns: &NamedNetns, interval: &str) -> Running {
    start_tcplens(&[
        "listen",
        "--format",
        "json",
        "--interval",
        interval,
        "--netns",
        &ns.path(),
    ])
}

/// Every report's row of the listener on `at` (reports without it are skipped).
fn rows_of(reports: &[serde_json::Value], at: SocketAddrV4) -> Vec<serde_json::Value> {
    reports
        .iter()
        .filter_map(|r| {
            r["listeners"]
                .as_array()?
                .iter()
                .find(|l| l["saddr"] == at.ip().to_string() && l["sport"] == at.port())
                .cloned()
        })
        .collect()
}

/// The sum of a listener's window counts `field` over its rows.
fn total(rows: &[serde_json::Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().expect(field)).sum()
}

/// The sum over the reports of namespace `netns`'s window counter `field`.
fn netns_total(reports: &[serde_json::Value], netns: u64, field: &str) -> u64 {
    reports
        .iter()
        .flat_map(|r| r["namespaces"].as_array().cloned().unwrap_or_default())
        .filter(|n| n["netns"] == netns)
        .map(|n| n[field].as_u64().expect(field))
        .sum()
}

/// The listen reports printed so far.
fn reports_so_far(running: &Running) -> Vec<serde_json::Value> {
    let text: String = running
        .lines_so_far()
        .into_iter()
        .map(|(_, l)| l + "\n")
        .collect();
    json_lines(&text)
}

#[test]
fn an_unanswered_request_is_retransmitted_on_the_kernels_timer_then_expires() {
    let ns = NamedNetns::new("tl-req-synack");
    unanswering_peer(&ns);
    let mut cap = Capture::everything();
    let listen = listen_in(&ns, "500ms");
    let at = SocketAddrV4::new(SERVER, 7201);
    let loss = ns.run(move || two_synack_retries(at, 40_000));
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
    // The kernel's timeouts: each arm sets the timer TCP_TIMEOUT_INIT << retransmissions
    // ahead, so the three timeouts double; each expiry runs at or after the jiffy it was
    // set for, late by at most the timer wheel's granularity at that range (1/8). An
    // event's `jiffies` is read when the program runs, a tick or two after the kernel took
    // `jiffies + timeout` under emulation (seen on 6.1: 248, 500, 1000 for 250 << n): each
    // measured timeout is the kernel's, less at most a few ticks.
    let arms: Vec<&RequestEvent> = reqs.iter().filter(|r| r.op == Arm).collect();
    let expiries: Vec<&RequestEvent> = reqs.iter().filter(|r| r.op == Expire).collect();
    let timeouts: Vec<u64> = arms.iter().map(|a| a.expires - a.jiffies).collect();
    let init = (0..3)
        .map(|i| timeouts[i].div_ceil(1 << i))
        .max()
        .unwrap_or(0);
    for (i, t) in timeouts.iter().enumerate() {
        let kernels = init << i;
        assert!(
            *t <= kernels && kernels - t <= 4,
            "timeouts {timeouts:?} are not {init} << n less a few ticks: {reqs:#?}"
        );
    }
    for ((arm, exp), timeout) in arms.iter().zip(&expiries).zip(&timeouts) {
        assert!(
            exp.jiffies >= arm.expires && exp.jiffies <= arm.expires + timeout / 8 + 1,
            "armed for jiffy {}, expired at {} (timeout {timeout})",
            arm.expires,
            exp.jiffies
        );
    }
    // The first timeout is one second (TCP_TIMEOUT_INIT): in the events' own clock, the
    // first expiry comes that long after the SYN, give or take the wheel's granularity.
    let first_ns = expiries[0].ts_ns - arms[0].ts_ns;
    assert!(
        (1_000_000_000 - 10_000_000..=1_130_000_000).contains(&first_ns),
        "first expiry {first_ns} ns after the SYN"
    );
    // sock_diag saw the request go at the last expiry, by the test's clock.
    let last_ns = expiries[2].ts_ns - arms[0].ts_ns;
    let seen_gone = (loss.gone - loss.sent).as_nanos() as u64;
    assert!(
        last_ns <= seen_gone,
        "expired at {last_ns} ns, gone by {seen_gone} ns"
    );

    // tcplens listen, summed over its reports: one SYN, two SYN-ACK retransmissions, one
    // expired request; the namespace's TCPSynRetrans as nstat reads it.
    let after = listen
        .wait_for_line(Duration::from_secs(5), |l| l.contains("\"expired\":1"))
        .expect("a report with the expiry");
    let finished = listen.stop();
    let reports = json_lines(&finished.stdout);
    let rows = rows_of(&reports, at);
    assert!(!rows.is_empty(), "{}", finished.stdout);
    let sums: Vec<u64> = ["syns", "synack_retrans", "expired", "completed", "aborted"]
        .iter()
        .map(|f| total(&rows, f))
        .collect();
    assert_eq!(sums, [1, 2, 1, 0, 0], "{}", finished.stdout);
    let peak = rows
        .iter()
        .map(|r| r["syn_queue_peak"].as_u64().unwrap())
        .max();
    assert_eq!(peak, Some(1));
    assert_eq!(rows.last().unwrap()["syn_queue"], 0, "{after:?}");
    assert_eq!(
        netns_total(&reports, ns.inode(), "syn_retrans"),
        ns.nstat("TcpExtTCPSynRetrans")
    );
    assert_eq!(ns.nstat("TcpExtTCPSynRetrans"), 2);
}

#[test]
fn a_full_accept_queue_shows_as_ss_and_nstat_count_it() {
    let ns = NamedNetns::new("tl-qfull");
    let listen = listen_in(&ns, "200ms");
    let serve = start_tcplens(&["serve", "--listen", "127.0.0.1:0", "--netns", &ns.path()]);
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7202);
    let (view, guard) = ns.run(move || accept_queue_full(at, 1, 5));
    // A report taken since the queue filled, and what ss shows now (the queue stays: the
    // listener never accepts).
    let since = std::time::Instant::now();
    let shown = loop {
        let rows = rows_of(&reports_so_far(&listen), at);
        let lines = listen.lines_so_far();
        if lines.last().is_some_and(|(t, _)| *t > since)
            && let Some(last) = rows.last()
        {
            break last.clone();
        }
        assert!(since.elapsed() < Duration::from_secs(5), "no report");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ss_now = ns.run(move || listener_queues(at));
    assert_eq!(ss_now, view.queues);
    assert_eq!(
        (shown["accept_queue"].as_u64(), shown["backlog"].as_u64()),
        (
            Some(u64::from(ss_now.accept_queue)),
            Some(u64::from(ss_now.backlog))
        ),
        "{shown}"
    );
    // The metrics: the same queues and the namespace's overflow count once the host has
    // listed them (every few seconds). A listing can fall between two of the clients'
    // connects, so a scrape may show an earlier count, never a higher one; the test waits
    // for a listing made after the queue filled.
    let netns = ns.inode();
    // A series' value: `tcplens_<name>` with this namespace's labels (and the listener's).
    let value = |body: &str, name: &str, listener: bool| -> Option<u64> {
        let labels = if listener {
            format!("netns=\"{netns}\",listener=\"{at}\"")
        } else {
            format!("netns=\"{netns}\"")
        };
        let want = format!("tcplens_{name}{{{labels}}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&want)?.parse().ok())
    };
    let queues = (
        Some(u64::from(ss_now.accept_queue)),
        Some(u64::from(ss_now.backlog)),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (body, overflows_metric) = loop {
        let before = ns.nstat("TcpExtListenOverflows");
        let (status, body) = http_get(serve.metrics_addr(), "/metrics");
        assert_eq!(status, 200);
        let after = ns.nstat("TcpExtListenOverflows");
        let listed = (
            value(&body, "listen_accept_queue", true),
            value(&body, "listen_backlog", true),
        );
        let counted = value(&body, "listen_overflows_total", false);
        assert!(
            counted.is_none_or(|c| c <= after),
            "more overflows than the kernel's {after}: {body}"
        );
        if listed == queues
            && let Some(counted) = counted
            && counted == before
        {
            break (body, counted);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no listing with the queues {queues:?} and {before} overflows: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(serve.stop());
    // Every drop and overflow, summed over the reports up to the last one at exit: the
    // pending clients are closed, so the counts no longer move.
    let finished = listen.stop();
    drop(guard);
    let reports = json_lines(&finished.stdout);
    let rows = rows_of(&reports, at);
    let (overflows, drops) = (
        ns.nstat("TcpExtListenOverflows"),
        ns.nstat("TcpExtListenDrops"),
    );
    assert!(overflows >= 3, "three SYNs met the full queue: {overflows}");
    // The listener's drops are the namespace's ListenDrops when every overflow was a SYN's
    // (on loopback, the rule); a final ACK at the full queue counts once more there.
    // Then the counts stop once the queue has filled, and the metric's is the last one; a
    // final ACK dropped later still counts in the namespace after the scrape.
    if view.established == 2 {
        assert_eq!(total(&rows, "drops"), drops, "{}", finished.stdout);
        assert_eq!(overflows_metric, overflows, "{body}");
    } else {
        assert!(total(&rows, "drops") >= drops, "{}", finished.stdout);
        assert!(overflows_metric <= overflows, "{body}");
    }
    assert_eq!(
        netns_total(&reports, ns.inode(), "listen_overflows"),
        overflows
    );
    assert_eq!(netns_total(&reports, ns.inode(), "listen_drops"), drops);
    assert_eq!(total(&rows, "completed"), 2, "{}", finished.stdout);
}

#[test]
fn a_syn_flood_fills_the_syn_queue_as_sock_diag_counts_it() {
    const SYNS: u16 = 200;
    let ns = NamedNetns::new("tl-flood");
    unanswering_peer(&ns);
    let listen = listen_in(&ns, "200ms");
    let at = SocketAddrV4::new(SERVER, 7203);
    let (listed, guard) = ns.run(move || {
        sysctl("net/ipv4/tcp_syncookies", "0");
        sysctl("net/ipv4/tcp_max_syn_backlog", "4096");
        let listener = listen_with_backlog(at, 4096);
        syn_flood(20_000..20_000 + SYNS, at);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listed = loop {
            let listed = requests().len();
            if listed >= usize::from(SYNS) || std::time::Instant::now() >= deadline {
                break listed;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (listed, listener)
    });
    assert_eq!(listed, usize::from(SYNS));
    // The requests wait a second for their first SYN-ACK retransmission: tcplens's queue
    // holds them all meanwhile.
    let line = listen
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains(&format!("\"syn_queue\":{SYNS},"))
        })
        .expect("a report with the whole SYN queue");
    let finished = listen.stop();
    drop(guard);
    let rows = rows_of(&json_lines(&line.1), at);
    assert_eq!(rows[0]["syn_queue"], u64::from(SYNS), "{}", line.1);
    let all = rows_of(&json_lines(&finished.stdout), at);
    let peak = all
        .iter()
        .map(|r| r["syn_queue_peak"].as_u64().unwrap())
        .max();
    assert_eq!(peak, Some(u64::from(SYNS)), "{}", finished.stdout);
    assert_eq!(total(&all, "syns"), u64::from(SYNS));
}

#[test]
fn a_passive_timeline_starts_at_the_syn_and_accept_is_the_servers_handshake() {
    let ns = NamedNetns::new("tl-req-timeline");
    let port = "7204";
    let netns = ns.path();
    let timeline = start_tcplens(&[
        "timeline", "--format", "json", "--netns", &netns, "-L", port,
    ]);
    let stats = start_tcplens(&["stats", "--format", "json", "--netns", &netns, "-L", port]);
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7204);
    // From just before connect() to accept()'s return: the SYN was sent after the start,
    // the server's socket was ESTABLISHED before the end.
    let accepted = ns.run(move || normal_accept(at));
    let client = accepted.client.port();
    // The server closed first: it waits in TIME_WAIT, and is printed at exit.
    let lives = json_lines(&timeline.stop().stdout);
    let life = lives
        .iter()
        .find(|l| l["role"] == "passive" && l["dport"] == client)
        .unwrap_or_else(|| panic!("the server's timeline in {lives:#?}"));
    let states = state_names(life);
    assert_eq!(
        states[..3],
        ["NEW_SYN_RECV", "SYN_RECV", "ESTABLISHED"],
        "{life}"
    );
    let request_ns = state_ns(life, "NEW_SYN_RECV");
    let child_ns = state_ns(life, "SYN_RECV");
    let handshake_ns = request_ns + child_ns;
    let took_ns = accepted.took.as_nanos() as u64;
    assert!(request_ns > 0 && child_ns > 0, "{life}");
    assert!(
        handshake_ns <= took_ns,
        "handshake {handshake_ns} ns within the test's {took_ns} ns"
    );
    // stats (its own programs, stamping the same events a few microseconds apart from the
    // timeline's): accept is the request's time plus the child's SYN_RECV, to the
    // histograms' 3 significant digits, and larger than the old figure (SYN_RECV alone).
    let finished = stats.stop();
    let report = json_lines(&finished.stdout).pop().expect("a stats report");
    let max = |h: &serde_json::Value| h["max_ns"].as_u64().unwrap();
    let accept = &report["accept_ns"];
    assert_eq!(accept["count"], 1, "{report}");
    let (request, child) = (
        max(&report["states"]["NEW_SYN_RECV"]),
        max(&report["states"]["SYN_RECV"]),
    );
    assert!(
        max(accept).abs_diff(request + child) <= (request + child) / 250 + 2,
        "accept {} ns, request {request} ns + SYN_RECV {child} ns",
        max(accept)
    );
    assert!(max(accept) > child && max(accept) <= took_ns, "{report}");
    assert_eq!(report["requests"]["syns"], 1, "{report}");
    assert_eq!(report["requests"]["completed"], 1, "{report}");
}
