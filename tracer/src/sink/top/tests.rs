//! `top` without a terminal: a scenario through the real pipeline and tracker, the model's
//! figures checked exactly, and the screen it draws snapshotted at two terminal sizes.

use std::net::{IpAddr, Ipv4Addr};

use jiff::tz::TimeZone;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};

use super::TopSink;
use super::model::{GroupKey, TopModel, ViewKind};
use crate::clock::{TimeFormatter, WallClock};
use crate::model::{Comm, Family, KernelEvent, SocketId, Task, TcpState, Transition, Via};
use crate::pipeline::Pipeline;
use crate::source::cgroup::CgroupNames;
use crate::source::host::Holders;
use crate::source::kernel::KernelFilter;
use crate::source::procs::Holder;
use crate::source::sockdiag::DiagSocket;
use crate::tracker::Tracker;
use TcpState::*;

const NETNS: u32 = 4_026_532_000;
const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const NGINX: u32 = 100;
const CURL: u32 = 200;
const NGINX_CGROUP: u64 = 5001;
const CURL_CGROUP: u64 = 5002;
const DOCKER: &str =
    "/system.slice/docker-2a55517bd2c9f1e0b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081920.scope";

fn socket(cookie: u64, sport: u16, dport: u16) -> SocketId {
    SocketId {
        cookie,
        netns: NETNS,
        family: Family::Ipv4,
        saddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        sport,
        daddr: IpAddr::V4(if dport == 0 {
            Ipv4Addr::UNSPECIFIED
        } else {
            Ipv4Addr::new(10, 0, 0, 2)
        }),
        dport,
    }
}

fn ev(
    ts_ns: u64,
    id: SocketId,
    old: TcpState,
    new: TcpState,
    pid: u32,
    cgroup: u64,
) -> KernelEvent {
    let comm = match pid {
        NGINX => "nginx",
        CURL => "curl",
        _ => "swapper/0",
    };
    KernelEvent::Transition(Transition {
        ts_ns,
        sk: 0xffff_0000_0000 + id.cookie * 4096,
        id,
        old,
        new,
        task: Task {
            pid,
            tid: pid,
            comm: Comm::from_name(comm),
        },
        via: Via::Tracepoint,
        cpu: Some(0),
        jiffies: 0,
        cgroup,
        facts: None,
    })
}

/// nginx (in a Docker container's cgroup) listens on :80 and accepts 3 connections; the
/// peers of two close theirs, which nginx never does (CLOSE_WAIT, 1.5 s and 1 s old at
/// the refresh at 2 s). curl opens 4 connections to :443, every 500 ms from 200 ms, and
/// closes the first 2.
fn scenario() -> Vec<KernelEvent> {
    let mut out = vec![ev(0, socket(1, 80, 0), Close, Listen, NGINX, NGINX_CGROUP)];
    for i in 0..3u64 {
        let id = socket(10 + i, 80, 50_000 + i as u16);
        let t = 100 * MS + i * 10 * MS;
        out.push(ev(t, id, Listen, SynRecv, 0, NGINX_CGROUP));
        out.push(ev(t + MS, id, SynRecv, Established, 0, NGINX_CGROUP));
    }
    out.push(ev(
        500 * MS,
        socket(10, 80, 50_000),
        Established,
        CloseWait,
        0,
        NGINX_CGROUP,
    ));
    out.push(ev(
        SEC,
        socket(11, 80, 50_001),
        Established,
        CloseWait,
        0,
        NGINX_CGROUP,
    ));
    for i in 0..4u64 {
        let id = socket(20 + i, 40_000 + i as u16, 443);
        let t = 200 * MS + i * 500 * MS;
        out.push(ev(t, id, Close, SynSent, CURL, CURL_CGROUP));
        out.push(ev(t + 2 * MS, id, SynSent, Established, 0, CURL_CGROUP));
        if i < 2 {
            out.push(ev(
                t + 50 * MS,
                id,
                Established,
                FinWait1,
                CURL,
                CURL_CGROUP,
            ));
            out.push(ev(t + 51 * MS, id, FinWait1, FinWait2, 0, CURL_CGROUP));
        }
    }
    out.sort_by_key(KernelEvent::ts_ns);
    out
}

/// nginx's two CLOSE_WAIT sockets as sock_diag and /proc show them, at `at_ns`.
fn holders(at_ns: u64) -> Holders {
    let sockets = [(10u64, 50_000u16, 7u32), (11, 50_001, 9)]
        .into_iter()
        .map(|(cookie, dport, fd)| {
            (
                DiagSocket {
                    id: socket(cookie, 80, dport),
                    state: CloseWait,
                    inode: 7000 + cookie,
                    uid: 0,
                    tw_expires_ms: None,
                    cgroup: NGINX_CGROUP,
                },
                Some(Holder {
                    pid: NGINX,
                    fd,
                    comm: "nginx".into(),
                    cmdline: "nginx: worker process".into(),
                }),
            )
        })
        .collect();
    Holders {
        at_ns,
        took_ns: MS,
        sockets,
        listeners: Vec::new(),
        counters: Vec::new(),
    }
}

fn sink(width: u16, height: u16) -> TopSink<TestBackend> {
    let names = CgroupNames::known([
        (NGINX_CGROUP, DOCKER),
        (CURL_CGROUP, "/user.slice/user-1000.slice"),
    ]);
    let model = TopModel::new(KernelFilter::default(), names);
    let terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
    // 2026-11-30T12:00:00Z at monotonic 0.
    let clock = WallClock {
        boot_offset_ns: 1_796_040_000_000_000_000,
    };
    TopSink::new(
        model,
        terminal,
        None,
        TimeFormatter::new(clock, TimeZone::UTC),
    )
}

/// Runs the scenario through the pipeline and refreshes at 2 s (with the holders), then
/// applies `keys`.
fn run(sink: &mut TopSink<TestBackend>, keys: &[KeyCode]) -> Tracker {
    let mut tracker = Tracker::default();
    tracker.count_groups();
    let mut p = Pipeline::new(tracker, vec![sink]);
    p.started(Some(0)).unwrap();
    // The first refresh at 1.0 s, the second at 2 s.
    let events = scenario();
    let (first, second): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.ts_ns() < SEC);
    for e in first {
        p.event(e).unwrap();
    }
    p.interval(SEC, None).unwrap();
    for e in second {
        p.event(e).unwrap();
    }
    p.interval(2 * SEC, Some(&holders(2 * SEC))).unwrap();
    let tracker = std::mem::take(&mut p.tracker);
    drop(p);
    for &k in keys {
        let ev = Event::Key(KeyEvent::new(k, KeyModifiers::NONE));
        if sink.key(&ev, &tracker) {
            sink.draw().unwrap();
        }
    }
    tracker
}

fn screen(sink: &TopSink<TestBackend>) -> String {
    let buffer = sink.terminal().backend().buffer();
    let width = usize::from(buffer.area.width);
    let mut out = String::new();
    for row in buffer.content.chunks(width) {
        let line: String = row.iter().map(ratatui::buffer::Cell::symbol).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[test]
fn the_model_counts_what_the_tracker_holds() {
    let mut top = sink(160, 48);
    let tracker = run(&mut top, &[]);
    let r = &top.model.refresh;
    assert_eq!(r.states_now, tracker.state_counts());
    assert_eq!(r.states_now[Listen as usize], 1);
    assert_eq!(r.states_now[Established as usize], 1 + 2);
    assert_eq!(r.states_now[CloseWait as usize], 2);
    assert_eq!(r.states_now[FinWait2 as usize], 2);
    assert_eq!(r.history.len(), 2);
    // The second window (1 s to 2 s) has curl's connects at 1.2 s and 1.7 s.
    let nginx = r
        .rows
        .iter()
        .find(|r| r.key == GroupKey::Process(NGINX))
        .unwrap();
    assert_eq!(nginx.name, "nginx");
    assert_eq!(nginx.total, 4);
    assert_eq!(nginx.states[CloseWait as usize], 2);
    assert_eq!(nginx.states[Established as usize], 1);
    assert_eq!(nginx.oldest_close_wait, Some((1500 * MS, false)));
    let curl = r
        .rows
        .iter()
        .find(|r| r.key == GroupKey::Process(CURL))
        .unwrap();
    assert_eq!(curl.total, 4);
    assert_eq!(curl.states[FinWait2 as usize], 2);
    assert!(
        (curl.connects - 2.0).abs() < 1e-9,
        "connects at 1.2 s and 1.7 s over 1 s: {}",
        curl.connects
    );
    assert_eq!(r.leaks.len(), 2);
    assert_eq!(
        (r.leaks[0].pid, r.leaks[0].fd, r.leaks[0].age_ns),
        (Some(NGINX), Some(7), 1500 * MS)
    );
    assert_eq!(
        (r.leaks[1].pid, r.leaks[1].fd, r.leaks[1].age_ns),
        (Some(NGINX), Some(9), SEC)
    );
    // nginx's time in ESTABLISHED: 399 ms and 889 ms for the two that left it; its
    // accepted sockets' SYN_RECV 1 ms each.
    let d = top
        .model
        .detail(ViewKind::Processes, GroupKey::Process(NGINX), None);
    let established = d.states.iter().find(|s| s.0 == Established).unwrap();
    assert_eq!(established.1, 2);
    let syn_recv = d.states.iter().find(|s| s.0 == SynRecv).unwrap();
    assert_eq!(syn_recv.1, 3);
    assert!(
        (990_000..=1_010_000).contains(&syn_recv.2),
        "{}",
        syn_recv.2
    );
}

#[test]
fn the_tracker_s_group_counts_equal_a_walk_of_every_socket() {
    let mut top = sink(160, 48);
    let tracker = run(&mut top, &[]);
    let groups = tracker.group_counts().expect("counted");
    for view in ViewKind::ALL {
        let m = &top.model;
        let counted = m.counted_rows(view, &tracker, groups);
        let walked = m.walked_rows(2 * SEC, view, &tracker);
        let summary = |rows: &std::collections::HashMap<GroupKey, super::model::Row, _>| {
            let mut v: Vec<_> = rows
                .values()
                .map(|r| (r.key, r.states, r.total, r.oldest_close_wait))
                .collect();
            v.sort_by_key(|r| r.0);
            v
        };
        assert_eq!(summary(&counted), summary(&walked), "{view:?}");
        assert!(!counted.is_empty(), "{view:?}");
    }
}

#[test]
fn the_views_group_by_container_and_listener() {
    let mut top = sink(160, 48);
    let tracker = run(&mut top, &[KeyCode::Tab]);
    let rows = &top.model.refresh.rows;
    let nginx = rows
        .iter()
        .find(|r| r.key == GroupKey::Cgroup(NGINX_CGROUP))
        .unwrap();
    assert_eq!(nginx.name, "docker:2a55517bd2c9");
    assert_eq!(nginx.total, 4);
    let curl = rows
        .iter()
        .find(|r| r.key == GroupKey::Cgroup(CURL_CGROUP))
        .unwrap();
    assert_eq!(curl.name, "/user.slice/user-1000.slice");
    let ev = Event::Key(KeyEvent::new(KeyCode::Tab, KeyModifiers::NONE));
    top.key(&ev, &tracker);
    let rows = &top.model.refresh.rows;
    assert_eq!(
        rows.len(),
        1,
        "curl's sockets are not a listener's: {rows:?}"
    );
    assert_eq!(rows[0].key, GroupKey::Listener(NETNS, 80));
    assert_eq!(rows[0].name, ":80");
    assert_eq!(rows[0].states[Listen as usize], 1);
    assert_eq!(rows[0].total, 4);
}

#[test]
fn the_screen_at_160_by_48() {
    let mut top = sink(160, 48);
    run(&mut top, &[]);
    insta::assert_snapshot!(screen(&top));
}

#[test]
fn the_screen_at_80_by_24_sorted_by_close_wait() {
    let mut top = sink(80, 24);
    // From TOTAL right to CLOSE-W: LISTEN SYN-S SYN-R ESTAB FIN-W1 FIN-W2 TIME-W CLOSE-W.
    let mut keys = vec![KeyCode::Right; 8];
    keys.push(KeyCode::Down);
    run(&mut top, &keys);
    insta::assert_snapshot!(screen(&top));
}
