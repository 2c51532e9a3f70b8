//! `leaks`: sockets sitting in CLOSE_WAIT (or `--state`) for at least `--threshold`, with
//! the process holding each, oldest first, and a summary per process.
//!
//! Ages come from the tracker when it saw the socket enter the state; a socket already in
//! it before tracing began is aged from the start of tracing and marked `age_at_least`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::{Format, HolderWant, JsonCgroup, Sink, View, cgroup_label, escaped, human_ns};
use crate::clock::TimeFormatter;
use crate::model::TcpState;
use crate::source::cgroup::{CgroupName, CgroupNames};
use crate::source::kernel::KernelFilter;
use crate::source::procs::Holder;
use crate::source::sockdiag::DiagSocket;
use crate::tracker::{SocketLife, Tracker};

/// One socket in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    pub socket: DiagSocket,
    pub age_ns: u64,
    pub age_at_least: bool,
    pub holder: Option<Holder>,
}

/// Per-process summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessSummary {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    pub count: usize,
    /// Change in count since the previous refresh.
    pub growth: i64,
    pub oldest_ns: u64,
}

/// Sockets of `found` in the state for at least `threshold_ns` at `now_ns`, oldest first.
pub fn leaks(
    found: Vec<(DiagSocket, Option<Holder>)>,
    tracker: &Tracker,
    state: TcpState,
    now_ns: u64,
    start_ns: u64,
    threshold_ns: u64,
) -> Vec<Leak> {
    let mut out: Vec<Leak> = found
        .into_iter()
        .map(|(socket, holder)| {
            // When the tracker saw the socket (by its cookie) enter `state`.
            let entered = tracker
                .socket(socket.id.cookie)
                .filter(|life| life.state() == Some(state))
                .and_then(SocketLife::entered_ns);
            let (age_ns, age_at_least) = match entered {
                Some(at) => (now_ns.saturating_sub(at), false),
                None => (now_ns.saturating_sub(start_ns), true),
            };
            Leak {
                socket,
                age_ns,
                age_at_least,
                holder,
            }
        })
        .filter(|l| l.age_ns >= threshold_ns)
        .collect();
    out.sort_by(|a, b| {
        b.age_ns
            .cmp(&a.age_ns)
            .then(a.socket.id.sport.cmp(&b.socket.id.sport))
    });
    out
}

/// Groups leaks by holding process: most sockets first.
pub fn by_process(leaks: &[Leak], previous: &HashMap<Option<u32>, usize>) -> Vec<ProcessSummary> {
    let mut groups: HashMap<Option<u32>, ProcessSummary> = HashMap::new();
    for l in leaks {
        let pid = l.holder.as_ref().map(|h| h.pid);
        let g = groups.entry(pid).or_insert_with(|| ProcessSummary {
            pid,
            comm: l.holder.as_ref().map(|h| h.comm.clone()),
            cmdline: l.holder.as_ref().map(|h| h.cmdline.clone()),
            count: 0,
            growth: 0,
            oldest_ns: 0,
        });
        g.count += 1;
        g.oldest_ns = g.oldest_ns.max(l.age_ns);
    }
    let mut out: Vec<ProcessSummary> = groups
        .into_values()
        .map(|mut g| {
            g.growth = g.count as i64 - previous.get(&g.pid).copied().unwrap_or(0) as i64;
            g
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.oldest_ns.cmp(&a.oldest_ns))
            .then(a.pid.cmp(&b.pid))
    });
    out
}

#[derive(Serialize)]
struct JsonSocket<'a> {
    cookie: u64,
    netns: u32,
    family: &'static str,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    state: &'static str,
    age_ns: u64,
    age_at_least: bool,
    pid: Option<u32>,
    comm: Option<&'a str>,
    cmdline: Option<&'a str>,
    fd: Option<u32>,
    inode: u64,
    #[serde(flatten)]
    cgroup: JsonCgroup<'a>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    time: String,
    state: &'static str,
    threshold_ns: u64,
    /// How long gathering this report took (sock_diag dump and owner lookup).
    refresh_ns: u64,
    /// Events the kernel lost so far (ring buffer full, recursion): ages may be off.
    lost_events: u64,
    sockets: Vec<JsonSocket<'a>>,
    by_process: &'a [ProcessSummary],
}

/// What a leak report covers.
#[derive(Clone, Debug)]
pub struct LeakQuery {
    pub state: TcpState,
    pub threshold_ns: u64,
    /// Kernel monotonic time tracing started: the age floor of sockets already there.
    pub start_ns: u64,
    /// The command's filters, applied to the snapshot too.
    pub filter: KernelFilter,
    /// `-p PID`: only sockets this process holds.
    pub pid: Option<u32>,
}

pub struct LeaksSink<W: Write> {
    out: W,
    format: Format,
    times: TimeFormatter,
    pub query: LeakQuery,
    previous: HashMap<Option<u32>, usize>,
    /// Whether any report listed a socket (`--fail-on-leak`).
    pub found_any: bool,
    names: CgroupNames,
}

impl<W: Write> LeaksSink<W> {
    pub fn new(out: W, format: Format, times: TimeFormatter, query: LeakQuery) -> Self {
        LeaksSink {
            out,
            format,
            times,
            query,
            previous: HashMap::new(),
            found_any: false,
            names: CgroupNames::none(),
        }
    }

    /// How the sockets' cgroup ids are named (and `--cgroup` applied to the listing).
    #[must_use]
    pub fn with_names(mut self, names: CgroupNames) -> Self {
        self.names = names;
        self
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// A report from the holders the host listed (none: the listing failed, said once by
    /// the pipeline).
    fn refresh(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        let Some(holders) = v.holders else {
            return Ok(());
        };
        let q = &self.query;
        let now_ns = now_ns.max(holders.at_ns);
        let found: Vec<_> = holders
            .sockets
            .iter()
            .filter(|(s, h)| {
                s.state == q.state
                    && q.pid
                        .is_none_or(|pid| h.as_ref().is_some_and(|h| h.pid == pid))
                    && q.filter.keeps_listed(&s.id, s.cgroup, &mut self.names)
            })
            .cloned()
            .collect();
        let list = leaks(
            found,
            v.tracker,
            q.state,
            now_ns,
            q.start_ns,
            q.threshold_ns,
        );
        let procs = by_process(&list, &self.previous);
        self.previous = procs.iter().map(|p| (p.pid, p.count)).collect();
        self.found_any |= !list.is_empty();
        match self.format {
            Format::Json => {
                let lost = v.totals.lost.total();
                self.json(now_ns, holders.took_ns, lost, &list, &procs)?;
            }
            Format::Text => self.text(now_ns, &list, &procs)?,
        }
        self.out.flush()
    }

    fn json(
        &mut self,
        now_ns: u64,
        refresh_ns: u64,
        lost_events: u64,
        list: &[Leak],
        procs: &[ProcessSummary],
    ) -> io::Result<()> {
        let mut time = String::new();
        self.times.rfc3339(now_ns, &mut time);
        let named: Vec<Option<CgroupName>> = list
            .iter()
            .map(|l| self.names.get(l.socket.cgroup).cloned())
            .collect();
        let rec = JsonReport {
            time,
            state: self.query.state.name(),
            threshold_ns: self.query.threshold_ns,
            refresh_ns,
            lost_events,
            sockets: list
                .iter()
                .zip(&named)
                .map(|(l, name)| JsonSocket {
                    cookie: l.socket.id.cookie,
                    netns: l.socket.id.netns,
                    family: l.socket.id.family.name(),
                    saddr: l.socket.id.saddr,
                    sport: l.socket.id.sport,
                    daddr: l.socket.id.daddr,
                    dport: l.socket.id.dport,
                    state: l.socket.state.name(),
                    age_ns: l.age_ns,
                    age_at_least: l.age_at_least,
                    pid: l.holder.as_ref().map(|h| h.pid),
                    comm: l.holder.as_ref().map(|h| h.comm.as_str()),
                    cmdline: l.holder.as_ref().map(|h| h.cmdline.as_str()),
                    fd: l.holder.as_ref().map(|h| h.fd),
                    inode: l.socket.inode,
                    cgroup: JsonCgroup::new(l.socket.cgroup, name.as_ref()),
                })
                .collect(),
            by_process: procs,
        };
        serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }

    fn text(&mut self, now_ns: u64, list: &[Leak], procs: &[ProcessSummary]) -> io::Result<()> {
        let mut s = String::new();
        self.times.time_of_day(now_ns, &mut s);
        let _ = writeln!(
            s,
            "  {} sockets in {} for at least {}",
            list.len(),
            self.query.state,
            human_ns(self.query.threshold_ns)
        );
        if !list.is_empty() {
            let _ = writeln!(
                s,
                "{:<12} {:<7} {:<16} {:<5} {:<10} {:<10} {:<26} {:<26} CGROUP",
                "AGE", "PID", "COMM", "FD", "INODE", "NETNS", "LADDR:LPORT", "RADDR:RPORT"
            );
        }
        for l in list {
            let age = format!(
                "{}{}",
                if l.age_at_least { ">=" } else { "" },
                human_ns(l.age_ns)
            );
            let (pid, comm, fd) = match &l.holder {
                Some(h) => (h.pid.to_string(), escaped(&h.comm), h.fd.to_string()),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let cgroup = cgroup_label(l.socket.cgroup, self.names.get(l.socket.cgroup));
            let _ = writeln!(
                s,
                "{age:<12} {pid:<7} {comm:<16} {fd:<5} {:<10} {:<10} {:<26} {:<26} {cgroup}",
                l.socket.inode,
                l.socket.id.netns,
                SocketAddr::new(l.socket.id.saddr, l.socket.id.sport),
                SocketAddr::new(l.socket.id.daddr, l.socket.id.dport),
            );
        }
        if !procs.is_empty() {
            let _ = writeln!(
                s,
                "{:<7} {:<16} {:>6} {:>7} {:>12}  CMDLINE",
                "PID", "COMM", "COUNT", "GROWTH", "OLDEST"
            );
            for p in procs {
                let _ = writeln!(
                    s,
                    "{:<7} {:<16} {:>6} {:>+7} {:>12}  {}",
                    p.pid.map_or("-".into(), |p| p.to_string()),
                    escaped(p.comm.as_deref().unwrap_or("-")),
                    p.count,
                    p.growth,
                    human_ns(p.oldest_ns),
                    escaped(p.cmdline.as_deref().unwrap_or("")),
                );
            }
        }
        s.push('\n');
        self.out.write_all(s.as_bytes())
    }
}

impl<W: Write> Sink for LeaksSink<W> {
    fn holder_want(&self) -> HolderWant {
        HolderWant::AtIntervals(self.query.state)
    }

    fn interval(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v)
    }

    fn finish(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::WallClock;
    use crate::model::{Family, SocketId, TcpState::*};
    use crate::pipeline::Totals;
    use crate::source::host::Holders;
    use crate::tracker::tests::tr;
    use jiff::tz::TimeZone;

    fn diag(sport: u16, inode: u64) -> DiagSocket {
        DiagSocket {
            id: SocketId {
                family: Family::Ipv4,
                saddr: "127.0.0.1".parse().unwrap(),
                sport,
                daddr: "127.0.0.1".parse().unwrap(),
                dport: 8080,
                netns: crate::tracker::tests::NETNS,
                // The tracker's test sockets have cookies 1, 2, …: keep these apart.
                cookie: 1_000 + u64::from(sport),
            },
            state: CloseWait,
            inode,
            uid: 0,
            cgroup: 0,
            tw_expires_ms: None,
        }
    }

    #[allow(clippy::unnecessary_wraps)] // the shape of a listing's entry
    fn holder(pid: u32, fd: u32) -> Option<Holder> {
        Some(Holder {
            pid,
            fd,
            comm: format!("srv{pid}"),
            cmdline: format!("/bin/srv{pid} --leak"),
        })
    }

    /// A tracker that saw socket 40000 (cookie 41000) enter CLOSE_WAIT at 2 s.
    fn tracker() -> Tracker {
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        let sk = diag(40000, 0).id.cookie;
        t.observe(&tr(sk, 1_000_000_000, Listen, SynRecv, 1), &mut ended);
        t.observe(&tr(sk, 1_500_000_000, SynRecv, Established, 1), &mut ended);
        t.observe(
            &tr(sk, 2_000_000_000, Established, CloseWait, 9),
            &mut ended,
        );
        t
    }

    #[test]
    fn exact_and_at_least_ages_threshold_and_order() {
        // tcplens started at 0.5 s; now is 40 s; threshold 30 s.
        let found = vec![
            (diag(40000, 11), holder(7, 3)),
            (diag(40001, 12), holder(7, 4)),
            (diag(40002, 13), None),
        ];
        let list = leaks(
            found,
            &tracker(),
            CloseWait,
            40_000_000_000,
            500_000_000,
            30_000_000_000,
        );
        let got: Vec<_> = list
            .iter()
            .map(|l| (l.socket.id.sport, l.age_ns, l.age_at_least))
            .collect();
        assert_eq!(
            got,
            [
                (40001, 39_500_000_000, true),
                (40002, 39_500_000_000, true),
                (40000, 38_000_000_000, false)
            ]
        );
        // Below the threshold: not listed.
        let found = vec![(diag(40000, 11), holder(7, 3))];
        assert!(
            leaks(
                found,
                &tracker(),
                CloseWait,
                20_000_000_000,
                500_000_000,
                30_000_000_000
            )
            .is_empty()
        );
    }

    #[test]
    fn per_process_counts_growth_and_order() {
        let found = vec![
            (diag(40001, 12), holder(7, 4)),
            (diag(40002, 13), holder(7, 5)),
            (diag(40003, 14), holder(8, 3)),
        ];
        let list = leaks(found, &Tracker::default(), CloseWait, 10_000_000_000, 0, 1);
        let previous = HashMap::from([(Some(7), 1usize), (Some(8), 3)]);
        let procs = by_process(&list, &previous);
        let got: Vec<_> = procs
            .iter()
            .map(|p| (p.pid, p.count, p.growth, p.oldest_ns))
            .collect();
        assert_eq!(
            got,
            [
                (Some(7), 2, 1, 10_000_000_000),
                (Some(8), 1, -2, 10_000_000_000)
            ]
        );
        assert_eq!(procs[0].cmdline.as_deref(), Some("/bin/srv7 --leak"));
    }

    /// What the host thread would list: at 40 s, in 2 ms.
    fn listed(sockets: Vec<(DiagSocket, Option<Holder>)>) -> Holders {
        Holders {
            at_ns: 40_000_000_000,
            took_ns: 2_000_000,
            sockets,
            ..Holders::default()
        }
    }

    #[test]
    fn json_report_and_filters() {
        let clock = WallClock {
            boot_offset_ns: 1_795_299_000_000_000_000,
        };
        let mut other_port = diag(40009, 99);
        other_port.id.dport = 1234; // dropped by -D 8080
        let mut established = diag(40010, 98);
        established.state = Established; // listed for another sink
        let holders = listed(vec![
            (diag(40000, 11), holder(7, 3)),
            (diag(40001, 12), None),
            (other_port, holder(8, 3)),
            (established, holder(7, 9)),
        ]);
        let query = LeakQuery {
            state: CloseWait,
            threshold_ns: 30_000_000_000,
            start_ns: 0,
            filter: KernelFilter {
                rports: vec![8080],
                ..KernelFilter::default()
            },
            pid: None,
        };
        let mut sink = LeaksSink::new(
            Vec::new(),
            Format::Json,
            TimeFormatter::new(clock, TimeZone::UTC),
            query,
        );
        let totals = Totals {
            lost: crate::source::kernel::Lost {
                ring_full: 2,
                recursion: 1,
            },
            ..Totals::default()
        };
        let tracker = tracker();
        let view = |holders| View {
            totals: &totals,
            tracker: &tracker,
            holders,
        };
        // No listing (it failed): no report.
        sink.interval(39_000_000_000, &view(None)).unwrap();
        assert!(!sink.found_any);
        sink.finish(39_999_000_000, &view(Some(&holders))).unwrap();
        assert!(sink.found_any);
        let out = String::from_utf8(sink.into_inner()).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["time"], "2026-11-21T22:10:40.000000000Z");
        assert_eq!(v["threshold_ns"], 30_000_000_000u64);
        assert_eq!(v["state"], "CLOSE_WAIT");
        assert_eq!(v["lost_events"], 3);
        assert_eq!(v["refresh_ns"], 2_000_000);
        let socks = v["sockets"].as_array().unwrap();
        assert_eq!(socks.len(), 2, "{v}");
        assert_eq!(socks[0]["sport"], 40001);
        assert_eq!(socks[0]["age_at_least"], true);
        assert!(socks[0]["pid"].is_null() && socks[0]["fd"].is_null());
        assert_eq!(socks[1]["sport"], 40000);
        assert_eq!(socks[1]["age_ns"], 38_000_000_000u64);
        assert_eq!(socks[1]["age_at_least"], false);
        assert_eq!(
            (socks[1]["cookie"].as_u64(), socks[1]["netns"].as_u64()),
            (Some(41_000), Some(u64::from(crate::tracker::tests::NETNS)))
        );
        assert_eq!(
            (
                socks[1]["pid"].as_u64(),
                socks[1]["fd"].as_u64(),
                socks[1]["inode"].as_u64()
            ),
            (Some(7), Some(3), Some(11))
        );
        // -p 7: only what process 7 holds.
        let mut only7 = LeaksSink::new(
            Vec::new(),
            Format::Json,
            TimeFormatter::new(clock, TimeZone::UTC),
            LeakQuery {
                state: CloseWait,
                threshold_ns: 1,
                start_ns: 0,
                filter: KernelFilter::default(),
                pid: Some(7),
            },
        );
        let holders = listed(vec![
            (diag(40000, 11), holder(7, 3)),
            (diag(40001, 12), None),
            (diag(40002, 13), holder(8, 4)),
        ]);
        let totals = Totals::default();
        only7
            .finish(
                40_000_000_000,
                &View {
                    totals: &totals,
                    tracker: &tracker,
                    holders: Some(&holders),
                },
            )
            .unwrap();
        let only7: serde_json::Value = serde_json::from_slice(&only7.into_inner()).unwrap();
        let pids: Vec<_> = only7["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["pid"].as_u64())
            .collect();
        assert_eq!(pids, [Some(7)]);
        let procs: Vec<_> = v["by_process"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64())
            .collect();
        assert_eq!(procs, [None, Some(7)]); // one socket each; the unowned one is older
    }
}
