//! Per-event cost of the userspace pipeline stages, on one core:
//! decode, the tracker (without and with TIME_WAIT tracking), and formatting `watch` lines.
//!
//! `cargo bench -p tracer --bench pipeline` (or `cargo xtask bench`). The stream is
//! 200 000 client connections of 5 transitions each, 1 000 open at any time, in the order
//! the kernel would report them. With TIME_WAIT, each connection adds the timewait
//! socket's arm (just before its FIN_WAIT2 -> CLOSE) and, one window later, its timer's
//! cancel and expiry: 8 events per connection.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::tz::TimeZone;
use tracer::clock::{TimeFormatter, WallClock};
use tracer::decode::{decode, encode};
use tracer::model::{
    Comm, ConnFacts, Family, KernelEvent, SocketId, Task, TcpState, TimerOp, TimewaitEvent,
    Transition, Via,
};
use tracer::sink::Format;
use tracer::sink::watch::WatchPrinter;
use tracer::source::cgroup::CgroupNames;
use tracer::tracker::Tracker;

const CONNECTIONS: u64 = 200_000;
const OPEN_AT_ONCE: u64 = 1_000;

fn task() -> Task {
    Task {
        pid: 4242,
        tid: 4242,
        comm: Comm::from_name("churn"),
    }
}

/// The stream with TIME_WAIT: arms before each FIN_WAIT2 -> CLOSE, and the previous
/// window's timewait sockets expiring (cancel + expire) as the next window closes.
fn stream_with_timewait() -> Vec<KernelEvent> {
    let plain = stream();
    let mut out = Vec::with_capacity(plain.len() * 8 / 5);
    let mut expiring: Vec<TimewaitEvent> = Vec::new();
    for t in plain {
        if t.new == TcpState::Close {
            let arm = TimewaitEvent {
                ts_ns: t.ts_ns - 1,
                op: TimerOp::Arm,
                tw: t.sk + 1024,
                id: SocketId {
                    cookie: t.id.cookie,
                    netns: t.id.netns,
                    family: t.id.family,
                    saddr: t.id.saddr,
                    sport: t.id.sport,
                    daddr: t.id.daddr,
                    dport: t.id.dport,
                },
                substate: TcpState::TimeWait,
                expires: 15_000,
                jiffies: 0,
                cpu: Some(0),
                task: task(),
            };
            out.push(KernelEvent::Timewait(arm));
            out.push(KernelEvent::Transition(t));
            if expiring.len() >= OPEN_AT_ONCE as usize {
                let old = expiring.remove(0);
                for op in [TimerOp::Cancel, TimerOp::Expire] {
                    out.push(KernelEvent::Timewait(TimewaitEvent {
                        ts_ns: t.ts_ns,
                        op,
                        ..old
                    }));
                }
            }
            expiring.push(arm);
        } else {
            out.push(KernelEvent::Transition(t));
        }
    }
    out
}

fn stream() -> Vec<Transition> {
    use TcpState::{Close, Established, FinWait1, FinWait2, SynSent};
    let steps = [
        (Close, SynSent),
        (SynSent, Established),
        (Established, FinWait1),
        (FinWait1, FinWait2),
        (FinWait2, Close),
    ];
    let mut out = Vec::with_capacity((CONNECTIONS * 5) as usize);
    let mut ts = 1_000_000_000u64;
    // Round-robin over a window of open connections: each round advances every open one
    // by a step, so lives interleave as they do on a busy host.
    for window in 0..CONNECTIONS / OPEN_AT_ONCE {
        for (old, new) in steps {
            for i in 0..OPEN_AT_ONCE {
                let n = window * OPEN_AT_ONCE + i;
                ts += 97;
                out.push(Transition {
                    ts_ns: ts,
                    // Addresses are reused from one window to the next, as the slab does;
                    // cookies never are.
                    sk: 0xffff_8881_0000_0000 + i * 2048,
                    id: SocketId {
                        cookie: n + 1,
                        netns: 4_026_531_840,
                        family: Family::Ipv4,
                        saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                        sport: if old == Close {
                            0
                        } else {
                            32768 + (n % 28000) as u16
                        },
                        daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                        dport: 8080,
                    },
                    old,
                    new,
                    task: task(),
                    via: Via::Tracepoint,
                    cpu: Some(0),
                    jiffies: 0,
                    cgroup: 0x1234,
                    facts: (new == Close).then_some(ConnFacts {
                        bytes_acked: 1_000,
                        bytes_received: 10_000,
                        srtt_us: 40,
                        min_rtt_us: Some(30),
                        retrans: 0,
                    }),
                });
            }
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let events = stream();
    let raw: Vec<[u8; tracer_common::EVENT_SIZE]> = events
        .iter()
        .map(|t| encode(&KernelEvent::Transition(*t)))
        .collect();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(10);

    g.bench_function("decode", |b| {
        b.iter(|| {
            for r in &raw {
                black_box(decode(black_box(r)).ok());
            }
        });
    });

    g.bench_function("tracker", |b| {
        let mut ended = Vec::with_capacity(1024);
        b.iter(|| {
            let mut t = Tracker::default();
            for e in &events {
                black_box(t.observe(e, &mut ended));
                ended.clear();
            }
            t.live()
        });
    });

    // The same connections with their timewait sockets: per *connection*, compare with
    // "tracker" by the element counts (5 vs 8 events per connection).
    let with_tw = stream_with_timewait();
    g.throughput(Throughput::Elements(with_tw.len() as u64));
    g.bench_function("tracker_timewait", |b| {
        let mut ended = Vec::with_capacity(1024);
        b.iter(|| {
            let mut t = Tracker::default();
            t.set_hz(250);
            for e in &with_tw {
                match e {
                    KernelEvent::Transition(tr) => {
                        black_box(t.observe(tr, &mut ended));
                    }
                    KernelEvent::Timewait(tw) => t.timewait(tw, &mut ended),
                    KernelEvent::Request(r) => t.request(r),
                }
                t.settle(e.ts_ns(), &mut ended);
                black_box(t.take_derived().count());
                ended.clear();
            }
            t.live()
        });
    });
    g.throughput(Throughput::Elements(events.len() as u64));

    for (name, format) in [("watch_text", Format::Text), ("watch_json", Format::Json)] {
        g.bench_function(name, |b| {
            let clock = WallClock::now();
            let mut printer = WatchPrinter::new(
                std::io::sink(),
                format,
                TimeFormatter::new(clock, TimeZone::UTC),
                CgroupNames::known([(0x1234, "/system.slice/nginx.service")]),
            );
            let mut t = Tracker::default();
            let mut ended = Vec::new();
            let observed: Vec<_> = events.iter().map(|e| t.observe(e, &mut ended)).collect();
            b.iter(|| {
                for (e, o) in events.iter().zip(&observed) {
                    printer.transition(e, o).ok();
                }
            });
        });
    }
    g.finish();
}

/// Sockets `top` tracks in its frame benchmark.
const TOP_SOCKETS: u64 = 100_000;

/// One `top` frame (a refresh: sockets per state and per group recounted from the
/// tracker, rates, the rows of the view; then the screen drawn into a 160x48 buffer) with
/// 100 000 sockets tracked: 500 processes in 50 cgroups, each connection established,
/// every tenth in CLOSE_WAIT. The bound is 5 ms a frame.
fn top_frame(c: &mut Criterion) {
    use TcpState::{Close, CloseWait, Established, SynSent};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use tracer::pipeline::Totals;
    use tracer::sink::View;
    use tracer::sink::top::TopSink;
    use tracer::sink::top::model::TopModel;
    use tracer::source::kernel::KernelFilter;

    let mut tracker = Tracker::new(2 * TOP_SOCKETS as usize);
    tracker.count_groups();
    let names: Vec<(u64, String)> = (0..50)
        .map(|i| (0x1000 + i, format!("/system.slice/docker-{i:064x}.scope")))
        .collect();
    let model = TopModel::new(
        KernelFilter::default(),
        CgroupNames::known(names.iter().map(|(id, p)| (*id, p.as_str()))),
    );
    let terminal = Terminal::new(TestBackend::new(160, 48)).expect("test terminal");
    let clock = WallClock::now();
    let mut top = TopSink::new(
        model,
        terminal,
        None,
        TimeFormatter::new(clock, TimeZone::UTC),
    );
    let mut ended = Vec::new();
    let mut ts = 1_000_000_000u64;
    for n in 0..TOP_SOCKETS {
        let pid = 1000 + (n % 500) as u32;
        let mut steps = vec![(Close, SynSent), (SynSent, Established)];
        if n % 10 == 0 {
            steps.push((Established, CloseWait));
        }
        for (old, new) in steps {
            ts += 1_000;
            let t = Transition {
                ts_ns: ts,
                sk: 0xffff_8881_0000_0000 + n * 2048,
                id: SocketId {
                    cookie: n + 1,
                    netns: 4_026_531_840,
                    family: Family::Ipv4,
                    saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    sport: 1024 + (n % 60_000) as u16,
                    daddr: IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)),
                    dport: 443,
                },
                old,
                new,
                task: Task {
                    pid,
                    tid: pid,
                    comm: Comm::from_name(&format!("app{pid}")),
                },
                via: Via::Tracepoint,
                cpu: Some(0),
                jiffies: 0,
                cgroup: 0x1000 + u64::from(pid % 50),
                facts: None,
            };
            let o = tracker.observe(&t, &mut ended);
            tracer::sink::Sink::transition(&mut top, &t, &o).ok();
        }
    }
    assert_eq!(tracker.live(), TOP_SOCKETS as usize);
    let totals = Totals::default();
    let view = View {
        totals: &totals,
        tracker: &tracker,
        holders: None,
    };
    let mut g = c.benchmark_group("top");
    g.sample_size(20);
    g.bench_function("frame_100k_sockets", |b| {
        b.iter(|| {
            ts += 1_000_000_000;
            top.refresh(ts, &view).ok();
        });
    });
    g.finish();
}

criterion_group!(benches, bench, top_frame);
criterion_main!(benches);
