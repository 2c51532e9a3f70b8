//! Per-event cost of the userspace pipeline stages, on one core:
//! decode, the tracker, and formatting `watch` lines.
//!
//! `cargo bench -p tracer --bench pipeline` (or `cargo xtask bench`). The stream is
//! 200 000 client connections of 5 transitions each, 1 000 open at any time, in the order
//! the kernel would report them.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::tz::TimeZone;
use tracer::clock::{TimeFormatter, WallClock};
use tracer::decode::{decode, encode};
use tracer::model::{Comm, Family, Task, TcpState, Transition};
use tracer::sink::Format;
use tracer::sink::watch::WatchPrinter;
use tracer::tracker::Tracker;

const CONNECTIONS: u64 = 200_000;
const OPEN_AT_ONCE: u64 = 1_000;

fn stream() -> Vec<Transition> {
    use TcpState::*;
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
                    sk: 0xffff_8881_0000_0000 + n * 2048,
                    family: Family::Ipv4,
                    saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    sport: if old == Close {
                        0
                    } else {
                        32768 + (n % 28000) as u16
                    },
                    daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    dport: 8080,
                    old,
                    new,
                    task: Task {
                        pid: 4242,
                        tid: 4242,
                        comm: Comm::from_name("churn"),
                    },
                });
            }
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let events = stream();
    let raw: Vec<[u8; tracer_common::EVENT_SIZE]> = events.iter().map(encode).collect();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(10);

    g.bench_function("decode", |b| {
        b.iter(|| {
            for r in &raw {
                black_box(decode(black_box(r)).ok());
            }
        })
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
        })
    });

    for (name, format) in [("watch_text", Format::Text), ("watch_json", Format::Json)] {
        g.bench_function(name, |b| {
            let clock = WallClock::now();
            let mut printer = WatchPrinter::new(
                std::io::sink(),
                format,
                TimeFormatter::new(clock, TimeZone::UTC),
            );
            let mut t = Tracker::default();
            let mut ended = Vec::new();
            let observed: Vec<_> = events.iter().map(|e| t.observe(e, &mut ended)).collect();
            b.iter(|| {
                for (e, o) in events.iter().zip(&observed) {
                    printer.transition(e, o).ok();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
