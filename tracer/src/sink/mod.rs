//! Sinks: where tracked transitions end up. Every sink reads from the one tracker: it gets
//! each transition with what the tracker knows of it, each socket life that ends, and the
//! tracker itself at interval and exit time.

pub mod leaks;
pub mod listen;
pub mod metrics;
pub mod record;
pub mod stats;
pub mod timeline;
pub mod top;
pub mod watch;

use std::io;

use crate::model::{ConnFacts, KernelEvent, SocketId, TcpState, Transition};
use crate::pipeline::Totals;
use crate::source::cgroup::CgroupName;
use crate::source::host::Holders;
use crate::tracker::{Observed, SocketLife, Tracker};

/// Output format shared by the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for people.
    Text,
    /// One JSON object per line, for jq and log shippers.
    Json,
}

/// What sinks read besides the events: the run's totals, the tracker, and, when a sink
/// asked for them ([`Sink::holder_want`]), the sockets sock_diag lists in some states with
/// the processes holding them (found on the host thread, off the event loop).
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub totals: &'a Totals,
    pub tracker: &'a Tracker,
    pub holders: Option<&'a Holders>,
}

/// Which sockets' holders a sink reports, and how often.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderWant {
    None,
    /// At every `--interval` and at exit (the leak reports).
    AtIntervals(TcpState),
    /// Every few seconds, and at intervals and exit when they come anyway (the metrics).
    Periodically(&'static [TcpState]),
}

pub trait Sink {
    /// The holders this sink reports, if any.
    fn holder_want(&self) -> HolderWant {
        HolderWant::None
    }
    /// Tracing has started (the programs are attached, or the file is open): live, at
    /// kernel monotonic `start_ns`; a replay starts at its first event (`None`).
    fn started(&mut self, _start_ns: Option<u64>) -> io::Result<()> {
        Ok(())
    }
    /// Every event as decoded, before the tracker (the recorder keeps them raw).
    fn event(&mut self, _ev: &KernelEvent) -> io::Result<()> {
        Ok(())
    }
    /// A transition of the TCP view: as the kernel reported it, or derived from a timewait
    /// socket (`t.via`).
    fn transition(&mut self, _t: &Transition, _o: &Observed) -> io::Result<()> {
        Ok(())
    }
    /// A socket's life ended (closed, evicted, or still open at exit).
    fn life_ended(&mut self, _life: &SocketLife) -> io::Result<()> {
        Ok(())
    }
    /// After each batch of events (at least every 10 ms while events flow): the flush
    /// point.
    fn batch_done(&mut self, _v: &View<'_>) -> io::Result<()> {
        Ok(())
    }
    /// Every `--interval` (kernel monotonic `now_ns`), with the holders when wanted.
    fn interval(&mut self, _now_ns: u64, _v: &View<'_>) -> io::Result<()> {
        Ok(())
    }
    /// Holders fetched for a [`HolderWant::Periodically`] sink between intervals.
    fn holders(&mut self, _now_ns: u64, _v: &View<'_>) -> io::Result<()> {
        Ok(())
    }
    /// At exit, after the still-open lives were handed to [`Sink::life_ended`], with the
    /// holders when wanted.
    fn finish(&mut self, _now_ns: u64, _v: &View<'_>) -> io::Result<()> {
        Ok(())
    }
}

/// A socket's identity as every JSON record writes it (flattened into the record):
/// `cookie` and `netns` are `null` when unknown (recordings made before tcplens read them).
#[derive(serde::Serialize)]
pub struct JsonId {
    cookie: Option<u64>,
    netns: Option<u32>,
    family: &'static str,
    saddr: std::net::IpAddr,
    sport: u16,
    daddr: std::net::IpAddr,
    dport: u16,
}

impl From<&SocketId> for JsonId {
    fn from(id: &SocketId) -> Self {
        JsonId {
            cookie: (id.cookie != 0).then_some(id.cookie),
            netns: (id.netns != 0).then_some(id.netns),
            family: id.family.name(),
            saddr: id.saddr,
            sport: id.sport,
            daddr: id.daddr,
            dport: id.dport,
        }
    }
}

/// A socket's cgroup as every JSON record writes it (flattened): its id, its path under the
/// cgroup2 root, and the container that path names (`null` when unknown or none).
#[derive(serde::Serialize)]
pub struct JsonCgroup<'a> {
    cgroup_id: Option<u64>,
    cgroup: Option<&'a str>,
    container: Option<&'a str>,
    runtime: Option<&'static str>,
    pod_uid: Option<&'a str>,
}

impl<'a> JsonCgroup<'a> {
    pub fn new(id: u64, name: Option<&'a CgroupName>) -> Self {
        let container = name.and_then(|n| n.container.as_ref());
        JsonCgroup {
            cgroup_id: (id != 0).then_some(id),
            cgroup: name.map(|n| n.path.as_str()),
            container: container.map(|c| c.id.as_str()),
            runtime: container.map(|c| c.runtime.name()),
            pod_uid: container.and_then(|c| c.pod_uid.as_deref()),
        }
    }
}

/// A socket's cgroup for people: its container (`docker:2a55517bd2c9`, the id's first 12
/// digits as `docker ps` shows them), else its path, else its id (`cgroup:1234`: a cgroup
/// removed before tcplens saw it, or a recording's), `-` when unknown.
pub fn cgroup_label(id: u64, name: Option<&CgroupName>) -> String {
    match name {
        Some(CgroupName {
            container: Some(c), ..
        }) => format!("{}:{}", c.runtime.name(), &c.id[..c.id.len().min(12)]),
        Some(n) => escaped(&n.path).into_owned(),
        None if id != 0 => format!("cgroup:{id}"),
        None => "-".to_string(),
    }
}

/// A connection's counters as JSON records write them (flattened; `null` when not read).
#[derive(serde::Serialize)]
pub struct JsonFacts {
    bytes_acked: Option<u64>,
    bytes_received: Option<u64>,
    srtt_us: Option<u32>,
    min_rtt_us: Option<u32>,
    retrans: Option<u32>,
}

impl From<Option<ConnFacts>> for JsonFacts {
    fn from(f: Option<ConnFacts>) -> Self {
        JsonFacts {
            bytes_acked: f.map(|f| f.bytes_acked),
            bytes_received: f.map(|f| f.bytes_received),
            srtt_us: f.map(|f| f.srtt_us),
            min_rtt_us: f.and_then(|f| f.min_rtt_us),
            retrans: f.map(|f| f.retrans),
        }
    }
}

/// A duration for people: `850ns`, `12.5us`, `1.500ms`, `2.250s`, `3m05.125s`,
/// `1h02m00.500s` (milliseconds kept from a second on).
pub fn human_ns(ns: u64) -> String {
    const MIN: u64 = 60_000_000_000;
    let ms_in_minute = |ns: u64| (ns % MIN) as f64 / 1e9;
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.3}ms", ns as f64 / 1e6),
        1_000_000_000..MIN => format!("{:.3}s", ns as f64 / 1e9),
        MIN..3_600_000_000_000 => format!("{}m{:06.3}s", ns / MIN, ms_in_minute(ns)),
        _ => {
            let m = ns / MIN;
            format!("{}h{:02}m{:06.3}s", m / 60, m % 60, ms_in_minute(ns))
        }
    }
}

/// Text that other users control (a task's `comm`, a command line) as safe to print on a
/// terminal: control characters (C0, DEL, C1) become `\xNN`, and a backslash `\\`, so that
/// nothing can move the cursor, recolour or fake a line.
pub fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || c == '\\';
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::human_ns;

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(12_500), "12.5us");
        assert_eq!(human_ns(1_500_000), "1.500ms");
        assert_eq!(human_ns(2_250_000_000), "2.250s");
        assert_eq!(human_ns(61_100_000_000), "1m01.100s");
        assert_eq!(human_ns(61_940_000_000), "1m01.940s");
        assert_eq!(human_ns(185_125_000_000), "3m05.125s");
        assert_eq!(human_ns(3_720_500_000_000), "1h02m00.500s");
    }

    #[test]
    fn control_characters_are_escaped() {
        use super::escaped;
        assert!(matches!(
            escaped("nginx"),
            std::borrow::Cow::Borrowed("nginx")
        ));
        assert_eq!(escaped("\u{1b}[31mevil\nx"), "\\x1b[31mevil\\x0ax");
        assert_eq!(
            escaped("a\\x1b"),
            "a\\\\x1b",
            "a literal backslash cannot fake one"
        );
        assert_eq!(escaped("\u{7f}\u{9b}é"), "\\x7f\\x9bé");
    }
}
