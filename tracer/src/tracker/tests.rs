use super::*;
use crate::model::{Family, Task, TimerOp};
use proptest::prelude::*;
use std::net::Ipv4Addr;

/// A connection of socket `sk` in cgroup `cgroup`: connect, then an abort to CLOSE (at
/// 0, 10 and 20 ns) whose event carries `facts`, the connection's counters at its end.
pub(crate) fn ended_connection(
    sk: u64,
    cgroup: u64,
    facts: crate::model::ConnFacts,
) -> [Transition; 3] {
    let mut events = [
        tr(sk, 0, Close, SynSent, 1),
        tr(sk, 10, SynSent, Established, 1),
        tr(sk, 20, Established, Close, 1),
    ];
    for e in &mut events {
        e.cgroup = cgroup;
    }
    events[2].facts = Some(facts);
    events
}

/// A transition of socket `sk` (whose cookie is `sk` too), on no particular CPU.
pub(crate) fn tr(sk: u64, ts: u64, old: TcpState, new: TcpState, pid: u32) -> Transition {
    Transition {
        ts_ns: ts,
        sk,
        id: SocketId {
            cookie: sk,
            netns: NETNS,
            family: Family::Ipv4,
            saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport: 40000,
            daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 8080,
        },
        old,
        new,
        task: Task {
            pid,
            tid: pid,
            comm: Comm::from_name(&format!("task{pid}")),
        },
        via: Via::Tracepoint,
        cpu: None,
        jiffies: 0,
        cgroup: 0,
        facts: None,
    }
}

/// A tracker that keeps its per-group counts too (the tests check them against a
/// recount wherever they check the per-state counts).
fn counted() -> Tracker {
    let mut t = Tracker::default();
    t.count_groups();
    t
}

/// The namespace of the test sockets.
pub(crate) const NETNS: u32 = 4_026_531_840;

use TcpState::*;

fn feed(t: &mut Tracker, evs: &[Transition]) -> (Vec<Observed>, Vec<SocketLife>) {
    let mut ended = Vec::new();
    let obs = evs.iter().map(|e| t.observe(e, &mut ended)).collect();
    (obs, ended)
}

#[test]
fn an_active_life_with_durations() {
    let mut t = counted();
    let mut first = tr(1, 100, Close, SynSent, 7);
    first.id.sport = 0; // not chosen yet at connect()
    let (obs, ended) = feed(
        &mut t,
        &[
            first,
            tr(1, 190, SynSent, Established, 9),
            tr(1, 1190, Established, FinWait1, 7),
            tr(1, 1200, FinWait1, FinWait2, 9),
            tr(1, 1210, FinWait2, Close, 9),
        ],
    );
    let old_ns: Vec<_> = obs.iter().map(|o| o.old_ns).collect();
    assert_eq!(old_ns, [None, Some(90), Some(1000), Some(10), Some(10)]);
    assert_eq!(obs[0].sport, 0);
    assert_eq!(obs[1].sport, 40000);
    assert_eq!(t.live(), 0);
    assert_eq!(ended.len(), 1);
    let life = &ended[0];
    assert_eq!(life.role, Role::Active);
    assert_eq!(life.end, End::Closed);
    assert!(!life.first_seen_mid_life);
    assert_eq!(life.id.sport, 40000);
    assert_eq!(life.owner.map(|o| o.pid), Some(7));
    assert_eq!(
        life.spans,
        [
            Span {
                state: SynSent,
                entered_ns: Some(100),
                ns: Some(90)
            },
            Span {
                state: Established,
                entered_ns: Some(190),
                ns: Some(1000)
            },
            Span {
                state: FinWait1,
                entered_ns: Some(1190),
                ns: Some(10)
            },
            Span {
                state: FinWait2,
                entered_ns: Some(1200),
                ns: Some(10)
            },
            Span {
                state: Close,
                entered_ns: Some(1210),
                ns: None
            },
        ]
    );
    assert_eq!(life.lifetime_ns, Some(1110));
}

#[test]
fn first_seen_mid_life_is_unknown() {
    let mut t = counted();
    let (obs, ended) = feed(
        &mut t,
        &[
            tr(2, 500, Established, CloseWait, 3),
            tr(2, 800, CloseWait, LastAck, 4),
            tr(2, 900, LastAck, Close, 5),
        ],
    );
    assert_eq!(obs[0].old_ns, None);
    assert_eq!(obs[0].owner, None);
    assert_eq!(obs[1].old_ns, Some(300));
    let life = &ended[0];
    assert!(life.first_seen_mid_life);
    assert_eq!(life.role, Role::Unknown);
    assert_eq!(
        life.spans[0],
        Span {
            state: Established,
            entered_ns: None,
            ns: None
        }
    );
    assert_eq!(life.lifetime_ns, None);
    assert_eq!(life.owner.map(|o| o.pid), Some(4));
}

#[test]
fn a_missed_event_makes_the_next_duration_unknown() {
    let mut t = counted();
    let (obs, _) = feed(
        &mut t,
        &[
            tr(3, 0, Close, SynSent, 1),
            // SYN_SENT -> ESTABLISHED was lost.
            tr(3, 50, Established, FinWait1, 1),
            tr(3, 60, FinWait1, FinWait2, 1),
        ],
    );
    assert_eq!(obs[1].old_ns, None);
    assert_eq!(obs[2].old_ns, Some(10));
    assert_eq!(t.stats().mismatched, 1);
    let life = t.sockets().next().unwrap();
    let states: Vec<_> = life.spans.iter().map(|s| (s.state, s.ns)).collect();
    assert_eq!(
        states,
        [
            (SynSent, None),
            (Established, None),
            (FinWait1, Some(10)),
            (FinWait2, None)
        ]
    );
}

#[test]
fn resets_and_refusals_end_as_reset() {
    let mut t = counted();
    let (_, ended) = feed(
        &mut t,
        &[
            tr(4, 0, Close, SynSent, 1),
            tr(4, 5, SynSent, Close, 1),
            tr(5, 0, Close, SynSent, 1),
            tr(5, 5, SynSent, Established, 1),
            tr(5, 9, Established, Close, 1),
            tr(6, 0, Close, Listen, 2),
            tr(6, 9, Listen, Close, 2),
        ],
    );
    let ends: Vec<_> = ended.iter().map(|l| (l.sk, l.end, l.role)).collect();
    assert_eq!(
        ends,
        [
            (4, End::Reset, Role::Active),
            (5, End::Reset, Role::Active),
            (6, End::Closed, Role::Listener)
        ]
    );
}

#[test]
fn owner_comes_from_process_context_only() {
    let mut t = counted();
    // The passive child: its handshake and the peer's FIN run in softirq on top of
    // unrelated tasks 50 and 51.
    let (obs, ended) = feed(
        &mut t,
        &[
            tr(5, 0, Listen, SynRecv, 50),
            tr(5, 1, SynRecv, Established, 50),
            tr(5, 2, Established, CloseWait, 51),
            tr(5, 3, CloseWait, LastAck, 42), // the server's close(): process context
            tr(5, 4, LastAck, Close, 51),
        ],
    );
    let owners: Vec<_> = obs.iter().map(|o| o.owner.map(|o| o.pid)).collect();
    assert_eq!(owners, [None, None, None, Some(42), Some(42)]);
    assert_eq!(ended[0].role, Role::Passive);
    assert_eq!(
        ended[0].owner,
        Some(Owner {
            pid: 42,
            comm: Comm::from_name("task42")
        })
    );
}

#[test]
fn a_reused_address_starts_a_fresh_record() {
    let mut t = counted();
    let (obs, ended) = feed(
        &mut t,
        &[
            tr(6, 0, Close, SynSent, 1),
            tr(6, 10, SynSent, Close, 1),
            tr(6, 20, Close, Listen, 2), // same struct sock address, a new socket
        ],
    );
    assert_eq!(obs[2].old_ns, None);
    assert_eq!(obs[2].owner.map(|o| o.pid), Some(2));
    assert_eq!(ended.len(), 1);
    let live: Vec<_> = t.sockets().collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].role, Role::Listener);
    assert_eq!(live[0].spans.len(), 1);
}

#[test]
fn a_child_born_without_cookie_or_peer_takes_them_from_its_next_event() {
    // Linux 6.1: the child's LISTEN -> SYN_RECV comes before the kernel gives it its
    // request's cookie (the program reports 0) and its peer's address.
    let sk = 0xffff_8880_0000_1000;
    let mut born = tr(sk, 1_000, Listen, SynRecv, 1);
    born.id.cookie = 0;
    born.id.daddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    born.id.dport = 0;
    let mut est = tr(sk, 1_500, SynRecv, Established, 1);
    est.id.cookie = 77;
    let mut t = counted();
    let (obs, ended) = feed(&mut t, &[born, est]);
    assert!(ended.is_empty(), "{ended:?}");
    assert_eq!(t.stats().unseen_reused, 0);
    assert_eq!(
        obs[1].old_ns,
        Some(500),
        "SYN_RECV lasted from the child's birth"
    );
    let life = t.socket(77).expect("tracked by its cookie");
    assert_eq!(
        (life.id.cookie, life.id.dport, life.id.daddr),
        (77, 8080, est.id.daddr)
    );
    assert_eq!(life.role, Role::Passive);
    assert!(!life.first_seen_mid_life);
    assert_eq!(t.state_counts()[Established as usize], 1);
    assert_eq!(t.live(), 1);
    // The same on a kernel that reports the listener's cookie (copied into the child)
    // at the child's birth.
    let mut t = counted();
    let listener = 0xffff_8880_0000_2000;
    let mut listen = tr(listener, 0, Close, Listen, 1);
    listen.id.cookie = 5;
    let mut born = tr(sk, 1_000, Listen, SynRecv, 1);
    born.id.cookie = 5;
    born.id.daddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    born.id.dport = 0;
    t.observe(&listen, &mut Vec::new());
    assert_eq!(t.vetted(&born).map(|v| v.id.cookie), Some(0));
    assert_eq!(t.vetted(&listen), None);
    let (_, ended) = feed(&mut t, &[born, est]);
    assert!(ended.is_empty(), "{ended:?}");
    assert_eq!(t.socket(5).map(SocketLife::state), Some(Some(Listen)));
    assert_eq!(t.socket(77).map(|l| l.role), Some(Role::Passive));
    assert_eq!(t.live(), 2);
    // Or one the kernel overwrote after the event (the listener had none to copy).
    let mut t = counted();
    let mut born = tr(sk, 1_000, Listen, SynRecv, 1);
    born.id.cookie = 76;
    let (obs, ended) = feed(&mut t, &[born, est]);
    assert!(ended.is_empty(), "{ended:?}");
    assert_eq!(obs[1].old_ns, Some(500));
    assert!(t.socket(76).is_none());
    assert_eq!(t.socket(77).map(|l| l.id.cookie), Some(77));
    // Past its birth, a new cookie at the same address is another socket.
    let mut t = counted();
    let mut born = tr(sk, 1_000, Listen, SynRecv, 1);
    born.id.cookie = 76;
    let mut first = tr(sk, 1_500, SynRecv, Established, 1);
    first.id.cookie = 76;
    let mut other = tr(sk, 2_000, Established, CloseWait, 1);
    other.id.cookie = 78;
    let (_, ended) = feed(&mut t, &[born, first, other]);
    assert_eq!(ended.len(), 1);
    assert_eq!(t.stats().unseen_reused, 1);
}

#[test]
fn a_huge_cap_allocates_nothing_up_front() {
    let t = Tracker::new(usize::MAX);
    assert_eq!(t.live(), 0);
}

#[test]
fn eviction_keeps_the_cap_and_drops_the_least_recently_active() {
    let mut t = Tracker::new(3);
    let mut ended = Vec::new();
    for sk in 1..=3 {
        t.observe(&tr(sk, sk, Close, SynSent, 1), &mut ended);
    }
    t.observe(&tr(1, 10, SynSent, Established, 1), &mut ended); // 1 is active again
    t.observe(&tr(4, 11, Close, SynSent, 1), &mut ended); // evicts 2
    assert_eq!(t.live(), 3);
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].sk, ended[0].end), (2, End::Evicted));
    assert_eq!(t.stats().evicted, 1);
}

#[test]
fn still_open_at_exit() {
    let mut t = counted();
    let mut ended = Vec::new();
    t.observe(&tr(7, 100, Close, SynSent, 1), &mut ended);
    t.observe(&tr(7, 200, SynSent, Established, 1), &mut ended);
    let open = t.close_all(1200);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].end, End::StillOpen);
    assert_eq!(open[0].lifetime_ns, Some(1100));
    assert_eq!(open[0].spans.last().unwrap().ns, None);
    assert_eq!(t.live(), 0);
}

#[test]
fn a_skipped_exit_ends_unseen_and_the_next_life_starts_fresh() {
    // pgbench -C showed it: a socket's last event is ESTABLISHED -> FIN_WAIT1, then its
    // address serves another connection. The two must not merge.
    let mut t = counted();
    let second = |ts, old, new| {
        let t = tr(9, ts, old, new, 3);
        Transition {
            id: SocketId { cookie: 92, ..t.id },
            ..t
        }
    };
    let (_, ended) = feed(
        &mut t,
        &[
            tr(9, 100, Close, SynSent, 3),
            tr(9, 200, SynSent, Established, 3),
            tr(9, 300, Established, FinWait1, 3),
            second(400, Close, SynSent),
            second(500, SynSent, Established),
        ],
    );
    assert_eq!(ended.len(), 1);
    let first = &ended[0];
    assert_eq!(
        (first.id.cookie, first.end, first.lifetime_ns),
        (9, End::Unseen, None)
    );
    assert_eq!(first.state(), Some(FinWait1));
    let live: Vec<_> = t.sockets().collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id.cookie, 92);
    assert_eq!(
        live[0].spans.iter().filter(|s| s.state == SynSent).count(),
        1,
        "one SYN_SENT per life"
    );
    assert!(!live[0].first_seen_mid_life);
    assert_eq!(t.stats().unseen_reused, 1);
}

fn seed(cookie: u64, state: TcpState, timewait: bool) -> Seed {
    let here = IpAddr::V4(Ipv4Addr::LOCALHOST);
    Seed {
        id: SocketId {
            cookie,
            netns: NETNS,
            family: Family::Ipv4,
            saddr: here,
            sport: 40000,
            daddr: here,
            dport: 8080,
        },
        state,
        timewait,
        cgroup: 0,
        owner: None,
    }
}

#[test]
fn snapshot_sockets_are_known_by_cookie() {
    let mut t = counted();
    // Taken by 1_000: sockets 1 and 2 were there.
    t.seed(
        [seed(1, CloseWait, false), seed(2, Established, false)],
        1_000,
    );
    assert_eq!(t.live(), 2);
    assert_eq!(t.state_counts()[CloseWait as usize], 1);
    // Socket 1 closes after the snapshot: its life goes on from the snapshot's state.
    let (_, ended) = feed(
        &mut t,
        &[
            tr(1, 1_500, CloseWait, LastAck, 5),
            tr(1, 1_600, LastAck, Close, 6),
        ],
    );
    assert!(ended[0].existed_at_start && ended[0].first_seen_mid_life);
    assert_eq!(
        ended[0].spans.iter().map(|s| s.state).collect::<Vec<_>>(),
        [CloseWait, LastAck, Close]
    );
    assert_eq!(ended[0].owner.map(|o| o.pid), Some(5));
    assert_eq!(t.stats().mismatched, 0);
    // A socket not in the snapshot is not marked.
    let (_, ended) = feed(&mut t, &[tr(3, 1_700, Established, Close, 1)]);
    assert!(!ended[0].existed_at_start);
}

#[test]
fn an_event_from_before_the_snapshot_replaces_it() {
    // Socket 7 was born between the attach and the snapshot: the snapshot (taken by
    // 1_000) saw it ESTABLISHED, but its events from 500 on are in the ring.
    let mut t = counted();
    t.seed([seed(7, Established, false)], 1_000);
    let (_, ended) = feed(
        &mut t,
        &[
            tr(7, 500, Close, SynSent, 4),
            tr(7, 600, SynSent, Established, 4),
            tr(7, 2_000, Established, Close, 4),
        ],
    );
    let life = &ended[0];
    assert!(!life.existed_at_start, "born after tracing began");
    assert_eq!((life.role, life.first_seen_mid_life), (Role::Active, false));
    assert_eq!(
        life.spans
            .iter()
            .map(|s| (s.state, s.ns))
            .collect::<Vec<_>>(),
        [
            (SynSent, Some(100)),
            (Established, Some(1_400)),
            (Close, None)
        ]
    );
    assert_eq!(t.stats().mismatched, 0);
}

fn twe(op: TimerOp, ts: u64, substate: TcpState) -> TimewaitEvent {
    let t = tr(1, 0, Close, Close, 0);
    TimewaitEvent {
        ts_ns: ts,
        op,
        tw: 0xbeef,
        id: SocketId {
            cookie: 1,
            netns: NETNS,
            family: t.id.family,
            saddr: t.id.saddr,
            sport: t.id.sport,
            daddr: t.id.daddr,
            dport: t.id.dport,
        },
        substate,
        expires: 0,
        jiffies: 0,
        cpu: Some(0),
        task: Task {
            pid: 0,
            tid: 0,
            comm: Comm::from_name("swapper/0"),
        },
    }
}

/// Connect, close first, FIN_WAIT2: what the timewait tests start from (socket and
/// cookie 1, owner pid 7, FIN_WAIT2 entered at 1_200).
fn closing(t: &mut Tracker) {
    let (_, ended) = feed(
        t,
        &[
            tr(1, 100, Close, SynSent, 7),
            tr(1, 200, SynSent, Established, 9),
            tr(1, 1_000, Established, FinWait1, 7),
            tr(1, 1_200, FinWait1, FinWait2, 9),
        ],
    );
    assert!(ended.is_empty());
}

fn derived(t: &mut Tracker) -> Vec<(TcpState, TcpState, u64, Option<u64>)> {
    assert_eq!(t.state_counts(), t.recount(), "live counts kept in step");
    if let Some(g) = t.group_counts() {
        assert_eq!(g, &t.recount_groups(), "group counts kept in step");
    }
    t.take_derived()
        .map(|(tr, o)| {
            assert_eq!(tr.via, Via::Timewait);
            (tr.old, tr.new, tr.ts_ns, o.old_ns)
        })
        .collect()
}

fn states(life: &SocketLife) -> Vec<(TcpState, Option<u64>, Option<u64>)> {
    life.spans
        .iter()
        .map(|s| (s.state, s.entered_ns, s.ns))
        .collect()
}

const S: u64 = 1_000_000_000;

#[test]
fn time_wait_carries_the_life_on_and_expires() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    // The peer's FIN: the timewait socket is armed in TIME_WAIT, then the full socket
    // goes FIN_WAIT2 -> CLOSE.
    t.timewait(&twe(TimerOp::Arm, 5_000, TimeWait), &mut ended);
    let o = t.observe(&tr(1, 5_010, FinWait2, Close, 0), &mut ended);
    assert!(
        o.hidden,
        "the kernel's FIN_WAIT2 -> CLOSE is not the TCP view"
    );
    assert!(ended.is_empty());
    assert_eq!(derived(&mut t), [(FinWait2, TimeWait, 5_000, Some(3_800))]);
    assert_eq!(t.state_counts()[TimeWait as usize], 1);
    assert_eq!(t.state_counts()[FinWait2 as usize], 0);
    // 60 s later: cancel, then expiry, on the same CPU.
    let end = 5_000 + 60 * S;
    t.timewait(&twe(TimerOp::Cancel, end, TimeWait), &mut ended);
    t.timewait(&twe(TimerOp::Expire, end + 20, TimeWait), &mut ended);
    assert_eq!(
        derived(&mut t),
        [(TimeWait, Close, end + 20, Some(60 * S + 20))]
    );
    let life = &ended[0];
    assert_eq!(life.end, End::TimeWaitExpired);
    assert_eq!(
        (life.sk, life.id.cookie),
        (1, 1),
        "the full socket's identity"
    );
    assert_eq!(life.role, Role::Active);
    assert_eq!(life.owner.map(|o| o.pid), Some(7));
    assert_eq!(
        states(life)[3..],
        [
            (FinWait2, Some(1_200), Some(3_800)),
            (TimeWait, Some(5_000), Some(60 * S + 20)),
            (Close, Some(end + 20), None),
        ]
    );
    assert_eq!(life.lifetime_ns, Some(end + 20 - 100));
    assert_eq!(t.live(), 0);
    // Nothing is left to settle.
    t.settle(u64::MAX, &mut ended);
    assert_eq!(ended.len(), 1);
}

/// The counters at the full socket's hidden X -> CLOSE (its timewait socket keeps none)
/// are the life's; its cgroup carries over to the derived transitions and the end.
#[test]
fn counters_and_cgroup_carry_through_time_wait() {
    let facts = |acked| crate::model::ConnFacts {
        bytes_acked: acked,
        bytes_received: 5_001,
        srtt_us: 40,
        min_rtt_us: Some(20),
        retrans: 1,
    };
    let mut t = counted();
    let mut ended = Vec::new();
    for (i, mut e) in [
        tr(1, 100, Close, SynSent, 7),
        tr(1, 200, SynSent, Established, 9),
        tr(1, 1_000, Established, FinWait1, 7),
        tr(1, 1_200, FinWait1, FinWait2, 9),
    ]
    .into_iter()
    .enumerate()
    {
        e.cgroup = 4242;
        e.facts = Some(facts(i as u64));
        t.observe(&e, &mut ended);
    }
    t.timewait(&twe(TimerOp::Arm, 5_000, TimeWait), &mut ended);
    let mut close = tr(1, 5_010, FinWait2, Close, 0);
    close.cgroup = 4242;
    close.facts = Some(facts(100_002));
    assert!(t.observe(&close, &mut ended).hidden);
    let to_tw: Vec<_> = t.take_derived().map(|(tr, _)| tr.cgroup).collect();
    assert_eq!(
        to_tw,
        [4242],
        "the derived → TIME_WAIT has the socket's cgroup"
    );
    t.timewait(&twe(TimerOp::Cancel, 6_000, TimeWait), &mut ended);
    t.timewait(&twe(TimerOp::Expire, 6_010, TimeWait), &mut ended);
    let life = &ended[0];
    assert_eq!(life.end, End::TimeWaitExpired);
    assert_eq!((life.cgroup, life.facts), (4242, Some(facts(100_002))));
}

/// An accepted socket's owner is its listener's from its first event (the task on the
/// CPU is the client's), until its own process context says otherwise; a listener has no
/// counters.
#[test]
fn an_accepted_socket_inherits_its_listeners_owner() {
    let mut t = counted();
    let mut listen = tr(50, 100, Close, Listen, 30);
    listen.id.sport = 8080;
    listen.facts = Some(crate::model::ConnFacts::default());
    let child = |ts, old, new, pid| {
        let mut e = tr(51, ts, old, new, pid);
        e.id.sport = 8080;
        e
    };
    let (observed, _) = feed(
        &mut t,
        &[
            listen,
            child(200, Listen, SynRecv, 40),
            child(300, SynRecv, Established, 40),
            child(400, Established, CloseWait, 40),
        ],
    );
    let owners: Vec<_> = observed.iter().map(|o| o.owner.map(|o| o.pid)).collect();
    assert_eq!(owners, [Some(30), Some(30), Some(30), Some(30)]);
    // Its process (a worker the listener was handed to) closes it: that is its owner.
    let (observed, ended) = feed(
        &mut t,
        &[
            child(500, CloseWait, LastAck, 31),
            child(600, LastAck, Close, 40),
        ],
    );
    assert_eq!(observed[1].owner.map(|o| o.pid), Some(31));
    assert_eq!(ended[0].owner.map(|o| o.pid), Some(31));
    // Another namespace's listener on the same port lends nothing.
    let mut other = tr(52, 700, Listen, SynRecv, 40);
    other.id.netns = NETNS + 1;
    other.id.sport = 8080;
    let (observed, _) = feed(&mut t, &[other]);
    assert_eq!(observed[0].owner, None);
    // The listener closes: none of it is left, and it had no counters.
    let mut close = tr(50, 800, Listen, Close, 30);
    close.id.sport = 8080;
    close.facts = Some(crate::model::ConnFacts::default());
    let (_, ended) = feed(&mut t, &[close]);
    assert_eq!((ended[0].role, ended[0].facts), (Role::Listener, None));
    let mut late = tr(53, 900, Listen, SynRecv, 40);
    late.id.sport = 8080;
    let (observed, _) = feed(&mut t, &[late]);
    assert_eq!(observed[0].owner, None, "no listener, no owner");
}

#[test]
fn the_next_event_on_the_cancels_cpu_tells_a_kill() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Arm, 2 * S, TimeWait), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    derived(&mut t);
    let cancel = TimewaitEvent {
        cpu: Some(1),
        ..twe(TimerOp::Cancel, 3 * S, TimeWait)
    };
    t.timewait(&cancel, &mut ended);
    // Another CPU's events say nothing about it.
    let elsewhere = Transition {
        cpu: Some(0),
        ..tr(50, 3 * S + 1_000, Close, SynSent, 8)
    };
    t.observe(&elsewhere, &mut ended);
    assert!(ended.is_empty());
    // The next event on CPU 1 is not its expiry or re-arm: it was killed, at the cancel.
    let next = Transition {
        cpu: Some(1),
        ..tr(51, 3 * S + 5_000, Listen, SynRecv, 8)
    };
    t.observe(&next, &mut ended);
    assert_eq!(derived(&mut t), [(TimeWait, Close, 3 * S, Some(S))]);
    assert_eq!((ended[0].id.cookie, ended[0].end), (1, End::TimeWaitKilled));
}

#[test]
fn an_expiry_or_rearm_after_the_cancel_is_no_kill() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    let on1 = |op, ts, sub| TimewaitEvent {
        cpu: Some(1),
        ..twe(op, ts, sub)
    };
    t.timewait(&on1(TimerOp::Arm, 2 * S, FinWait2), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    assert_eq!(derived(&mut t), [], "FIN_WAIT2 just goes on");
    assert_eq!(t.flip_candidates().len(), 1);
    // 3 s later the peer's FIN re-arms into another timer bucket: cancel, then arm.
    t.timewait(&on1(TimerOp::Cancel, 5 * S, TimeWait), &mut ended);
    assert!(
        t.flip_candidates().is_empty(),
        "on its way: not a candidate"
    );
    t.timewait(&on1(TimerOp::Arm, 5 * S + 5_000, TimeWait), &mut ended);
    t.settle(5 * S + SETTLE_NS * 2, &mut ended);
    assert!(ended.is_empty(), "a re-arm is no kill");
    assert!(t.flip_candidates().is_empty());
    assert_eq!(
        derived(&mut t),
        [(
            FinWait2,
            TimeWait,
            5 * S + 5_000,
            Some(5 * S + 5_000 - 1_200)
        )]
    );
    t.timewait(&on1(TimerOp::Cancel, 65 * S, TimeWait), &mut ended);
    t.timewait(&on1(TimerOp::Expire, 65 * S + 9, TimeWait), &mut ended);
    assert_eq!(ended[0].end, End::TimeWaitExpired);
}

#[test]
fn a_cancel_nothing_follows_is_a_kill_after_the_settle_time() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Arm, 2 * S, TimeWait), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    derived(&mut t);
    t.timewait(&twe(TimerOp::Cancel, 3 * S, TimeWait), &mut ended);
    t.settle(3 * S + SETTLE_NS - 1, &mut ended);
    assert!(ended.is_empty(), "not settled before the margin");
    t.settle(3 * S + SETTLE_NS, &mut ended);
    assert_eq!(derived(&mut t), [(TimeWait, Close, 3 * S, Some(S))]);
    assert_eq!(ended[0].end, End::TimeWaitKilled);
    assert_eq!(t.live(), 0);
}

/// Jiffy `j` at HZ=250, starting at monotonic 0.
fn at_jiffy(j: u64) -> u64 {
    j * 4_000_000
}

#[test]
fn three_connections_on_one_four_tuple_each_get_their_time_wait() {
    // The repro of a wrong join: the server closes first; one client port connects three
    // times, 0.5 s apart. Each SYN kills the previous TIME_WAIT, and the next timewait
    // socket gets the freed address. Cookies tell them apart.
    let mut t = counted();
    let mut ended = Vec::new();
    let tw_addr = 0xbeef;
    for i in 0..3u64 {
        let (sk, cookie) = (100 + i, 10 + i);
        let j0 = 1_000 + 125 * i; // 0.5 s apart
        let ev = |ts: u64, old, new| {
            let t = tr(sk, ts, old, new, 7);
            Transition {
                id: SocketId { cookie, ..t.id },
                cpu: Some(0),
                jiffies: ts / 4_000_000,
                ..t
            }
        };
        let tw = |op, j: u64, sub, expires| {
            let e = twe(op, at_jiffy(j), sub);
            TimewaitEvent {
                id: SocketId { cookie, ..e.id },
                tw: tw_addr,
                expires,
                jiffies: j,
                ..e
            }
        };
        if i > 0 {
            // The SYN kills the previous one (its substate turned TIME_WAIT silently one
            // jiffy after its arming, so its timer expires at 1 + 15_000 jiffies later).
            let prev = 10 + i - 1;
            let prev_j0 = j0 - 125;
            let mut kill = tw(TimerOp::Cancel, j0, TimeWait, prev_j0 + 1 + 15_000);
            kill.id.cookie = prev;
            t.timewait(&kill, &mut ended);
        }
        let start = at_jiffy(j0);
        for (k, (old, new)) in [
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
        ]
        .into_iter()
        .enumerate()
        {
            t.observe(&ev(start + 1_000 * k as u64 + 1, old, new), &mut ended);
        }
        t.timewait(&tw(TimerOp::Arm, j0, FinWait2, j0 + 15_000), &mut ended);
        t.observe(&ev(start + 5_000, FinWait2, Close), &mut ended);
    }
    t.settle(at_jiffy(1_250) + SETTLE_NS, &mut ended);
    assert_eq!(t.hz(), Some(250), "learned from the events");
    // Two killed, each with its own TIME_WAIT, placed from its timer: the middle of jiffy
    // j0 + 1, until the next SYN at j0 + 125.
    assert_eq!(ended.len(), 2, "{ended:#?}");
    for (i, life) in ended.iter().enumerate() {
        let j0 = 1_000 + 125 * i as u64;
        assert_eq!(
            (life.id.cookie, life.end),
            (10 + i as u64, End::TimeWaitKilled)
        );
        let tw = life.spans.iter().find(|s| s.state == TimeWait).unwrap();
        assert_eq!(tw.entered_ns, Some(at_jiffy(j0 + 1) + 2_000_000));
        assert_eq!(
            tw.ns,
            Some(at_jiffy(j0 + 125) - at_jiffy(j0 + 1) - 2_000_000)
        );
        assert_eq!(life.role, Role::Passive);
    }
    // The third lives on in FIN_WAIT2, as far as the events show.
    assert_eq!(t.live(), 1);
    assert_eq!(t.flip_candidates()[0].cookie, 12);
}

#[test]
fn sock_diag_shows_the_silent_turn_with_its_time() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Arm, 2 * S, FinWait2), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    // Listed from 3 s on in TIME_WAIT, entered (by its timer) at 2.5 s.
    t.flipped(1, Some(2 * S + S / 2), 3 * S);
    assert_eq!(
        derived(&mut t),
        [(
            FinWait2,
            TimeWait,
            2 * S + S / 2,
            Some(2 * S + S / 2 - 1_200)
        )]
    );
    assert!(t.flip_candidates().is_empty());
    assert_eq!(t.state_counts()[TimeWait as usize], 1);
    // Its end shows no second turn.
    t.timewait(&twe(TimerOp::Cancel, 62 * S, TimeWait), &mut ended);
    t.timewait(&twe(TimerOp::Expire, 62 * S + 5, TimeWait), &mut ended);
    assert_eq!(
        derived(&mut t),
        [(
            TimeWait,
            Close,
            62 * S + 5,
            Some(62 * S + 5 - 2 * S - S / 2)
        )]
    );
    assert_eq!(ended[0].end, End::TimeWaitExpired);
}

#[test]
fn a_turn_without_a_time_counts_and_is_placed_at_the_end() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    let with_j = |op, j: u64, sub, expires| TimewaitEvent {
        expires,
        jiffies: j,
        ..twe(op, at_jiffy(j), sub)
    };
    t.timewait(&with_j(TimerOp::Arm, 1_000, FinWait2, 16_000), &mut ended);
    t.observe(&tr(1, at_jiffy(1_000) + 10, FinWait2, Close, 0), &mut ended);
    // An event newer than the listing: it says nothing.
    t.flipped(1, None, at_jiffy(1_000));
    assert_eq!(t.state_counts()[FinWait2 as usize], 1);
    t.flipped(1, None, at_jiffy(1_200));
    assert_eq!(t.state_counts()[FinWait2 as usize], 0);
    assert_eq!(t.state_counts()[TimeWait as usize], 1);
    assert_eq!(derived(&mut t), []);
    // The turn came at jiffy 1_125: the timer expires 15_000 jiffies after it.
    t.timewait(
        &with_j(TimerOp::Cancel, 16_125, TimeWait, 16_125),
        &mut ended,
    );
    t.timewait(
        &with_j(TimerOp::Expire, 16_125, TimeWait, 16_125),
        &mut ended,
    );
    let turn = at_jiffy(1_125) + 2_000_000;
    assert_eq!(
        derived(&mut t),
        [
            (FinWait2, TimeWait, turn, Some(turn - 1_200)),
            (
                TimeWait,
                Close,
                at_jiffy(16_125),
                Some(at_jiffy(16_125) - turn)
            ),
        ]
    );
    assert_eq!(ended[0].end, End::TimeWaitExpired);
}

#[test]
fn an_orphan_fin_wait2_runs_out() {
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Arm, 2 * S, FinWait2), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    t.timewait(&twe(TimerOp::Cancel, 4 * S, FinWait2), &mut ended);
    t.timewait(&twe(TimerOp::Expire, 4 * S + 10, FinWait2), &mut ended);
    assert_eq!(
        derived(&mut t),
        [(FinWait2, Close, 4 * S + 10, Some(4 * S + 10 - 1_200))]
    );
    assert_eq!(ended[0].end, End::Closed);
    assert!(!ended[0].spans.iter().any(|s| s.state == TimeWait));
}

#[test]
fn a_timewait_socket_from_before_tracing() {
    let mut t = counted();
    t.seed([seed(1, TimeWait, true)], S);
    assert_eq!(t.state_counts()[TimeWait as usize], 1);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Cancel, 2 * S, TimeWait), &mut ended);
    t.timewait(&twe(TimerOp::Expire, 2 * S + 1, TimeWait), &mut ended);
    let life = &ended[0];
    assert!(life.existed_at_start && life.first_seen_mid_life);
    assert_eq!(
        states(life),
        [(TimeWait, None, None), (Close, Some(2 * S + 1), None)]
    );
    assert_eq!(life.end, End::TimeWaitExpired);
    assert_eq!(t.state_counts()[TimeWait as usize], 0);
}

/// A full socket as a listing shows it.
fn full(state: TcpState) -> Listed {
    Listed {
        state,
        timewait: false,
        turned_at: None,
    }
}

#[test]
fn reconcile_ends_what_sock_diag_no_longer_lists() {
    let mut t = counted();
    let mut ended = Vec::new();
    let mut other_ns = tr(3, 100, Close, SynSent, 1);
    other_ns.id.netns = 77;
    for e in [
        tr(1, 100, Close, SynSent, 1),
        tr(1, 110, SynSent, Established, 1),
        tr(2, 100, Established, CloseWait, 1),
        other_ns,
        tr(4, 100, Close, SynSent, 1),
        tr(4, 5_000, SynSent, Established, 1), // after the listing began
        tr(5, 100, Established, FinWait1, 1),
    ] {
        t.observe(&e, &mut ended);
    }
    let listing = Listing {
        from_ns: 1_000,
        to_ns: 1_100,
        netns: HashSet::from([NETNS]),
        states: vec![Established, SynSent, CloseWait, FinWait1],
        sockets: HashMap::from([(1, full(Established)), (2, full(LastAck))]),
    };
    let gone = t.reconcile(&listing, &mut ended);
    assert_eq!(t.state_counts(), t.recount());
    if let Some(g) = t.group_counts() {
        assert_eq!(g, &t.recount_groups());
    }
    // 5 is gone; 2 moved on unseen; 3 (another namespace) and 4 (newer) are not judged.
    assert_eq!(gone, 1);
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].id.cookie, ended[0].end, ended[0].lifetime_ns),
        (5, End::Unseen, None)
    );
    assert_eq!(t.socket(2).and_then(SocketLife::state), Some(LastAck));
    assert_eq!(t.socket(2).map(super::SocketLife::entered_ns), Some(None));
    for id in [1, 3, 4] {
        assert!(t.socket(id).is_some(), "{id}");
    }
    assert_eq!(t.stats().unseen_gone, 1);
    assert_eq!(t.stats().mismatched, 1);
    assert_eq!(t.state_counts()[LastAck as usize], 1);
}

#[test]
fn a_listing_without_time_wait_says_nothing_of_a_fin_wait2_timewait_socket() {
    // It may have turned TIME_WAIT silently: absent from a listing of FIN_WAIT2 sockets
    // (and not of TIME_WAIT ones), it is not gone.
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    t.timewait(&twe(TimerOp::Arm, 2 * S, FinWait2), &mut ended);
    t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
    let mut listing = Listing {
        from_ns: 3 * S,
        to_ns: 3 * S + 1_000,
        netns: HashSet::from([NETNS]),
        states: vec![Established, FinWait1, FinWait2, CloseWait, LastAck],
        sockets: HashMap::new(),
    };
    assert_eq!(t.reconcile(&listing, &mut ended), 0);
    assert!(ended.is_empty());
    assert_eq!(t.socket(1).and_then(SocketLife::state), Some(FinWait2));
    // With TIME_WAIT listed too, its absence means it is gone.
    listing.states.push(TimeWait);
    assert_eq!(t.reconcile(&listing, &mut ended), 1);
    assert_eq!(ended[0].end, End::Unseen);
}

#[test]
fn a_timewait_socket_whose_arm_was_lost_is_adopted_from_the_listing() {
    // The arm and the full socket's CLOSE were lost: the tracker holds a full socket in
    // FIN_WAIT2; sock_diag lists a timewait socket in TIME_WAIT, turned at 2.5 s.
    let mut t = counted();
    closing(&mut t);
    let mut ended = Vec::new();
    let listing = Listing {
        from_ns: 3 * S,
        to_ns: 3 * S + 1_000,
        netns: HashSet::from([NETNS]),
        states: vec![FinWait2, TimeWait],
        sockets: HashMap::from([(
            1,
            Listed {
                state: TimeWait,
                timewait: true,
                turned_at: Some(2 * S + S / 2),
            },
        )]),
    };
    assert_eq!(t.reconcile(&listing, &mut ended), 0);
    assert_eq!(t.state_counts(), t.recount());
    if let Some(g) = t.group_counts() {
        assert_eq!(g, &t.recount_groups());
    }
    assert_eq!(t.state_counts()[TimeWait as usize], 1);
    assert_eq!(
        derived(&mut t),
        [(
            FinWait2,
            TimeWait,
            2 * S + S / 2,
            Some(2 * S + S / 2 - 1_200)
        )]
    );
    // Its timer's end finds the life.
    t.timewait(&twe(TimerOp::Cancel, 62 * S, TimeWait), &mut ended);
    t.timewait(&twe(TimerOp::Expire, 62 * S + 1, TimeWait), &mut ended);
    assert_eq!(
        (ended[0].id.cookie, ended[0].end),
        (1, End::TimeWaitExpired)
    );
    assert_eq!(ended[0].role, Role::Active);
}

fn any_state() -> impl Strategy<Value = TcpState> {
    (1u8..=12).prop_map(|n| TcpState::from_kernel(n).unwrap())
}

/// Walks a socket really takes through the states the kernel reports (TIME_WAIT belongs
/// to the timewait socket and is not among them).
const WALKS: &[&[TcpState]] = &[
    &[Close, SynSent, Established, FinWait1, FinWait2, Close],
    &[Close, SynSent, Established, CloseWait, LastAck, Close],
    &[Listen, SynRecv, Established, CloseWait, LastAck, Close],
    &[Listen, SynRecv, Established, FinWait1, FinWait2, Close],
    &[Close, SynSent, Established, FinWait1, Closing, Close],
    &[Close, SynSent, Close],
    &[Listen, SynRecv, Established, Close],
    &[Close, Listen, Close],
];

proptest! {
    /// Up to 8 sockets, each on a valid walk with random times in each state, their events
    /// interleaved by time: every life ends `closed` or `reset` with exactly the
    /// durations it was given, and they add up to its lifetime.
    #[test]
    fn valid_walks_keep_their_durations(
        sockets in proptest::collection::vec(
            (0..WALKS.len(), 0u64..5_000, proptest::collection::vec(1u64..1_000_000_000, 5)),
            1..8,
        ),
    ) {
        let mut events = Vec::new();
        for (i, (walk, start, durations)) in sockets.iter().enumerate() {
            let walk = WALKS[*walk];
            let sk = i as u64 + 1;
            let mut ts = *start;
            for (n, pair) in walk.windows(2).enumerate() {
                if n > 0 {
                    ts += durations[n - 1];
                }
                events.push((ts, n, tr(sk, ts, pair[0], pair[1], 1)));
            }
        }
        // By time; a socket's own events keep their order.
        events.sort_by_key(|&(ts, n, e)| (ts, e.sk, n));
        let mut t = counted();
        let mut ended = Vec::new();
        for (_, _, e) in &events {
            t.observe(e, &mut ended);
            prop_assert_eq!(t.state_counts(), t.recount());
            prop_assert_eq!(t.group_counts(), Some(&t.recount_groups()));
        }
        prop_assert_eq!(t.live(), 0);
        prop_assert_eq!(ended.len(), sockets.len());
        for life in &ended {
            let (walk, _, durations) = &sockets[(life.id.cookie - 1) as usize];
            let walk = WALKS[*walk];
            let names: Vec<TcpState> = life.spans.iter().map(|s| s.state).collect();
            prop_assert_eq!(&names[..], &walk[1..], "{:?}", life);
            let got: Vec<Option<u64>> = life.spans.iter().map(|s| s.ns).collect();
            let mut want: Vec<Option<u64>> =
                durations[..walk.len() - 2].iter().copied().map(Some).collect();
            want.push(None); // CLOSE: the end
            prop_assert_eq!(&got, &want, "{:?}", life);
            let sum: u64 = durations[..walk.len() - 2].iter().sum();
            prop_assert_eq!(life.lifetime_ns, Some(sum));
            prop_assert!(!life.first_seen_mid_life);
        }
    }
}

proptest! {
    /// Random streams over a few sockets, with timestamps jittered backwards as events
    /// from different CPUs can be: every finished life's known durations add up to its
    /// lifetime, and no duration is ever negative (they are u64, so "negative" would
    /// show as a huge wrap-around).
    #[test]
    fn durations_sum_to_lifetime(
        steps in proptest::collection::vec((0u64..4, any_state(), any_state(), 0u64..1000, any::<bool>(), 1u32..4), 1..200),
    ) {
        let mut t = Tracker::new(3);
        t.count_groups();
        let mut ended = Vec::new();
        let mut ts = 1_000_000u64;
        for (sk, old, new, dt, back, pid) in steps {
            ts = if back { ts.saturating_sub(dt) } else { ts + dt };
            let mut e = tr(sk, ts, old, new, pid);
            e.cgroup = u64::from(pid % 2) * 77;
            let o = t.observe(&e, &mut ended);
            prop_assert!(o.old_ns.is_none_or(|ns| ns < 1_000_000));
            prop_assert!(t.live() <= 3);
            prop_assert_eq!(t.state_counts(), t.recount());
            prop_assert_eq!(t.group_counts(), Some(&t.recount_groups()));
        }
        ended.extend(t.close_all(ts + 10));
        for life in &ended {
            for s in &life.spans {
                prop_assert!(s.ns.is_none_or(|ns| ns < 1_000_000), "{life:?}");
            }
            let Some(lifetime) = life.lifetime_ns else { continue };
            // Fresh lives: every span but the last is known, and they add up.
            let known: u64 = life.spans.iter().filter_map(|s| s.ns).sum();
            let unknown = life.spans.iter().rev().skip(1).filter(|s| s.ns.is_none()).count();
            if unknown == 0 {
                let last_entered = life.spans.last().and_then(|s| s.entered_ns).unwrap();
                let first_entered = life.spans[0].entered_ns.unwrap();
                prop_assert_eq!(known, last_entered - first_entered);
                prop_assert!(lifetime >= known);
            }
        }
    }
}

/// An event of request `req` of listener cookie 50, for the 4-tuple of `tr`'s sockets seen
/// from the server: local 127.0.0.1:8080, peer 127.0.0.1:40000.
fn rq(op: TimerOp, req: u64, ts: u64, retrans: u8) -> crate::model::RequestEvent {
    let t = tr(1, 0, Close, Close, 0);
    crate::model::RequestEvent {
        ts_ns: ts,
        op,
        req,
        listener: 50,
        id: SocketId {
            cookie: 0,
            sport: 8080,
            dport: 40000,
            ..t.id
        },
        retrans,
        cgroup: 0,
        expires: 0,
        jiffies: 0,
        cpu: Some(0),
        task: t.task,
    }
}

/// The request event `op` at `ts` whose child is the socket of `t` (same namespace and
/// 4-tuple), at kernel address `req`, of listener cookie 50.
pub(crate) fn request_of(
    t: &Transition,
    op: TimerOp,
    req: u64,
    ts: u64,
) -> crate::model::RequestEvent {
    crate::model::RequestEvent {
        ts_ns: ts,
        req,
        id: SocketId { cookie: 0, ..t.id },
        ..rq(op, req, ts, 0)
    }
}

/// The server's child of that connection (cookie 7).
fn child(ts: u64, old: TcpState, new: TcpState) -> Transition {
    let mut t = tr(7, ts, old, new, 0);
    (t.id.sport, t.id.dport) = (8080, 40000);
    t
}

#[test]
fn a_passive_life_starts_at_its_syn() {
    let mut t = counted();
    t.request(&rq(TimerOp::Arm, 0xa, 1_000, 0));
    assert_eq!(t.requests().listeners()[&50].queued, 1);
    let (obs, _) = feed(&mut t, &[child(1_400, Listen, SynRecv)]);
    assert_eq!(obs[0].syn_ns, None);
    t.request(&rq(TimerOp::Cancel, 0xa, 1_450, 0));
    let (obs, _) = feed(&mut t, &[child(1_500, SynRecv, Established)]);
    // SYN at 1 000 to ESTABLISHED at 1 500: the handshake the server saw.
    assert_eq!(obs[0].syn_ns, Some(500));
    assert_eq!(obs[0].old_ns, Some(100), "the child's own SYN_RECV");
    let life = t.socket(7).expect("child");
    let spans: Vec<_> = life
        .spans
        .iter()
        .map(|s| (s.state, s.entered_ns, s.ns))
        .collect();
    assert_eq!(
        spans,
        [
            (NewSynRecv, Some(1_000), Some(400)),
            (SynRecv, Some(1_400), Some(100)),
            (Established, Some(1_500), None)
        ]
    );
    let l = t.requests().listeners()[&50];
    assert_eq!((l.queued, l.peak, l.syns, l.completed), (0, 1, 1, 1));
    // The cancel after the join finds nothing: no second end.
    t.settle(u64::MAX, &mut Vec::new());
    assert_eq!(t.requests().listeners()[&50].aborted, 0);
}

#[test]
fn a_child_without_its_peer_at_birth_joins_at_established() {
    // Linux before 6.15: the child's LISTEN -> SYN_RECV has no peer port yet.
    let mut t = counted();
    t.request(&rq(TimerOp::Arm, 0xa, 1_000, 0));
    let mut birth = child(1_400, Listen, SynRecv);
    birth.id.dport = 0;
    feed(&mut t, &[birth]);
    t.request(&rq(TimerOp::Cancel, 0xa, 1_450, 0));
    let (obs, _) = feed(&mut t, &[child(1_500, SynRecv, Established)]);
    assert_eq!(obs[0].syn_ns, Some(500));
    assert_eq!(t.socket(7).expect("child").spans[0].state, NewSynRecv);
    assert_eq!(t.requests().listeners()[&50].completed, 1);
}

#[test]
fn retransmissions_then_expiry_and_an_abort() {
    let mut t = counted();
    let s = 1_000_000_000;
    // Request 0xa: two SYN-ACK retransmissions, then dropped.
    t.request(&rq(TimerOp::Arm, 0xa, s, 0));
    for (at, retrans) in [(2 * s, 1), (4 * s, 2)] {
        t.request(&rq(TimerOp::Cancel, 0xa, at, retrans - 1));
        t.request(&rq(TimerOp::Expire, 0xa, at + 10, retrans - 1));
        t.request(&rq(TimerOp::Arm, 0xa, at + 20, retrans));
    }
    t.request(&rq(TimerOp::Cancel, 0xa, 8 * s, 2));
    t.request(&rq(TimerOp::Expire, 0xa, 8 * s + 10, 2));
    // Request 0xb (another peer port): cancelled with no expiry and no child.
    let mut other = rq(TimerOp::Arm, 0xb, 3 * s, 0);
    other.id.dport = 40001;
    t.request(&other);
    assert_eq!(t.requests().listeners()[&50].peak, 2);
    other.op = TimerOp::Cancel;
    other.ts_ns = 5 * s;
    t.request(&other);
    let mut ended = Vec::new();
    t.settle(8 * s + 10 + SETTLE_NS - 1, &mut ended);
    assert_eq!(t.requests().listeners()[&50].expired, 0, "not settled yet");
    t.settle(8 * s + 10 + SETTLE_NS, &mut ended);
    let l = t.requests().listeners()[&50];
    assert_eq!(
        (
            l.queued,
            l.syns,
            l.synack_retrans,
            l.expired,
            l.aborted,
            l.completed
        ),
        (0, 2, 2, 1, 1, 0)
    );
    assert!(t.requests().is_empty());
}

#[test]
fn a_dual_stack_listeners_request_joins_its_mapped_child() {
    let mut t = counted();
    t.request(&rq(TimerOp::Arm, 0xa, 1_000, 0));
    let mut c = child(1_400, Listen, SynRecv);
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    (c.id.family, c.id.saddr, c.id.daddr) = (Family::Ipv6, mapped, mapped);
    feed(&mut t, &[c]);
    assert_eq!(t.socket(7).expect("child").spans[0].state, NewSynRecv);
}

#[test]
fn syns_past_the_cap_are_counted_not_followed() {
    let mut t = Tracker::new(2);
    for req in 0..5u64 {
        let mut ev = rq(TimerOp::Arm, 0x100 + req, 1_000 + req, 0);
        ev.id.dport = 40_000 + req as u16;
        t.request(&ev);
    }
    assert_eq!(t.requests().len(), 2);
    assert_eq!(t.stats().requests_untracked, 3);
    assert_eq!(t.requests().total().syns, 2);
}

#[test]
fn a_closed_listener_stays_known_until_its_last_request_ends() {
    let mut t = counted();
    let listener = tr(50, 0, Close, Listen, 1);
    t.observe(&listener, &mut Vec::new());
    t.request(&rq(TimerOp::Arm, 0xa, 1_000, 0));
    t.request(&rq(TimerOp::Cancel, 0xa, 2_000, 0));
    t.request(&rq(TimerOp::Expire, 0xa, 2_010, 0));
    t.observe(&tr(50, 2_020, Listen, Close, 1), &mut Vec::new());
    // A report before the expiry settled: the listener is closed, its request waits.
    t.requests_mut().take_peaks();
    assert!(t.requests().closed_listener(50).is_some());
    t.settle(2_010 + SETTLE_NS, &mut Vec::new());
    assert_eq!(t.requests().listeners()[&50].expired, 1);
    assert!(
        t.requests().closed_listener(50).is_some(),
        "still known for the next report"
    );
    t.requests_mut().take_peaks();
    assert!(t.requests().closed_listener(50).is_none());
    assert!(!t.requests().listeners().contains_key(&50));
}
