//! `stats`: HDR histograms of time spent in each state, of the connect and accept
//! handshakes (accept: the server's, from the SYN queued to ESTABLISHED, when the request
//! was seen), of connection lifetimes and, per connection at its end, of its smoothed RTT
//! and the bytes it had acked and received, with what became of the SYNs queued at
//! listeners, printed every `--interval` (then reset) and at exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Format, Sink, View, human_ns};
use crate::clock::TimeFormatter;
use crate::model::{TcpState, Transition};
use crate::pipeline::Totals;
use crate::source::cgroup::CgroupNames;
use crate::tracker::{End, FastMap, ListenerRequests, Observed, Role, SocketLife, Tracker};

/// Highest recordable value: a day, in ns (larger values are clamped to it).
const MAX_NS: u64 = 86_400 * 1_000_000_000;
/// Above this many groups (`--by`), the rest share one group named `other`.
pub const MAX_GROUPS: usize = 256;

/// How `--by` splits the histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// The socket's local port.
    Lport,
    /// The socket's remote port.
    Rport,
    /// The socket's owner process (`unknown` until one is seen).
    Process,
    /// The socket's cgroup (its path; `unknown` when the kernel did not show it).
    Cgroup,
    /// The container the socket's cgroup names (`runtime:id`; `none` outside containers).
    Container,
}

impl By {
    fn name(self) -> &'static str {
        match self {
            By::Lport => "lport",
            By::Rport => "rport",
            By::Process => "process",
            By::Cgroup => "cgroup",
            By::Container => "container",
        }
    }
}

/// Highest recordable byte count per connection (larger ones are clamped to it).
const MAX_BYTES: u64 = 1 << 50;

/// A histogram of nanoseconds (3 significant digits, from 1 ns): its counts grow only as
/// far as the largest value recorded, and are 32-bit (saturating), so a group holds a few
/// tens of KiB per state it saw rather than 300 KiB per histogram.
pub type Hist = Histogram<u32>;

pub fn new_histogram() -> Hist {
    // 3 significant digits is a precision hdrhistogram accepts.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("valid precision"))
}

/// Records `ns`, clamped to a day.
fn record_ns(h: &mut Hist, ns: u64) {
    // Auto-resizing: it fails only if the counts could not be indexed, not for a day.
    let _ = h.record(ns.clamp(1, MAX_NS));
}

/// The histograms of one group: only those of what it saw are allocated.
#[derive(Default)]
pub struct Group {
    pub states: BTreeMap<TcpState, Hist>,
    pub connect: Option<Hist>,
    pub accept: Option<Hist>,
    pub lifetime: Option<Hist>,
    /// Per connection, at its end: its smoothed RTT (ns), the bytes it had acked and
    /// received (bytes; see `model::ConnFacts`).
    pub srtt: Option<Hist>,
    pub bytes_acked: Option<Hist>,
    pub bytes_received: Option<Hist>,
}

fn record(h: &mut Option<Hist>, ns: u64) {
    record_ns(h.get_or_insert_with(new_histogram), ns);
}

fn record_bytes(h: &mut Option<Hist>, bytes: u64) {
    // Auto-resizing: it fails only if the counts could not be indexed.
    let _ = h
        .get_or_insert_with(new_histogram)
        .record(bytes.min(MAX_BYTES));
}

impl Group {
    fn is_empty(&self) -> bool {
        self.states.is_empty()
            && self.connect.is_none()
            && self.accept.is_none()
            && self.lifetime.is_none()
            && self.srtt.is_none()
            && self.bytes_acked.is_none()
            && self.bytes_received.is_none()
    }
}

/// Summary of a histogram of byte counts (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BytesSummary {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: u64,
}

impl BytesSummary {
    pub fn of(h: &Hist) -> BytesSummary {
        let s = Summary::of(h);
        BytesSummary {
            count: s.count,
            min: s.min_ns,
            p50: s.p50_ns,
            p90: s.p90_ns,
            p99: s.p99_ns,
            p999: s.p999_ns,
            max: s.max_ns,
            mean: s.mean_ns,
        }
    }
}

/// A byte count for people: `512B`, `97.7KiB`, `1.5MiB`, `2.0GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// Summary of one histogram, as printed and as in JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
}

impl Summary {
    pub fn of(h: &Hist) -> Summary {
        Summary {
            count: h.len(),
            min_ns: h.min(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            mean_ns: h.mean().round() as u64,
        }
    }
}

/// Events lost in the kernel, by reason (JSON).
#[derive(Serialize)]
struct JsonLost {
    ring_full: u64,
    recursion: u64,
}

/// Lives that ended without the kernel showing it (JSON), since tracing began.
#[derive(Serialize)]
struct JsonUnseen {
    /// Their socket address started another socket's life.
    reused: u64,
    /// sock_diag no longer listed them.
    gone: u64,
}

#[derive(Serialize)]
struct JsonWindow<'a> {
    time: String,
    window_ns: u64,
    /// Since tracing began: ring buffer drops and recursion misses.
    lost_events: u64,
    lost: JsonLost,
    ended_unseen: JsonUnseen,
    /// Sockets dropped at the `--max-sockets` cap since tracing began (their lives are
    /// missing from the histograms from then on).
    evicted: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    states: BTreeMap<&'static str, Summary>,
    connect_ns: Option<Summary>,
    accept_ns: Option<Summary>,
    lifetime_ns: Option<Summary>,
    /// Connections that ended in the window: their smoothed RTT, and the bytes they had
    /// acked and received, at their end.
    srtt_ns: Option<Summary>,
    bytes_acked: Option<BytesSummary>,
    bytes_received: Option<BytesSummary>,
    /// Sockets in each state at the time of the report (TIME_WAIT included), when known.
    live: &'a BTreeMap<&'static str, u64>,
    /// Request sockets (SYNs queued at listeners) in the window.
    requests: JsonRequests,
}

/// What became of the requests (SYNs queued at listeners) in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JsonRequests {
    pub syns: u64,
    pub completed: u64,
    pub expired: u64,
    pub aborted: u64,
    pub synack_retrans: u64,
    /// Most requests waiting at once, every listener together.
    pub queue_peak: u32,
}

impl JsonRequests {
    /// The window from the totals `then` to `now`.
    fn between(then: &ListenerRequests, now: &ListenerRequests) -> Self {
        JsonRequests {
            syns: now.syns - then.syns,
            completed: now.completed - then.completed,
            expired: now.expired - then.expired,
            aborted: now.aborted - then.aborted,
            synack_retrans: now.synack_retrans - then.synack_retrans,
            queue_peak: now.peak,
        }
    }
}

/// What a socket is grouped by.
#[derive(Clone, Copy)]
struct Keyed<'a> {
    sport: u16,
    dport: u16,
    owner: Option<&'a crate::tracker::Owner>,
    cgroup: u64,
}

/// One report's window, as every format prints it.
struct Report<'a> {
    now_ns: u64,
    /// `now_ns` as RFC 3339.
    time: String,
    window_ns: u64,
    totals: &'a Totals,
    tracker: &'a Tracker,
    /// Sockets per state now.
    live: BTreeMap<&'static str, u64>,
    requests: JsonRequests,
}

pub struct StatsSink<W: Write> {
    out: W,
    format: Format,
    times: TimeFormatter,
    by: Option<By>,
    names: CgroupNames,
    /// The window's groups in the order first seen, and where each is by name: one hash
    /// look-up per event, no allocation once a group exists (reports sort them by name).
    groups: Vec<(String, Group)>,
    index: FastMap<String, usize>,
    /// The event's group name is written here before it is looked up.
    key: String,
    window_start_ns: Option<u64>,
    /// The request totals at the start of the window.
    requests_then: ListenerRequests,
}

impl<W: Write> StatsSink<W> {
    /// `names`: how cgroup ids are named (the host's cgroups live; none on replay).
    pub fn new(
        out: W,
        format: Format,
        times: TimeFormatter,
        by: Option<By>,
        names: CgroupNames,
    ) -> Self {
        StatsSink {
            out,
            format,
            times,
            by,
            names,
            groups: Vec::new(),
            index: FastMap::default(),
            key: String::new(),
            window_start_ns: None,
            requests_then: ListenerRequests::default(),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// The window's groups by name.
    pub fn groups(&self) -> BTreeMap<&str, &Group> {
        self.groups.iter().map(|(k, g)| (k.as_str(), g)).collect()
    }

    /// Writes the name of the group `s` falls in to `key`.
    fn write_key(&mut self, s: Keyed<'_>, key: &mut String) {
        match self.by {
            None => {}
            Some(By::Lport) => key.push_str(itoa::Buffer::new().format(s.sport)),
            Some(By::Rport) => key.push_str(itoa::Buffer::new().format(s.dport)),
            Some(By::Process) => match s.owner {
                Some(o) => {
                    let _ = write!(key, "{}[{}]", o.comm, o.pid);
                }
                None => key.push_str("unknown"),
            },
            Some(By::Cgroup) => match self.names.get(s.cgroup) {
                Some(n) => key.push_str(&super::escaped(&n.path)),
                None if s.cgroup != 0 => {
                    let _ = write!(key, "cgroup:{}", s.cgroup);
                }
                None => key.push_str("unknown"),
            },
            Some(By::Container) => match self.names.get(s.cgroup) {
                Some(n) if n.container.is_some() => {
                    key.push_str(&super::cgroup_label(s.cgroup, Some(n)));
                }
                Some(_) => key.push_str("none"),
                None => key.push_str("unknown"),
            },
        }
    }

    /// The group `s` falls in, made if new; past `MAX_GROUPS` new names share `other`.
    fn group(&mut self, s: Keyed<'_>) -> &mut Group {
        if self.by.is_none() {
            // One group, named "".
            let at = if self.groups.is_empty() {
                self.new_group("")
            } else {
                0
            };
            return &mut self.groups[at].1;
        }
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        self.write_key(s, &mut key);
        let at = match self.index.get(key.as_str()) {
            Some(&at) => at,
            None if self.groups.len() < MAX_GROUPS => self.new_group(&key),
            None => match self.index.get("other") {
                Some(&at) => at,
                None => self.new_group("other"),
            },
        };
        self.key = key;
        &mut self.groups[at].1
    }

    /// Adds group `name` (not there yet); returns where it is.
    fn new_group(&mut self, name: &str) -> usize {
        self.index.insert(name.to_owned(), self.groups.len());
        self.groups.push((name.to_owned(), Group::default()));
        self.groups.len() - 1
    }

    /// Prints the window ending at `now_ns` and starts a new one.
    fn report(&mut self, now_ns: u64, totals: &Totals, tracker: &Tracker) -> io::Result<()> {
        let live: BTreeMap<&'static str, u64> = tracker
            .state_counts()
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .filter_map(|(i, &n)| Some((TcpState::from_kernel(i as u8)?.name(), n)))
            .collect();
        let start = self.window_start_ns.unwrap_or(now_ns);
        let mut time = String::new();
        self.times.rfc3339(now_ns, &mut time);
        self.index.clear();
        let groups: BTreeMap<String, Group> = self.groups.drain(..).collect();
        let now = *tracker.requests().total();
        let w = Report {
            now_ns,
            time,
            window_ns: now_ns.saturating_sub(start),
            totals,
            tracker,
            live,
            requests: JsonRequests::between(&self.requests_then, &now),
        };
        self.requests_then = now;
        match self.format {
            Format::Json => {
                let mut any = false;
                for (key, g) in groups.iter().filter(|(_, g)| !g.is_empty()) {
                    any = true;
                    self.json(&w, Some(key.as_str()), g)?;
                }
                if !any {
                    self.json(&w, None, &Group::default())?;
                }
            }
            Format::Text => self.text(&w, &groups)?,
        }
        self.out.flush()?;
        self.window_start_ns = Some(now_ns);
        Ok(())
    }

    fn json(&mut self, w: &Report<'_>, key: Option<&str>, g: &Group) -> io::Result<()> {
        let stats = w.tracker.stats();
        let rec = JsonWindow {
            time: w.time.clone(),
            window_ns: w.window_ns,
            lost_events: w.totals.lost.total(),
            lost: JsonLost {
                ring_full: w.totals.lost.ring_full,
                recursion: w.totals.lost.recursion,
            },
            ended_unseen: JsonUnseen {
                reused: stats.unseen_reused,
                gone: stats.unseen_gone,
            },
            evicted: stats.evicted,
            by: self.by.map(By::name),
            group: self.by.and(key),
            states: g
                .states
                .iter()
                .map(|(s, h)| (s.name(), Summary::of(h)))
                .collect(),
            connect_ns: g.connect.as_ref().map(Summary::of),
            accept_ns: g.accept.as_ref().map(Summary::of),
            lifetime_ns: g.lifetime.as_ref().map(Summary::of),
            srtt_ns: g.srtt.as_ref().map(Summary::of),
            bytes_acked: g.bytes_acked.as_ref().map(BytesSummary::of),
            bytes_received: g.bytes_received.as_ref().map(BytesSummary::of),
            live: &w.live,
            requests: w.requests,
        };
        serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }

    fn text(&mut self, w: &Report<'_>, groups: &BTreeMap<String, Group>) -> io::Result<()> {
        let (now_ns, window_ns, totals, tracker, live, requests) = (
            w.now_ns,
            w.window_ns,
            w.totals,
            w.tracker,
            &w.live,
            w.requests,
        );
        let mut s = String::new();
        self.times.time_of_day(now_ns, &mut s);
        let _ = write!(
            s,
            "  window {}, events {} in the kernel",
            human_ns(window_ns),
            totals.lost
        );
        let stats = tracker.stats();
        let unseen = stats.unseen_reused + stats.unseen_gone;
        if unseen > 0 {
            let _ = write!(s, ", {unseen} sockets ended unseen");
        }
        if stats.evicted > 0 {
            let _ = write!(
                s,
                ", {} sockets evicted at the --max-sockets cap",
                stats.evicted
            );
        }
        s.push('\n');
        if !live.is_empty() {
            s.push_str("live sockets:");
            for (state, n) in live {
                let _ = write!(s, " {state} {n}");
            }
            s.push('\n');
        }
        if requests != JsonRequests::default() {
            let r = requests;
            let _ = writeln!(
                s,
                "requests: {} SYNs queued (peak {} waiting), {} completed, {} expired, {} aborted, {} SYN-ACKs retransmitted",
                r.syns, r.queue_peak, r.completed, r.expired, r.aborted, r.synack_retrans
            );
        }
        if groups.values().all(Group::is_empty) {
            s.push_str("(no completed durations)\n");
        }
        for (key, g) in groups.iter().filter(|(_, g)| !g.is_empty()) {
            if let Some(by) = self.by {
                let _ = writeln!(s, "\n{} {key}", by.name());
            }
            let _ = writeln!(
                s,
                "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "TIME IN", "COUNT", "MIN", "P50", "P90", "P99", "P99.9", "MAX", "MEAN"
            );
            let rows = g
                .states
                .iter()
                .map(|(st, h)| (st.name(), h))
                .chain(g.connect.as_ref().map(|h| ("connect", h)))
                .chain(g.accept.as_ref().map(|h| ("accept", h)))
                .chain(g.lifetime.as_ref().map(|h| ("lifetime", h)))
                .chain(g.srtt.as_ref().map(|h| ("rtt", h)));
            let bytes = g
                .bytes_acked
                .as_ref()
                .map(|h| ("bytes acked", h))
                .into_iter()
                .chain(g.bytes_received.as_ref().map(|h| ("bytes received", h)));
            for (name, h) in rows.clone() {
                summary_row(&mut s, name, h, human_ns);
            }
            if g.bytes_acked.is_some() || g.bytes_received.is_some() {
                let _ = writeln!(
                    s,
                    "{:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    "PER CONNECTION", "COUNT", "MIN", "P50", "P90", "P99", "P99.9", "MAX", "MEAN"
                );
            }
            for (name, h) in bytes.clone() {
                summary_row(&mut s, name, h, human_bytes);
            }
            for (name, h) in rows {
                let _ = writeln!(s, "\n{name}");
                log2_chart(h, &mut s, human_ns);
            }
            for (name, h) in bytes {
                let _ = writeln!(s, "\n{name}");
                log2_chart(h, &mut s, human_bytes);
            }
        }
        s.push('\n');
        self.out.write_all(s.as_bytes())
    }
}

/// One row of summaries, values shown by `human`.
fn summary_row(s: &mut String, name: &str, h: &Hist, human: fn(u64) -> String) {
    let m = Summary::of(h);
    let _ = writeln!(
        s,
        "{name:<14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        m.count,
        human(m.min_ns),
        human(m.p50_ns),
        human(m.p90_ns),
        human(m.p99_ns),
        human(m.p999_ns),
        human(m.max_ns),
        human(m.mean_ns),
    );
}

/// A bcc-style power-of-two bar chart drawn from the HDR data, values shown by `human`.
pub fn log2_chart(h: &Hist, out: &mut String, human: fn(u64) -> String) {
    let mut buckets = [0u64; 64];
    for v in h.iter_recorded() {
        let value = v.value_iterated_to().max(1);
        buckets[63 - value.leading_zeros() as usize] += u64::from(v.count_at_value());
    }
    let Some(lo) = buckets.iter().position(|&c| c > 0) else {
        return;
    };
    let hi = buckets.iter().rposition(|&c| c > 0).unwrap_or(lo);
    let peak = buckets[lo..=hi].iter().copied().max().unwrap_or(1).max(1);
    let _ = writeln!(out, "  {:>23} : {:<8} distribution", "range", "count");
    for (k, &count) in buckets.iter().enumerate().take(hi + 1).skip(lo) {
        let from = 1u64 << k;
        let to = from.saturating_mul(2);
        let bar = (count * 40).div_ceil(peak) as usize;
        let _ = writeln!(
            out,
            "  {:>10} -> {:<10} : {:<8} |{:<40}|",
            human(from),
            human(to),
            count,
            "*".repeat(bar.min(40))
        );
    }
}

impl<W: Write> Sink for StatsSink<W> {
    fn started(&mut self, start_ns: Option<u64>) -> io::Result<()> {
        // Live, the first window starts with tracing; a replay's with its first event.
        self.window_start_ns = start_ns;
        Ok(())
    }

    fn transition(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        if self.window_start_ns.is_none() {
            self.window_start_ns = Some(t.ts_ns);
        }
        let Some(ns) = o.old_ns else {
            return Ok(()); // unknown durations never enter a histogram
        };
        let g = self.group(Keyed {
            sport: o.sport,
            dport: o.dport,
            owner: o.owner.as_ref(),
            cgroup: t.cgroup,
        });
        record_ns(g.states.entry(t.old).or_insert_with(new_histogram), ns);
        match (t.old, t.new) {
            (TcpState::SynSent, TcpState::Established) => record(&mut g.connect, ns),
            // The server's handshake from the SYN, when its request was seen: the request
            // (NEW_SYN_RECV) until the final ACK made the child, then the child's SYN_RECV.
            (TcpState::SynRecv, TcpState::Established) => {
                if let Some(syn) = o.syn_ns {
                    record(&mut g.accept, syn);
                    let request = g
                        .states
                        .entry(TcpState::NewSynRecv)
                        .or_insert_with(new_histogram);
                    record_ns(request, syn.saturating_sub(ns));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn life_ended(&mut self, life: &SocketLife) -> io::Result<()> {
        // Connection lifetimes: whole lives only, listeners aside.
        if matches!(life.end, End::StillOpen | End::Evicted) || life.role == Role::Listener {
            return Ok(());
        }
        let g = self.group(Keyed {
            sport: life.id.sport,
            dport: life.id.dport,
            owner: life.owner.as_ref(),
            cgroup: life.cgroup,
        });
        if let Some(ns) = life.lifetime_ns {
            record(&mut g.lifetime, ns);
        }
        if let Some(f) = life.facts {
            if f.srtt_us > 0 {
                record(&mut g.srtt, u64::from(f.srtt_us) * 1_000);
            }
            record_bytes(&mut g.bytes_acked, f.bytes_acked);
            record_bytes(&mut g.bytes_received, f.bytes_received);
        }
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.report(now_ns, v.totals, v.tracker)
    }

    fn finish(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.report(now_ns, v.totals, v.tracker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::WallClock;
    use crate::model::TimerOp;
    use crate::tracker::tests::{ended_connection, request_of, tr};
    use TcpState::*;
    use jiff::tz::TimeZone;

    fn sink(format: Format, by: Option<By>) -> StatsSink<Vec<u8>> {
        let clock = WallClock {
            boot_offset_ns: 1_795_299_000_000_000_000,
        };
        StatsSink::new(
            Vec::new(),
            format,
            TimeFormatter::new(clock, TimeZone::UTC),
            by,
            CgroupNames::none(),
        )
    }

    fn view<'a>(totals: &'a Totals, tracker: &'a Tracker) -> View<'a> {
        View {
            totals,
            tracker,
            holders: None,
        }
    }

    #[test]
    fn the_first_live_window_starts_with_tracing_and_evictions_are_reported() {
        // Live, tracing began at 0.5 s; the first event comes at 1 s, the report at 1.5 s.
        let mut s = sink(Format::Json, None);
        s.started(Some(500_000_000)).unwrap();
        // A tracker capped at one socket: the second evicts the first.
        let mut t = Tracker::new(1);
        let mut ended = Vec::new();
        for e in [
            tr(1, 1_000_000_000, Close, SynSent, 1),
            tr(2, 1_100_000_000, Close, SynSent, 1),
        ] {
            let o = t.observe(&e, &mut ended);
            s.transition(&e, &o).unwrap();
        }
        assert_eq!(t.stats().evicted, 1);
        s.interval(1_500_000_000, &view(&Totals::default(), &t))
            .unwrap();
        s.interval(2_000_000_000, &view(&Totals::default(), &t))
            .unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        let windows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<_> = windows
            .iter()
            .map(|w| (w["window_ns"].as_u64(), w["evicted"].as_u64()))
            .collect();
        assert_eq!(
            got,
            [(Some(1_000_000_000), Some(1)), (Some(500_000_000), Some(1))]
        );
        // In text too.
        let mut s = sink(Format::Text, None);
        s.started(Some(500_000_000)).unwrap();
        s.finish(1_500_000_000, &view(&Totals::default(), &t))
            .unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert!(
            out.contains("window 1.000s, events 0 lost in the kernel, 1 sockets evicted at the --max-sockets cap\n"),
            "{out}"
        );
    }

    /// Drives a tracker and the sink through `n` connections whose CLOSE_WAIT lasts
    /// `i` ms for connection i.
    fn drive(sink: &mut StatsSink<Vec<u8>>, n: u64) -> u64 {
        let mut tracker = Tracker::default();
        let mut ended = Vec::new();
        let mut ts = 1_000_000_000;
        for i in 1..=n {
            for (old, new, dt) in [
                (Listen, SynRecv, 0),
                (SynRecv, Established, 5_000),
                (Established, CloseWait, 1_000_000),
                (CloseWait, LastAck, i * 1_000_000),
                (LastAck, Close, 20_000),
            ] {
                ts += dt;
                let e = tr(100 + i, ts, old, new, 1);
                if old == Listen {
                    // Its SYN was queued 2 us before the final ACK made it.
                    tracker.request(&request_of(&e, TimerOp::Arm, 0xa, ts - 2_000));
                }
                let o = tracker.observe(&e, &mut ended);
                sink.transition(&e, &o).unwrap();
                for life in ended.drain(..) {
                    sink.life_ended(&life).unwrap();
                }
            }
        }
        ts
    }

    #[test]
    fn json_summary_per_state() {
        let mut s = sink(Format::Json, None);
        let end = drive(&mut s, 100);
        let g = &s.groups()[""];
        let cw = Summary::of(&g.states[&CloseWait]);
        assert_eq!(cw.count, 100);
        // 3 significant digits: values within 0.1 %.
        // 1 ms is reported as the lowest value of its HDR bucket (512 ns wide there).
        assert_eq!(cw.min_ns, 999_936);
        assert!((49_950_000..=50_050_000).contains(&cw.p50_ns), "{cw:?}");
        assert!((99_900_000..=100_100_000).contains(&cw.max_ns), "{cw:?}");
        // The server's handshake: 2 us of request, then 5 us of the child's SYN_RECV.
        let accept = Summary::of(g.accept.as_ref().unwrap());
        // (Within the 3 significant digits the histograms keep.)
        assert_eq!((accept.count, accept.min_ns), (100, 7_000));
        assert!((7_000..7_007).contains(&accept.max_ns), "{accept:?}");
        let request = Summary::of(&g.states[&NewSynRecv]);
        assert_eq!((request.count, request.min_ns), (100, 2_000));
        assert!(g.connect.is_none());
        // SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK, the requests; no unknown durations
        // (the first LISTEN -> SYN_RECV of each child has none).
        assert_eq!(
            g.states.keys().copied().collect::<Vec<_>>(),
            [Established, SynRecv, CloseWait, LastAck, NewSynRecv]
        );
        // A listener's life is not a connection lifetime.
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        t.observe(&tr(9, 0, Close, Listen, 1), &mut ended);
        t.observe(&tr(9, 5_000, Listen, Close, 1), &mut ended);
        s.life_ended(&ended[0]).unwrap();
        let lifetimes = s.groups()[""]
            .lifetime
            .as_ref()
            .map(hdrhistogram::Histogram::len);
        assert_eq!(lifetimes, Some(100));
        let totals = Totals {
            lost: crate::source::kernel::Lost {
                ring_full: 7,
                recursion: 2,
            },
            ..Totals::default()
        };
        s.finish(end, &view(&totals, &Tracker::default())).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["lost_events"], 9, "ring drops and recursion misses");
        assert_eq!(v["lost"]["ring_full"], 7);
        assert_eq!(v["lost"]["recursion"], 2);
        assert_eq!(v["ended_unseen"]["gone"], 0);
        assert_eq!(v["window_ns"], end - 1_000_000_000);
        assert_eq!(v["states"]["CLOSE_WAIT"]["count"], 100);
        assert_eq!(v["accept_ns"]["count"], 100);
        assert!(v["connect_ns"].is_null());
        assert_eq!(v["lifetime_ns"]["count"], 100);
        assert!(v.get("by").is_none());
    }

    #[test]
    fn by_lport_and_group_cap() {
        let mut s = sink(Format::Json, Some(By::Lport));
        drive(&mut s, 3);
        assert_eq!(s.groups().into_keys().collect::<Vec<_>>(), ["40000"]);
        let mut s = sink(Format::Json, Some(By::Rport));
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        for port in 1..=(MAX_GROUPS as u16 + 10) {
            for (old, new, ts) in [(Close, SynSent, 0), (SynSent, Established, 10)] {
                let mut e = tr(u64::from(port), ts, old, new, 1);
                e.id.dport = port;
                let o = t.observe(&e, &mut ended);
                s.transition(&e, &o).unwrap();
            }
        }
        assert_eq!(s.groups().len(), MAX_GROUPS + 1);
        assert_eq!(Summary::of(&s.groups()["other"].states[&SynSent]).count, 10);
    }

    #[test]
    fn text_report_with_chart() {
        let mut s = sink(Format::Text, None);
        let end = drive(&mut s, 4);
        s.finish(end, &view(&Totals::default(), &Tracker::default()))
            .unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert!(
            out.contains("window 14.100ms, events 0 lost in the kernel\n"),
            "{out}"
        );
        let row = out.lines().find(|l| l.starts_with("CLOSE_WAIT")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], "4");
        assert_eq!(cols[2], "999.9us");
        // 1, 2, 3, 4 ms: buckets [512us,1ms)? no: 1 ms = 1_000_000 ns lies in [2^19, 2^20).
        let chart: Vec<&str> = out
            .split("\nCLOSE_WAIT\n")
            .nth(1)
            .unwrap()
            .lines()
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(chart.len(), 4, "{chart:?}");
        assert!(
            chart[1].contains("524.3us -> 1.049ms") && chart[1].contains(": 1 "),
            "{chart:?}"
        );
        assert!(
            chart[2].contains("1.049ms -> 2.097ms") && chart[2].contains(": 1 "),
            "{chart:?}"
        );
        assert!(
            chart[3].contains("2.097ms -> 4.194ms") && chart[3].contains(": 2 "),
            "{chart:?}"
        );
    }

    /// Per connection at its end: RTT and bytes; grouped by container (and by cgroup).
    #[test]
    fn rtt_and_bytes_per_connection_by_container() {
        let docker = "/system.slice/docker-2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b.scope";
        let names = || CgroupNames::known([(7001, docker), (7002, "/system.slice/nginx.service")]);
        let clock = WallClock {
            boot_offset_ns: 1_795_299_000_000_000_000,
        };
        let times = || TimeFormatter::new(clock, TimeZone::UTC);
        let mut by_container = StatsSink::new(
            Vec::new(),
            Format::Json,
            times(),
            Some(By::Container),
            names(),
        );
        let mut by_cgroup =
            StatsSink::new(Vec::new(), Format::Text, times(), Some(By::Cgroup), names());
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        // Three connections in the container (10, 20, 30 KB out; RTT 40, 50, 60 us), one
        // in nginx's service, one whose cgroup tcplens cannot name.
        for (sk, cgroup, kb) in [
            (1, 7001, 10),
            (2, 7001, 20),
            (3, 7001, 30),
            (4, 7002, 1),
            (5, 99, 2),
        ] {
            let facts = crate::model::ConnFacts {
                bytes_acked: kb * 1000 + 1,
                bytes_received: 500,
                srtt_us: 30 + 10 * kb as u32 / 10,
                min_rtt_us: Some(20),
                retrans: 0,
            };
            for e in ended_connection(sk, cgroup, facts) {
                let o = t.observe(&e, &mut ended);
                by_container.transition(&e, &o).unwrap();
                by_cgroup.transition(&e, &o).unwrap();
            }
        }
        for life in ended.drain(..) {
            by_container.life_ended(&life).unwrap();
            by_cgroup.life_ended(&life).unwrap();
        }
        assert_eq!(
            by_container.groups().into_keys().collect::<Vec<_>>(),
            ["docker:2a55517bd2c9", "none", "unknown"]
        );
        let g = &by_container.groups()["docker:2a55517bd2c9"];
        let acked = BytesSummary::of(g.bytes_acked.as_ref().unwrap());
        // 3 significant digits: 10001 is kept as 10000, 20001 within 20000..20020.
        assert_eq!((acked.count, acked.min, acked.max), (3, 10_000, 30_015));
        assert!((20_000..20_020).contains(&acked.p50), "{acked:?}");
        let rtt = Summary::of(g.srtt.as_ref().unwrap());
        assert_eq!((rtt.count, rtt.min_ns), (3, 40_000));
        assert!((60_000..60_032).contains(&rtt.max_ns), "{rtt:?}");
        by_container
            .finish(100, &view(&Totals::default(), &t))
            .unwrap();
        let out = String::from_utf8(by_container.into_inner()).unwrap();
        let windows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let docker_window = windows
            .iter()
            .find(|w| w["group"] == "docker:2a55517bd2c9")
            .unwrap();
        assert_eq!(docker_window["by"], "container");
        assert_eq!(docker_window["bytes_acked"]["count"], 3);
        assert_eq!(docker_window["bytes_received"]["min"], 500);
        assert_eq!(docker_window["srtt_ns"]["min_ns"], 40_000);
        by_cgroup
            .finish(100, &view(&Totals::default(), &t))
            .unwrap();
        let text = String::from_utf8(by_cgroup.into_inner()).unwrap();
        assert!(
            text.contains("\ncgroup /system.slice/nginx.service\n"),
            "{text}"
        );
        assert!(text.contains("\ncgroup cgroup:99\n"), "{text}");
        let row = text.lines().find(|l| l.starts_with("bytes acked")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>()[2..5],
            ["3", "9.8KiB", "19.5KiB"],
            "{text}"
        );
    }
}
