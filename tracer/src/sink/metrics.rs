//! Prometheus/OpenMetrics exposition (prometheus-client) of what the tracker knows, and a
//! small HTTP server for it on a thread of its own, so a scrape never stalls event
//! processing.
//!
//! Per event only cached counter and histogram handles are touched (atomics). Gauges are
//! refreshed from the tracker at most once a second, and the CLOSE_WAIT holders whenever
//! the host thread lists them (every few seconds: sock_diag plus /proc, as for `leaks`).
//!
//! Per container (the container a socket's cgroup names), with bounded cardinality: live
//! sockets per state for the [`TOP_CONTAINERS`] containers with the most (the rest as
//! `other`), and counters of the connections that ended, their bytes and retransmits, for
//! up to [`TOP_CONTAINERS`] containers at once (a container gets its series when first
//! seen while a slot is free, the rest count as `other`; a container with nothing live for
//! [`CONTAINER_IDLE`] gives its series and slot up). Sockets outside containers are
//! `container="none"`.

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

use super::leaks::leaks;
use super::{HolderWant, Sink, View};
use crate::model::{TcpState, Transition};
use crate::pipeline::Totals;
use crate::source::cgroup::{CgroupNames, Container};
use crate::source::host::Holders;
use crate::source::kernel::{KernelFilter, Lost};
use crate::source::netstat::NetnsCounters;
use crate::tracker::{End, ListenerRequests, Observed, Role, SocketLife, Tracker};

/// `tcplens_close_wait_sockets{pid,comm}` keeps the processes with the most sockets; the
/// rest are summed into `comm="other"`.
pub const TOP_HOLDERS: usize = 10;
/// Containers with series of their own at once (the rest share `other`).
pub const TOP_CONTAINERS: usize = 20;
/// A container with no live socket this long frees its series.
pub const CONTAINER_IDLE: Duration = Duration::from_mins(10);
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// The listeners exported one by one (by namespace and port); a host with more keeps the
/// first ones.
pub const TOP_LISTENERS: usize = 100;

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
struct EndLabels {
    end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    netns: u32,
    /// `127.0.0.1:8080`, `[::]:443`.
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetnsLabels {
    netns: u32,
}

/// A container, as its cgroup path names it: `container` is the short id (12 digits, as
/// `docker ps` shows it), `none` outside containers, `other` past the cap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
    runtime: &'static str,
    pod_uid: String,
}

impl ContainerLabels {
    fn of(c: Option<&Container>) -> Self {
        match c {
            Some(c) => ContainerLabels {
                container: c.id[..c.id.len().min(12)].to_string(),
                runtime: c.runtime.name(),
                pod_uid: c.pod_uid.clone().unwrap_or_default(),
            },
            None => Self::named("none"),
        }
    }

    fn named(name: &str) -> Self {
        ContainerLabels {
            container: name.to_string(),
            runtime: "",
            pod_uid: String::new(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerStateLabels {
    #[prometheus(flatten)]
    container: ContainerLabels,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    /// The host pid; "unknown" when no process holds the sockets, "other" past the top.
    pid: String,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OldestLabels {
    #[prometheus(flatten)]
    holder: HolderLabels,
    /// "true": the socket was in CLOSE_WAIT before tracing began; its age is at least this.
    lower_bound: &'static str,
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
    rtt: Histogram,
    close_wait: Family<HolderLabels, Gauge>,
    close_wait_oldest: Family<OldestLabels, Gauge<f64, AtomicU64>>,
    lost: Family<ReasonLabels, Counter>,
    unseen: Family<CauseLabels, Counter>,
    tracked: Gauge,
    evictions: Counter,
    requests: Family<EndLabels, Counter>,
    syns: Counter,
    synack_retrans: Counter,
    listen_syn_queue: Family<ListenerLabels, Gauge>,
    listen_accept_queue: Family<ListenerLabels, Gauge>,
    listen_backlog: Family<ListenerLabels, Gauge>,
    listen_drops: Family<ListenerLabels, Gauge>,
    listen_overflows: Family<NetnsLabels, Counter>,
    listen_netns_drops: Family<NetnsLabels, Counter>,
    syncookies_sent: Family<NetnsLabels, Counter>,
    container_sockets: Family<ContainerStateLabels, Gauge>,
    container_connections: Family<ContainerLabels, Counter>,
    container_bytes_acked: Family<ContainerLabels, Counter>,
    container_bytes_received: Family<ContainerLabels, Counter>,
    container_retransmits: Family<ContainerLabels, Counter>,
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
            rtt: duration_histogram(),
            close_wait: Family::default(),
            close_wait_oldest: Family::default(),
            lost: Family::default(),
            unseen: Family::default(),
            tracked: Gauge::default(),
            evictions: Counter::default(),
            requests: Family::default(),
            syns: Counter::default(),
            synack_retrans: Counter::default(),
            listen_syn_queue: Family::default(),
            listen_accept_queue: Family::default(),
            listen_backlog: Family::default(),
            listen_drops: Family::default(),
            listen_overflows: Family::default(),
            listen_netns_drops: Family::default(),
            syncookies_sent: Family::default(),
            container_sockets: Family::default(),
            container_connections: Family::default(),
            container_bytes_acked: Family::default(),
            container_bytes_received: Family::default(),
            container_retransmits: Family::default(),
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
            "Accept handshake on the server (SYN queued to ESTABLISHED), when the request was seen",
            m.accept.clone(),
        );
        r.register(
            "connection_lifetime_seconds",
            "Lifetime of connections seen whole",
            m.lifetime.clone(),
        );
        r.register(
            "connection_rtt_seconds",
            "Smoothed RTT of connections at their end",
            m.rtt.clone(),
        );
        r.register(
            "close_wait_sockets",
            "Sockets in CLOSE_WAIT per holding process (the top 10, the rest as other)",
            m.close_wait.clone(),
        );
        r.register(
            "close_wait_oldest_seconds",
            "Age of the oldest CLOSE_WAIT socket per holding process (lower_bound: it was there before tracing began)",
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
            "listen_syns",
            "SYNs queued at listeners (request sockets made)",
            m.syns.clone(),
        );
        r.register(
            "listen_requests",
            "Request sockets ended, by how: completed (the child was made), expired (SYN-ACK retries ran out), aborted (RST, or the listener closed)",
            m.requests.clone(),
        );
        r.register(
            "listen_synack_retransmits",
            "SYN-ACKs retransmitted for request sockets",
            m.synack_retrans.clone(),
        );
        r.register(
            "listen_syn_queue",
            "Request sockets waiting at a listener (the SYN queue as tcplens followed it)",
            m.listen_syn_queue.clone(),
        );
        r.register(
            "listen_accept_queue",
            "Children waiting for accept() at a listener (ss -lnt Recv-Q)",
            m.listen_accept_queue.clone(),
        );
        r.register(
            "listen_backlog",
            "A listener's accept queue limit (ss -lnt Send-Q)",
            m.listen_backlog.clone(),
        );
        r.register(
            "listen_drops",
            "Segments a listener dropped since it was made (its sk_drops: accept-queue overflows among them)",
            m.listen_drops.clone(),
        );
        r.register(
            "listen_overflows",
            "A namespace's accept-queue overflows (TcpExtListenOverflows)",
            m.listen_overflows.clone(),
        );
        r.register(
            "listen_netns_drops",
            "A namespace's listen drops (TcpExtListenDrops)",
            m.listen_netns_drops.clone(),
        );
        r.register(
            "listen_syncookies_sent",
            "A namespace's SYN-ACKs sent with a cookie instead of a request socket (TcpExtSyncookiesSent)",
            m.syncookies_sent.clone(),
        );
        r.register(
            "container_sockets",
            "Live sockets per state of the containers with the most (the top 20, the rest as other; none: outside containers)",
            m.container_sockets.clone(),
        );
        r.register(
            "container_connections",
            "Connections that ended, per container (up to 20 at once, the rest as other)",
            m.container_connections.clone(),
        );
        r.register(
            "container_bytes_acked",
            "Bytes the peers acked of connections that ended, per container (sequence space: SYN and FIN count 1)",
            m.container_bytes_acked.clone(),
        );
        r.register(
            "container_bytes_received",
            "Bytes received by connections that ended, per container (sequence space: the peer's FIN counts 1)",
            m.container_bytes_received.clone(),
        );
        r.register(
            "container_retransmits",
            "Segments retransmitted by connections that ended, per container",
            m.container_retransmits.clone(),
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

/// CLOSE_WAIT sockets of one holding process (`pid` `None`: no process holds them, or
/// "other" once capped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBy {
    pub pid: Option<u32>,
    pub comm: String,
    pub count: u64,
    pub oldest_ns: u64,
    /// The oldest was already in CLOSE_WAIT when tracing began: its age is a lower bound.
    pub at_least: bool,
}

/// The `top` processes with the most sockets (then the oldest); the rest summed into one
/// `comm="other"` entry.
pub fn top_holders(mut held: Vec<HeldBy>, top: usize) -> Vec<HeldBy> {
    held.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.oldest_ns.cmp(&a.oldest_ns))
            .then(a.pid.cmp(&b.pid))
            .then(a.comm.cmp(&b.comm))
    });
    if held.len() <= top {
        return held;
    }
    let rest = held.split_off(top);
    let mut other = HeldBy {
        pid: None,
        comm: "other".into(),
        count: 0,
        oldest_ns: 0,
        at_least: false,
    };
    for h in rest {
        other.count += h.count;
        if h.oldest_ns > other.oldest_ns {
            (other.oldest_ns, other.at_least) = (h.oldest_ns, h.at_least);
        }
    }
    held.push(other);
    held
}

/// Feeds [`Metrics`] from the pipeline.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
    /// The command's filters, applied to the holders' listing too.
    filter: KernelFilter,
    start_ns: u64,
    transitions: HashMap<(TcpState, TcpState), Counter>,
    durations: HashMap<TcpState, Histogram>,
    last_gauges: Option<Instant>,
    reported_lost: Lost,
    reported_unseen: (u64, u64),
    reported_evicted: u64,
    /// The request totals, and each namespace's listen counters, last exported.
    reported_requests: ListenerRequests,
    reported_netns: HashMap<u32, NetnsCounters>,
    names: CgroupNames,
    /// Containers holding series of the ended-connection counters: when each last had a
    /// live socket.
    slots: HashMap<ContainerLabels, Instant>,
}

impl MetricsSink {
    /// `start_ns`: kernel monotonic time tracing began (the age floor of CLOSE_WAIT sockets
    /// that were there before).
    pub fn new(metrics: Arc<Metrics>, filter: KernelFilter, start_ns: u64) -> Self {
        MetricsSink {
            metrics,
            filter,
            start_ns,
            transitions: HashMap::new(),
            durations: HashMap::new(),
            last_gauges: None,
            reported_lost: Lost::default(),
            reported_unseen: (0, 0),
            reported_evicted: 0,
            reported_requests: ListenerRequests::default(),
            reported_netns: HashMap::new(),
            names: CgroupNames::none(),
            slots: HashMap::new(),
        }
    }

    /// How cgroup ids are named (the host's cgroups live; none on replay, where every
    /// socket counts as `unknown`).
    #[must_use]
    pub fn with_names(mut self, names: CgroupNames) -> Self {
        self.names = names;
        self
    }

    /// The container labels of a socket of cgroup `id` (`unknown` when the cgroup cannot be
    /// named).
    fn container(&mut self, id: u64) -> ContainerLabels {
        match self.names.get(id) {
            Some(n) => ContainerLabels::of(n.container.as_ref()),
            None => ContainerLabels::named("unknown"),
        }
    }

    /// The series a container's counters go to: its own while it holds a slot (or gets a
    /// free one), `other` otherwise.
    fn slot(&mut self, labels: ContainerLabels) -> ContainerLabels {
        if let Some(seen) = self.slots.get_mut(&labels) {
            *seen = Instant::now();
            return labels;
        }
        if self.slots.len() < TOP_CONTAINERS {
            self.slots.insert(labels.clone(), Instant::now());
            return labels;
        }
        ContainerLabels::named("other")
    }

    /// The per-container gauges from the tracker: the containers with the most live
    /// sockets; slots of containers idle for [`CONTAINER_IDLE`] are freed.
    fn containers(&mut self, tracker: &Tracker) {
        let mut live: HashMap<u64, [i64; 13]> = HashMap::new();
        for life in tracker.sockets() {
            if let Some(state) = life.state() {
                live.entry(life.cgroup).or_insert([0; 13])[state as usize] += 1;
            }
        }
        let mut by_container: HashMap<ContainerLabels, [i64; 13]> = HashMap::new();
        for (id, counts) in live {
            let labels = self.container(id);
            let sum = by_container.entry(labels).or_insert([0; 13]);
            for (s, n) in sum.iter_mut().zip(counts) {
                *s += n;
            }
        }
        let now = Instant::now();
        for labels in by_container.keys() {
            if let Some(seen) = self.slots.get_mut(labels) {
                *seen = now;
            }
        }
        let m = &self.metrics;
        self.slots.retain(|labels, seen| {
            let keep = now.duration_since(*seen) < CONTAINER_IDLE;
            if !keep {
                for family in [
                    &m.container_connections,
                    &m.container_bytes_acked,
                    &m.container_bytes_received,
                    &m.container_retransmits,
                ] {
                    family.remove(labels);
                }
            }
            keep
        });
        let mut ranked: Vec<(ContainerLabels, [i64; 13])> = by_container.into_iter().collect();
        ranked.sort_by(|a, b| {
            let total = |c: &[i64; 13]| c.iter().sum::<i64>();
            total(&b.1)
                .cmp(&total(&a.1))
                .then_with(|| a.0.container.cmp(&b.0.container))
        });
        if ranked.len() > TOP_CONTAINERS {
            let rest = ranked.split_off(TOP_CONTAINERS);
            let mut other = [0i64; 13];
            for (_, counts) in rest {
                for (s, n) in other.iter_mut().zip(counts) {
                    *s += n;
                }
            }
            ranked.push((ContainerLabels::named("other"), other));
        }
        m.container_sockets.clear();
        for (labels, counts) in ranked {
            for (n, &count) in counts.iter().enumerate() {
                if let Some(state) = TcpState::from_kernel(n as u8)
                    && count > 0
                {
                    m.container_sockets
                        .get_or_create(&ContainerStateLabels {
                            container: labels.clone(),
                            state: state.name(),
                        })
                        .set(count);
                }
            }
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
        let (was, now) = (self.reported_requests, *tracker.requests().total());
        m.syns.inc_by(now.syns - was.syns);
        m.synack_retrans
            .inc_by(now.synack_retrans - was.synack_retrans);
        for (end, before, after) in [
            ("completed", was.completed, now.completed),
            ("expired", was.expired, now.expired),
            ("aborted", was.aborted, now.aborted),
        ] {
            m.requests
                .get_or_create(&EndLabels { end })
                .inc_by(after - before);
        }
        self.reported_requests = now;
        let evicted = tracker.stats().evicted;
        m.evictions
            .inc_by(evicted.saturating_sub(self.reported_evicted));
        self.reported_evicted = self.reported_evicted.max(evicted);
    }

    /// The CLOSE_WAIT gauges from the host's listing, per holding process.
    fn close_wait(&mut self, now_ns: u64, holders: &Holders, tracker: &Tracker) {
        let found = holders
            .sockets
            .iter()
            .filter(|(s, _)| {
                s.state == TcpState::CloseWait
                    && self.filter.keeps_listed(&s.id, s.cgroup, &mut self.names)
            })
            .cloned()
            .collect();
        let now_ns = now_ns.max(holders.at_ns);
        let list = leaks(
            found,
            tracker,
            TcpState::CloseWait,
            now_ns,
            self.start_ns,
            0,
        );
        let mut by_pid: HashMap<Option<u32>, HeldBy> = HashMap::new();
        for l in &list {
            let pid = l.holder.as_ref().map(|h| h.pid);
            let e = by_pid.entry(pid).or_insert_with(|| HeldBy {
                pid,
                comm: l
                    .holder
                    .as_ref()
                    .map_or_else(|| "unknown".to_string(), |h| h.comm.clone()),
                count: 0,
                oldest_ns: 0,
                at_least: false,
            });
            e.count += 1;
            if l.age_ns >= e.oldest_ns {
                (e.oldest_ns, e.at_least) = (l.age_ns, l.age_at_least);
            }
        }
        let capped = top_holders(by_pid.into_values().collect(), TOP_HOLDERS);
        let m = &self.metrics;
        m.close_wait.clear();
        m.close_wait_oldest.clear();
        for h in capped {
            let labels = HolderLabels {
                pid: match (h.pid, h.comm.as_str()) {
                    (Some(pid), _) => pid.to_string(),
                    (None, "other") => "other".into(),
                    (None, _) => "unknown".into(),
                },
                comm: h.comm,
            };
            m.close_wait.get_or_create(&labels).set(h.count as i64);
            m.close_wait_oldest
                .get_or_create(&OldestLabels {
                    lower_bound: if h.at_least { "true" } else { "false" },
                    holder: labels,
                })
                .set(h.oldest_ns as f64 / 1e9);
        }
    }

    /// The listen gauges from the host's listing (the first [`TOP_LISTENERS`] listeners by
    /// namespace and port), and the namespaces' listen counters.
    fn listen(&mut self, holders: &Holders, tracker: &Tracker) {
        let m = &self.metrics;
        for family in [
            &m.listen_syn_queue,
            &m.listen_accept_queue,
            &m.listen_backlog,
            &m.listen_drops,
        ] {
            family.clear();
        }
        let mut listeners: Vec<_> = holders
            .listeners
            .iter()
            .filter(|l| {
                self.filter
                    .keeps_listed_listener(&l.id, l.cgroup, &mut self.names)
            })
            .collect();
        listeners.sort_by_key(|l| (l.id.netns, l.id.sport, l.id.saddr));
        let queued = tracker.requests().listeners();
        for l in listeners.into_iter().take(TOP_LISTENERS) {
            let labels = ListenerLabels {
                netns: l.id.netns,
                listener: SocketAddr::new(l.id.saddr, l.id.sport).to_string(),
            };
            let waiting = queued.get(&l.id.cookie).map_or(0, |r| r.queued);
            m.listen_syn_queue
                .get_or_create(&labels)
                .set(i64::from(waiting));
            m.listen_accept_queue
                .get_or_create(&labels)
                .set(i64::from(l.accept_queue));
            m.listen_backlog
                .get_or_create(&labels)
                .set(i64::from(l.backlog));
            m.listen_drops
                .get_or_create(&labels)
                .set(i64::from(l.drops));
        }
        for c in &holders.counters {
            if self.filter.netns.is_some_and(|n| n != c.netns) {
                continue;
            }
            let new = c.since(self.reported_netns.get(&c.netns));
            let labels = NetnsLabels { netns: c.netns };
            m.listen_overflows
                .get_or_create(&labels)
                .inc_by(new.listen_overflows);
            m.listen_netns_drops
                .get_or_create(&labels)
                .inc_by(new.listen_drops);
            m.syncookies_sent
                .get_or_create(&labels)
                .inc_by(new.syncookies_sent);
            self.reported_netns.insert(c.netns, *c);
        }
    }

    fn refresh(&mut self, now_ns: u64, v: &View<'_>, force: bool) {
        if force || self.last_gauges.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            self.gauges(v.totals, v.tracker);
            self.containers(v.tracker);
            self.last_gauges = Some(Instant::now());
        }
        if let Some(holders) = v.holders {
            self.close_wait(now_ns, holders, v.tracker);
            self.listen(holders, v.tracker);
        }
    }
}

impl Sink for MetricsSink {
    fn holder_want(&self) -> HolderWant {
        HolderWant::Periodically(&[TcpState::CloseWait, TcpState::Listen])
    }

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
                (TcpState::SynRecv, TcpState::Established) => {
                    if let Some(syn) = o.syn_ns {
                        m.accept.observe(syn as f64 / 1e9);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn life_ended(&mut self, life: &SocketLife) -> io::Result<()> {
        if matches!(life.end, End::StillOpen | End::Evicted) || life.role == Role::Listener {
            return Ok(());
        }
        if let Some(ns) = life.lifetime_ns {
            self.metrics.lifetime.observe(ns as f64 / 1e9);
        }
        let labels = self.container(life.cgroup);
        let labels = self.slot(labels);
        let m = &self.metrics;
        m.container_connections.get_or_create(&labels).inc();
        if let Some(f) = life.facts {
            if f.srtt_us > 0 {
                m.rtt.observe(f64::from(f.srtt_us) / 1e6);
            }
            m.container_bytes_acked
                .get_or_create(&labels)
                .inc_by(f.bytes_acked);
            m.container_bytes_received
                .get_or_create(&labels)
                .inc_by(f.bytes_received);
            m.container_retransmits
                .get_or_create(&labels)
                .inc_by(u64::from(f.retrans));
        }
        Ok(())
    }

    fn batch_done(&mut self, v: &View<'_>) -> io::Result<()> {
        self.refresh(0, v, false);
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v, false);
        Ok(())
    }

    fn holders(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v, false);
        Ok(())
    }

    fn finish(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v, true);
        Ok(())
    }
}

/// Connections served at once; past this the oldest is closed for the newest (a scraper
/// is never locked out by idle connections).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection has this long to send a request's headers, also between keep-alive
/// requests (the idle timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After an accept error (out of file descriptors, say), the loop waits this long.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` (and `HEAD`) on `addr` from a thread of its own: 404 for any
/// other path, 405 for any other method. Returns once the socket is bound; the thread
/// lives as long as the process.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        log::warn!(
            "serving metrics on {bound} without authentication: anyone who can reach it can read them"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("tcplens-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, metrics).await,
                    Err(e) => log::warn!("metrics server: {e}"),
                }
            });
        })?;
    Ok(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let mut open: std::collections::VecDeque<tokio::task::AbortHandle> =
        std::collections::VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: free one and wait, rather
                // than spin on an error that persists.
                log::debug!("metrics server: accept: {e}");
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        open.retain(|c| !c.is_finished());
        while open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort(); // dropping its future closes the socket
            }
        }
        let metrics = metrics.clone();
        let conn = tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| std::future::ready(respond(&req, &metrics)));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await;
        });
        open.push_back(conn.abort_handle());
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// The answer to one request.
fn respond<B>(
    req: &hyper::Request<B>,
    metrics: &Metrics,
) -> Result<hyper::Response<Body>, hyper::http::Error> {
    use hyper::{Method, StatusCode};
    let plain = |status: StatusCode, text: &'static str| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Body::from(text))
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: tcplens serves /metrics\n",
        );
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return hyper::Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header("allow", "GET, HEAD")
                .body(Body::from("method not allowed: GET or HEAD\n"));
        }
    };
    let body = metrics.encode();
    let builder = hyper::Response::builder().header(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    );
    if head {
        builder
            .header("content-length", body.len())
            .body(Body::default())
    } else {
        builder.body(Body::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SocketId;
    use crate::source::procs::Holder;
    use crate::source::sockdiag::DiagSocket;
    use crate::tracker::tests::{ended_connection, tr};
    use TcpState::*;

    fn cw(sport: u16, pid: u32, comm: &str) -> (DiagSocket, Option<Holder>) {
        (
            DiagSocket {
                id: SocketId {
                    family: crate::model::Family::Ipv4,
                    saddr: "127.0.0.1".parse().unwrap(),
                    sport,
                    daddr: "127.0.0.1".parse().unwrap(),
                    dport: 9,
                    netns: 1,
                    cookie: u64::from(sport),
                },
                state: CloseWait,
                inode: u64::from(sport),
                uid: 0,
                cgroup: 0,
                tw_expires_ms: None,
            },
            Some(Holder {
                pid,
                fd: 3,
                comm: comm.into(),
                cmdline: String::new(),
            }),
        )
    }

    #[test]
    fn exposition_is_openmetrics_with_the_expected_families() {
        let metrics = Arc::new(Metrics::new());
        // Two python3 servers apart; socket 1 (tracked from 0 s) is the only one whose
        // age is exact.
        let mut sockets = vec![
            cw(1, 10, "python3"),
            cw(2, 10, "python3"),
            cw(3, 11, "python3"),
            cw(4, 12, "b"),
        ];
        // 11 more processes with one socket each: 14 in all, the 4 beyond the top 10 sum
        // into `other`.
        sockets.extend((0..11).map(|i| cw(100 + i, 100 + u32::from(i), &format!("p{i:02}"))));
        // -L 9 (the sockets' local port... their dport is 9): one on another port is left out.
        let mut elsewhere = cw(5, 13, "elsewhere");
        elsewhere.0.id.dport = 10;
        sockets.push(elsewhere);
        let holders = Holders {
            at_ns: 3_000_000_000,
            took_ns: 1,
            sockets,
            ..Holders::default()
        };
        let filter = KernelFilter {
            rports: vec![9],
            ..KernelFilter::default()
        };
        // Tracing began at 1 s.
        let mut sink = MetricsSink::new(metrics.clone(), filter, 1_000_000_000);
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        for e in [
            tr(7, 0, Close, SynSent, 1),
            tr(7, 2_000_000, SynSent, Established, 1),
            tr(7, 1_002_000_000, Established, FinWait1, 1),
            tr(7, 1_002_100_000, FinWait1, FinWait2, 1),
            {
                // Its counters at the end: the per-container counters and the RTT.
                let mut close = tr(7, 1_002_200_000, FinWait2, Close, 1);
                close.facts = Some(crate::model::ConnFacts {
                    bytes_acked: 2,
                    bytes_received: 1,
                    srtt_us: 30,
                    min_rtt_us: Some(20),
                    retrans: 0,
                });
                close
            },
            tr(8, 0, Close, SynSent, 1),
            tr(1, 1_500_000_000, Listen, SynRecv, 10),
            tr(1, 1_500_100_000, SynRecv, Established, 10),
            tr(1, 2_500_000_000, Established, CloseWait, 10),
        ] {
            let o = t.observe(&e, &mut ended);
            sink.transition(&e, &o).unwrap();
            for l in ended.drain(..) {
                sink.life_ended(&l).unwrap();
            }
        }
        let totals = Totals {
            events: 9,
            timewait: 0,
            requests: 0,
            lost: Lost {
                ring_full: 3,
                recursion: 2,
            },
            bad: 0,
        };
        sink.finish(
            3_000_000_000,
            &View {
                totals: &totals,
                tracker: &t,
                holders: Some(&holders),
            },
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
            "tcplens_container_sockets",
            "tcplens_container_connections",
            "tcplens_tracked_sockets",
            "tcplens_evictions",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // Every metric the shipped Grafana dashboard queries is one of these.
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../deploy/grafana/tcplens-dashboard.json"
        ))
        .expect("the dashboard is JSON");
        let mut queried = 0;
        for target in dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .flat_map(|p| p["targets"].as_array().expect("targets"))
        {
            let expr = target["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tcplens_"))
            {
                let family = ["_bucket", "_count", "_sum", "_total"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    names.contains(&family),
                    "{family} (in {expr:?}) is not exported"
                );
                queried += 1;
            }
        }
        assert!(queried >= 16, "{queried} metrics queried");
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
        let held: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tcplens_close_wait_sockets{"))
            .collect();
        assert_eq!(held.len(), TOP_HOLDERS + 1, "{text}");
        assert!(!text.contains("elsewhere"), "-D 9 leaves it out: {text}");
        // The two python3 processes apart, by pid.
        for line in [
            "tcplens_close_wait_sockets{pid=\"10\",comm=\"python3\"} 2",
            "tcplens_close_wait_sockets{pid=\"11\",comm=\"python3\"} 1",
            "tcplens_close_wait_sockets{pid=\"other\",comm=\"other\"} 4",
            // Socket 2 was there before tracing began (1 s): at least 2 s old at 3 s.
            "tcplens_close_wait_oldest_seconds{pid=\"10\",comm=\"python3\",lower_bound=\"true\"} 2.0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // Alone, socket 1's age is exact: in CLOSE_WAIT since 2.5 s.
        let mut only_1 = MetricsSink::new(
            Arc::new(Metrics::new()),
            KernelFilter::default(),
            1_000_000_000,
        );
        let one = Holders {
            sockets: vec![cw(1, 10, "python3")],
            ..holders.clone()
        };
        only_1
            .holders(
                3_000_000_000,
                &View {
                    totals: &totals,
                    tracker: &t,
                    holders: Some(&one),
                },
            )
            .unwrap();
        let text = only_1.metrics.encode();
        let line = "tcplens_close_wait_oldest_seconds{pid=\"10\",comm=\"python3\",lower_bound=\"false\"} 0.5";
        assert!(text.contains(line), "{line} missing:\n{text}");
    }

    #[test]
    fn only_get_and_head_of_metrics_are_answered() {
        use hyper::body::Body as _;
        let metrics = Metrics::new();
        let ask = |method: &str, path: &str| {
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap();
            respond(&req, &metrics).unwrap()
        };
        let get = ask("GET", "/metrics");
        assert_eq!(get.status(), 200);
        let len = get.body().size_hint().exact().unwrap();
        assert!(len > 100, "{len}");
        let head = ask("HEAD", "/metrics");
        assert_eq!(head.status(), 200);
        assert_eq!(head.body().size_hint().exact(), Some(0));
        assert_eq!(head.headers()["content-length"], len.to_string().as_str());
        assert_eq!(ask("GET", "/").status(), 404);
        assert_eq!(ask("GET", "/metrics/x").status(), 404);
        assert_eq!(ask("GET", "/metrics?x=1").status(), 200);
        let post = ask("POST", "/metrics");
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()["allow"], "GET, HEAD");
        assert_eq!(ask("DELETE", "/metrics").status(), 405);
    }

    #[test]
    fn top_holders_caps_and_sums_the_rest() {
        let v = (0..5)
            .map(|i| HeldBy {
                pid: Some(i),
                comm: format!("c{i}"),
                count: 5 - u64::from(i),
                oldest_ns: u64::from(i),
                at_least: i == 4,
            })
            .collect();
        let got: Vec<_> = top_holders(v, 2)
            .into_iter()
            .map(|h| (h.pid, h.comm, h.count, h.oldest_ns, h.at_least))
            .collect();
        assert_eq!(
            got,
            [
                (Some(0), "c0".into(), 5, 0, false),
                (Some(1), "c1".into(), 4, 1, false),
                (None, "other".into(), 3 + 2 + 1, 4, true)
            ]
        );
    }

    /// Per container: live sockets (top N + other) and the ended connections' counters,
    /// a slot per container up to the cap, the rest as `other`.
    #[test]
    fn container_series_are_bounded() {
        let docker = "/system.slice/docker-2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b.scope";
        let pod = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-0ba8ac17e4e7a31fb82279503552fe94e64bab4745bf6fd2ff231e7c8ca8bed0.scope";
        // 25 more containers, each with one connection.
        let more: Vec<(u64, String)> = (0..25u64)
            .map(|i| {
                (
                    8000 + i,
                    format!("/system.slice/docker-{i:02x}{}.scope", "b".repeat(62)),
                )
            })
            .collect();
        let names = CgroupNames::known(
            [(7001, docker), (7002, pod), (7003, "/user.slice")]
                .into_iter()
                .chain(more.iter().map(|(id, p)| (*id, p.as_str()))),
        );
        let metrics = Arc::new(Metrics::new());
        let mut sink =
            MetricsSink::new(metrics.clone(), KernelFilter::default(), 0).with_names(names);
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        let mut sk = 0;
        // Two connections in the docker container, one in the pod, one outside
        // containers, then the 25 others; and one socket left open in the pod.
        let cgroups = [7001, 7001, 7002, 7003]
            .into_iter()
            .chain(more.iter().map(|(id, _)| *id));
        for cgroup in cgroups {
            sk += 1;
            let facts = crate::model::ConnFacts {
                bytes_acked: 1_001,
                bytes_received: 2_000,
                srtt_us: 50,
                min_rtt_us: Some(40),
                retrans: 3,
            };
            for e in ended_connection(sk, cgroup, facts) {
                let o = t.observe(&e, &mut ended);
                sink.transition(&e, &o).unwrap();
            }
        }
        let mut open = tr(99, 0, Close, SynSent, 1);
        open.cgroup = 7002;
        t.observe(&open, &mut ended);
        for life in ended.drain(..) {
            sink.life_ended(&life).unwrap();
        }
        sink.finish(
            100,
            &View {
                totals: &Totals::default(),
                tracker: &t,
                holders: None,
            },
        )
        .unwrap();
        let text = metrics.encode();
        for line in [
            r#"tcplens_container_connections_total{container="2a55517bd2c9",runtime="docker",pod_uid=""} 2"#,
            r#"tcplens_container_bytes_acked_total{container="2a55517bd2c9",runtime="docker",pod_uid=""} 2002"#,
            r#"tcplens_container_bytes_received_total{container="2a55517bd2c9",runtime="docker",pod_uid=""} 4000"#,
            r#"tcplens_container_retransmits_total{container="2a55517bd2c9",runtime="docker",pod_uid=""} 6"#,
            r#"tcplens_container_connections_total{container="0ba8ac17e4e7",runtime="cri-o",pod_uid="2ca4a155-3599-498d-bb9d-4446693fa3ea"} 1"#,
            r#"tcplens_container_connections_total{container="none",runtime="",pod_uid=""} 1"#,
            // 3 slots taken: 17 of the 25 get theirs, 8 count as other.
            r#"tcplens_container_connections_total{container="other",runtime="",pod_uid=""} 8"#,
            r#"tcplens_container_sockets{container="0ba8ac17e4e7",runtime="cri-o",pod_uid="2ca4a155-3599-498d-bb9d-4446693fa3ea",state="SYN_SENT"} 1"#,
            // Every one of the 29 connections ended with a 50 us smoothed RTT.
            "tcplens_connection_rtt_seconds_count 29",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        let rtt_sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tcplens_connection_rtt_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .expect("the RTT histogram's sum");
        assert!((rtt_sum - 29.0 * 50e-6).abs() < 1e-12, "{rtt_sum}");
        let series = text
            .lines()
            .filter(|l| l.starts_with("tcplens_container_connections_total{"))
            .count();
        assert_eq!(series, TOP_CONTAINERS + 1, "{text}");
        let sockets = text
            .lines()
            .filter(|l| l.starts_with("tcplens_container_sockets{"))
            .count();
        assert_eq!(sockets, 1, "only the open socket is live: {text}");
    }
}
