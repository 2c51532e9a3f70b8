//! Prometheus/OpenMetrics exposition (prometheus-client) of what the tracker knows, and a
//! small HTTP server for it on a thread of its own, so a scrape never stalls event
//! processing.
//!
//! Per event only cached counter and histogram handles are touched (atomics). Gauges are
//! refreshed from the tracker at most once a second, and the CLOSE_WAIT holders (sock_diag
//! plus /proc, as `leaks` does it) at most every 5 s.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Sink;
use super::leaks::leaks;
use crate::app::Totals;
use crate::clock::monotonic_now_ns;
use crate::model::{TcpState, Transition};
use crate::source::SocketSnapshot;
use crate::source::kernel::Lost;
use crate::tracker::{End, Observed, Role, SocketLife, Tracker};

/// `tcplens_close_wait_sockets{comm}` keeps the processes with the most sockets; the rest
/// are summed into `comm="other"`.
pub const TOP_COMMS: usize = 10;
const GAUGE_EVERY: Duration = Duration::from_secs(1);
const HOLDERS_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    old: &'static str,
    new: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommLabels {
    comm: String,
}

/// Durations from 10 µs to about 3 hours, in seconds.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 4.0, 16))
}

/// The metrics, registered.
pub struct Metrics {
    pub registry: Registry,
    transitions: Family<TransitionLabels, Counter>,
    sockets: Family<StateLabels, Gauge>,
    state_duration: Family<StateLabels, Histogram, fn() -> Histogram>,
    connect: Histogram,
    accept: Histogram,
    lifetime: Histogram,
    close_wait: Family<CommLabels, Gauge>,
    close_wait_oldest: Family<CommLabels, Gauge<f64, AtomicU64>>,
    lost: Family<ReasonLabels, Counter>,
    unseen: Family<CauseLabels, Counter>,
    tracked: Gauge,
    evictions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::with_prefix("tcplens"),
            transitions: Family::default(),
            sockets: Family::default(),
            state_duration: Family::new_with_constructor(duration_histogram),
            connect: duration_histogram(),
            accept: duration_histogram(),
            lifetime: duration_histogram(),
            close_wait: Family::default(),
            close_wait_oldest: Family::default(),
            lost: Family::default(),
            unseen: Family::default(),
            tracked: Gauge::default(),
            evictions: Counter::default(),
        };
        let mut r = m.registry;
        r.register(
            "transitions",
            "TCP state transitions",
            m.transitions.clone(),
        );
        r.register("sockets", "Live sockets per state", m.sockets.clone());
        r.register(
            "state_duration_seconds",
            "Time spent in a state, per state left",
            m.state_duration.clone(),
        );
        r.register(
            "connect_duration_seconds",
            "Connect handshake (SYN_SENT to ESTABLISHED)",
            m.connect.clone(),
        );
        r.register(
            "accept_duration_seconds",
            "Accept handshake (SYN_RECV to ESTABLISHED)",
            m.accept.clone(),
        );
        r.register(
            "connection_lifetime_seconds",
            "Lifetime of connections seen whole",
            m.lifetime.clone(),
        );
        r.register(
            "close_wait_sockets",
            "Sockets in CLOSE_WAIT per holding process (top processes, the rest as other)",
            m.close_wait.clone(),
        );
        r.register(
            "close_wait_oldest_seconds",
            "Age of the oldest CLOSE_WAIT socket per holding process",
            m.close_wait_oldest.clone(),
        );
        r.register(
            "events_lost",
            "Events the kernel lost: ring buffer full, or a program run skipped (recursion)",
            m.lost.clone(),
        );
        r.register(
            "ended_unseen",
            "Sockets whose end the kernel did not show: their address was reused, or sock_diag no longer lists them",
            m.unseen.clone(),
        );
        r.register(
            "tracked_sockets",
            "Sockets the tracker holds",
            m.tracked.clone(),
        );
        r.register(
            "evictions",
            "Sockets evicted at the tracker's cap",
            m.evictions.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The exposition, OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `comm -> (count, oldest_ns)` capped at `top` entries; the rest summed into `other`.
pub fn top_comms(mut by_comm: Vec<(String, u64, u64)>, top: usize) -> Vec<(String, u64, u64)> {
    by_comm.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    if by_comm.len() <= top {
        return by_comm;
    }
    let rest = by_comm.split_off(top);
    let other = rest
        .into_iter()
        .fold(("other".to_string(), 0, 0), |(n, c, o), (_, c2, o2)| {
            (n, c + c2, o.max(o2))
        });
    by_comm.push(other);
    by_comm
}

/// Feeds [`Metrics`] from the pipeline.
pub struct MetricsSink<S: SocketSnapshot> {
    metrics: Arc<Metrics>,
    snapshot: S,
    start_ns: u64,
    transitions: HashMap<(TcpState, TcpState), Counter>,
    durations: HashMap<TcpState, Histogram>,
    last_gauges: Option<Instant>,
    last_holders: Option<Instant>,
    reported_lost: Lost,
    reported_unseen: (u64, u64),
    reported_evicted: u64,
}

impl<S: SocketSnapshot> MetricsSink<S> {
    pub fn new(metrics: Arc<Metrics>, snapshot: S, start_ns: u64) -> Self {
        MetricsSink {
            metrics,
            snapshot,
            start_ns,
            transitions: HashMap::new(),
            durations: HashMap::new(),
            last_gauges: None,
            last_holders: None,
            reported_lost: Lost::default(),
            reported_unseen: (0, 0),
            reported_evicted: 0,
        }
    }

    fn gauges(&mut self, totals: &Totals, tracker: &Tracker) {
        let m = &self.metrics;
        for (n, count) in tracker.state_counts().iter().enumerate() {
            if let Some(state) = TcpState::from_kernel(n as u8) {
                m.sockets
                    .get_or_create(&StateLabels {
                        state: state.name(),
                    })
                    .set(*count as i64);
            }
        }
        m.tracked.set(tracker.live() as i64);
        let (was, now) = (self.reported_lost, totals.lost);
        for (reason, before, after) in [
            ("ring_full", was.ring_full, now.ring_full),
            ("recursion", was.recursion, now.recursion),
        ] {
            m.lost
                .get_or_create(&ReasonLabels { reason })
                .inc_by(after.saturating_sub(before));
        }
        self.reported_lost = Lost {
            ring_full: was.ring_full.max(now.ring_full),
            recursion: was.recursion.max(now.recursion),
        };
        let stats = tracker.stats();
        for (cause, before, after) in [
            ("reused", self.reported_unseen.0, stats.unseen_reused),
            ("gone", self.reported_unseen.1, stats.unseen_gone),
        ] {
            m.unseen
                .get_or_create(&CauseLabels { cause })
                .inc_by(after.saturating_sub(before));
        }
        self.reported_unseen = (stats.unseen_reused, stats.unseen_gone);
        let evicted = tracker.stats().evicted;
        m.evictions
            .inc_by(evicted.saturating_sub(self.reported_evicted));
        self.reported_evicted = self.reported_evicted.max(evicted);
    }

    fn holders(&mut self, tracker: &Tracker) -> io::Result<()> {
        let found = self
            .snapshot
            .sockets(TcpState::CloseWait)
            .map_err(io::Error::other)?;
        let list = leaks(
            found,
            tracker,
            TcpState::CloseWait,
            monotonic_now_ns(),
            self.start_ns,
            0,
        );
        let mut by_comm: HashMap<String, (u64, u64)> = HashMap::new();
        for l in &list {
            let comm = l
                .holder
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |h| h.comm.clone());
            let e = by_comm.entry(comm).or_default();
            e.0 += 1;
            e.1 = e.1.max(l.age_ns);
        }
        let capped = top_comms(
            by_comm.into_iter().map(|(c, (n, o))| (c, n, o)).collect(),
            TOP_COMMS,
        );
        let m = &self.metrics;
        m.close_wait.clear();
        m.close_wait_oldest.clear();
        for (comm, count, oldest) in capped {
            let labels = CommLabels { comm };
            m.close_wait.get_or_create(&labels).set(count as i64);
            m.close_wait_oldest
                .get_or_create(&labels)
                .set(oldest as f64 / 1e9);
        }
        Ok(())
    }

    fn refresh(&mut self, totals: &Totals, tracker: &Tracker, force: bool) -> io::Result<()> {
        let due = |last: Option<Instant>, every| force || last.is_none_or(|t| t.elapsed() >= every);
        if due(self.last_gauges, GAUGE_EVERY) {
            self.gauges(totals, tracker);
            self.last_gauges = Some(Instant::now());
        }
        if due(self.last_holders, HOLDERS_EVERY) {
            self.last_holders = Some(Instant::now());
            if let Err(e) = self.holders(tracker) {
                log::warn!("CLOSE_WAIT holders for the metrics: {e}");
            }
        }
        Ok(())
    }
}

impl<S: SocketSnapshot> Sink for MetricsSink<S> {
    fn transition(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        let m = &self.metrics;
        self.transitions
            .entry((t.old, t.new))
            .or_insert_with(|| {
                m.transitions.get_or_create_owned(&TransitionLabels {
                    old: t.old.name(),
                    new: t.new.name(),
                })
            })
            .inc();
        if let Some(ns) = o.old_ns {
            let secs = ns as f64 / 1e9;
            self.durations
                .entry(t.old)
                .or_insert_with(|| {
                    m.state_duration.get_or_create_owned(&StateLabels {
                        state: t.old.name(),
                    })
                })
                .observe(secs);
            match (t.old, t.new) {
                (TcpState::SynSent, TcpState::Established) => m.connect.observe(secs),
                (TcpState::SynRecv, TcpState::Established) => m.accept.observe(secs),
                _ => {}
            }
        }
        Ok(())
    }

    fn life_ended(&mut self, life: &SocketLife) -> io::Result<()> {
        if !matches!(life.end, End::StillOpen | End::Evicted)
            && life.role != Role::Listener
            && let Some(ns) = life.lifetime_ns
        {
            self.metrics.lifetime.observe(ns as f64 / 1e9);
        }
        Ok(())
    }

    fn batch_done(&mut self, totals: &Totals, tracker: &Tracker) -> io::Result<()> {
        self.refresh(totals, tracker, false)
    }

    fn interval(&mut self, _now: u64, totals: &Totals, tracker: &Tracker) -> io::Result<()> {
        self.refresh(totals, tracker, false)
    }

    fn finish(&mut self, _now: u64, totals: &Totals, tracker: &Tracker) -> io::Result<()> {
        self.refresh(totals, tracker, true)
    }
}

/// Serves `GET /metrics` (any path) on `addr` from a thread of its own. Returns once the
/// socket is bound; the thread lives as long as the process.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        log::warn!(
            "serving metrics on {bound} without authentication: anyone who can reach it can read them"
        );
    }
    std::thread::Builder::new()
        .name("tcplens-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::warn!("metrics server: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    log::warn!("metrics server: cannot register the listening socket");
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |_req| {
                            let body = metrics.encode();
                            async move {
                                hyper::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::procs::Holder;
    use crate::source::sockdiag::{DiagError, DiagSocket};
    use crate::tracker::tests::tr;
    use TcpState::*;

    struct Fake(Vec<(DiagSocket, Option<Holder>)>);

    impl SocketSnapshot for Fake {
        fn sockets(&mut self, _: TcpState) -> Result<Vec<(DiagSocket, Option<Holder>)>, DiagError> {
            Ok(self.0.clone())
        }
    }

    fn cw(sport: u16, comm: &str) -> (DiagSocket, Option<Holder>) {
        (
            DiagSocket {
                family: crate::model::Family::Ipv4,
                state: CloseWait,
                saddr: "127.0.0.1".parse().unwrap(),
                sport,
                daddr: "127.0.0.1".parse().unwrap(),
                dport: 9,
                inode: u64::from(sport),
                uid: 0,
                netns: 1,
                cookie: u64::from(sport),
                tw_expires_ms: None,
            },
            Some(Holder {
                pid: 1,
                fd: 3,
                comm: comm.into(),
                cmdline: String::new(),
            }),
        )
    }

    #[test]
    fn exposition_is_openmetrics_with_the_expected_families() {
        let metrics = Arc::new(Metrics::new());
        let mut holders = vec![cw(1, "a"), cw(2, "a"), cw(3, "b")];
        // 12 more processes with one socket each: 14 in all, the 4 beyond the top 10 sum
        // into `other`.
        holders.extend((0..12).map(|i| cw(100 + i, &format!("p{i:02}"))));
        let mut sink = MetricsSink::new(metrics.clone(), Fake(holders), 0);
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        for e in [
            tr(1, 0, Close, SynSent, 1),
            tr(1, 2_000_000, SynSent, Established, 1),
            tr(1, 1_002_000_000, Established, FinWait1, 1),
            tr(1, 1_002_100_000, FinWait1, FinWait2, 1),
            tr(1, 1_002_200_000, FinWait2, Close, 1),
            tr(2, 0, Close, SynSent, 1),
        ] {
            let o = t.observe(&e, &mut ended);
            sink.transition(&e, &o).unwrap();
            for l in ended.drain(..) {
                sink.life_ended(&l).unwrap();
            }
        }
        sink.finish(
            0,
            &Totals {
                events: 6,
                timewait: 0,
                lost: Lost {
                    ring_full: 3,
                    recursion: 2,
                },
                bad: 0,
            },
            &t,
        )
        .unwrap();
        let text = metrics.encode();
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("not OpenMetrics ({e:?}):\n{text}"));
        let names: Vec<&str> = parsed.families.keys().map(String::as_str).collect();
        for want in [
            "tcplens_transitions",
            "tcplens_sockets",
            "tcplens_state_duration_seconds",
            "tcplens_connect_duration_seconds",
            "tcplens_accept_duration_seconds",
            "tcplens_connection_lifetime_seconds",
            "tcplens_close_wait_sockets",
            "tcplens_close_wait_oldest_seconds",
            "tcplens_events_lost",
            "tcplens_ended_unseen",
            "tcplens_tracked_sockets",
            "tcplens_evictions",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            text.contains("tcplens_transitions_total{old=\"SYN_SENT\",new=\"ESTABLISHED\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_events_lost_total{reason=\"ring_full\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_events_lost_total{reason=\"recursion\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_ended_unseen_total{cause=\"gone\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_sockets{state=\"SYN_SENT\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_connect_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_connection_lifetime_seconds_count 1"),
            "{text}"
        );
        // ESTABLISHED lasted 1 s: in the (0.65536, 2.62144] bucket.
        assert!(
            text.contains(
                "tcplens_state_duration_seconds_bucket{le=\"0.65536\",state=\"ESTABLISHED\"} 0"
            ) || text.contains(
                "tcplens_state_duration_seconds_bucket{state=\"ESTABLISHED\",le=\"0.65536\"} 0"
            ),
            "{text}"
        );
        // Label cardinality: 10 processes + other.
        let comms = text
            .lines()
            .filter(|l| l.starts_with("tcplens_close_wait_sockets{"))
            .count();
        assert_eq!(comms, TOP_COMMS + 1, "{text}");
        assert!(
            text.contains("tcplens_close_wait_sockets{comm=\"a\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tcplens_close_wait_sockets{comm=\"other\"} 4"),
            "{text}"
        );
    }

    #[test]
    fn top_comms_caps_and_sums_the_rest() {
        let v = (0..5)
            .map(|i| (format!("c{i}"), 5 - i as u64, i as u64))
            .collect();
        let capped = top_comms(v, 2);
        assert_eq!(
            capped,
            [
                ("c0".into(), 5, 0),
                ("c1".into(), 4, 1),
                ("other".into(), 3 + 2 + 1, 4)
            ]
        );
    }
}
