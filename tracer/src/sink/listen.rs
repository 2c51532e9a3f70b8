//! `listen`: the listen path per listener, every `--interval` and at exit: the SYN queue as
//! tcplens followed it (requests waiting now and at most, SYNs queued, completed, expired,
//! aborted, SYN-ACKs retransmitted in the window), the accept queue and backlog as sock_diag
//! shows them (`ss -lnt`'s Recv-Q and Send-Q), the listener's drops in the window, and each
//! namespace's listen counters in the window (ListenOverflows, ListenDrops, SyncookiesSent…).
//!
//! Window counts are differences from the previous report; the first report's start from
//! the listing taken when tracing began (a listener made since starts from zero).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write};

use serde::Serialize;

use super::{Format, HolderWant, JsonId, Sink, View, escaped, human_ns};
use crate::clock::TimeFormatter;
use crate::model::{Family, SocketId, TcpState};
use crate::source::cgroup::CgroupNames;
use crate::source::host::Holders;
use crate::source::kernel::KernelFilter;
use crate::source::netstat::NetnsCounters;
use crate::tracker::ListenerRequests;

/// One listener in a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerRow {
    pub id: SocketId,
    /// The process holding it (pid, comm), when known.
    pub owner: Option<(u32, String)>,
    /// As sock_diag lists it: accept queue, backlog, and its drops (`sk_drops`) in the
    /// window. `None` for a listener that closed in the window.
    pub queues: Option<(u32, u32, u32)>,
    /// Requests waiting now (`queued`) and most at once in the window (`peak`); the rest
    /// in the window.
    pub requests: ListenerRequests,
}

#[derive(Serialize)]
struct JsonListener<'a> {
    #[serde(flatten)]
    id: JsonId,
    owner_pid: Option<u32>,
    owner_comm: Option<&'a str>,
    syn_queue: u32,
    syn_queue_peak: u32,
    /// `null`: the listener closed in the window.
    accept_queue: Option<u32>,
    backlog: Option<u32>,
    syns: u64,
    completed: u64,
    expired: u64,
    aborted: u64,
    synack_retrans: u64,
    drops: Option<u32>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    time: &'a str,
    window_ns: u64,
    listeners: Vec<JsonListener<'a>>,
    namespaces: &'a [NetnsCounters],
}

pub struct ListenSink<W: Write> {
    out: W,
    format: Format,
    times: TimeFormatter,
    filter: KernelFilter,
    names: CgroupNames,
    window_start_ns: Option<u64>,
    /// At the previous report (or the start): each listener's request counts and drops,
    /// by cookie, and each namespace's counters.
    requests_then: HashMap<u64, ListenerRequests>,
    drops_then: HashMap<u64, u32>,
    counters_then: HashMap<u32, NetnsCounters>,
    /// The start listing was taken: later listings outside a report (one that came for a
    /// report the next interval overtook) move no baseline.
    based: bool,
}

impl<W: Write> ListenSink<W> {
    /// `names`: to apply `--cgroup` to the listeners sock_diag lists.
    pub fn new(
        out: W,
        format: Format,
        times: TimeFormatter,
        filter: KernelFilter,
        names: CgroupNames,
    ) -> Self {
        ListenSink {
            out,
            format,
            times,
            filter,
            names,
            window_start_ns: None,
            requests_then: HashMap::new(),
            drops_then: HashMap::new(),
            counters_then: HashMap::new(),
            based: false,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// The report's rows and namespaces, and the baselines moved to now.
    fn rows(&mut self, v: &View<'_>, h: &Holders) -> (Vec<ListenerRow>, Vec<NetnsCounters>) {
        let owners: HashMap<u64, (u32, String)> = h
            .sockets
            .iter()
            .filter(|(s, _)| s.state == TcpState::Listen)
            .filter_map(|(s, holder)| Some((s.id.cookie, holder.as_ref()?)))
            .map(|(cookie, hd)| (cookie, (hd.pid, hd.comm.clone())))
            .collect();
        let requests = v.tracker.requests();
        let window = |cookie: u64| {
            let now = requests
                .listeners()
                .get(&cookie)
                .copied()
                .unwrap_or_default();
            let then = self.requests_then.get(&cookie).copied().unwrap_or_default();
            ListenerRequests {
                queued: now.queued,
                peak: now.peak,
                syns: now.syns - then.syns,
                completed: now.completed - then.completed,
                expired: now.expired - then.expired,
                aborted: now.aborted - then.aborted,
                synack_retrans: now.synack_retrans - then.synack_retrans,
            }
        };
        let mut rows: Vec<ListenerRow> = h
            .listeners
            .iter()
            .filter(|l| {
                self.filter
                    .keeps_listed_listener(&l.id, l.cgroup, &mut self.names)
            })
            .map(|l| {
                let cookie = l.id.cookie;
                let drops_then = self.drops_then.get(&cookie).copied().unwrap_or(0);
                let owner = owners.get(&cookie).cloned().or_else(|| {
                    let o = v.tracker.socket(cookie)?.owner?;
                    Some((o.pid, o.comm.to_str_lossy().into_owned()))
                });
                ListenerRow {
                    id: l.id,
                    owner,
                    queues: Some((l.accept_queue, l.backlog, l.drops.wrapping_sub(drops_then))),
                    requests: window(cookie),
                }
            })
            .collect();
        // Listeners that closed in the window: their last counts, no queues.
        let listed: HashSet<u64> = h.listeners.iter().map(|l| l.id.cookie).collect();
        for &cookie in requests.listeners().keys() {
            if let Some((id, owner)) = requests.closed_listener(cookie)
                && !listed.contains(&cookie)
                && self.filter.keeps_listener(id)
            {
                rows.push(ListenerRow {
                    id: *id,
                    owner: owner.map(|o| (o.pid, o.comm.to_str_lossy().into_owned())),
                    queues: None,
                    requests: window(cookie),
                });
            }
        }
        rows.sort_by_key(|r| (r.id.netns, r.id.sport, r.id.saddr));
        let shown: HashSet<u32> = rows.iter().map(|r| r.id.netns).collect();
        let namespaces: Vec<NetnsCounters> = h
            .counters
            .iter()
            .filter(|c| self.filter.netns.is_none_or(|n| n == c.netns))
            .map(|c| c.since(self.counters_then.get(&c.netns)))
            .filter(|w| shown.contains(&w.netns) || !w.is_zero())
            .collect();
        let reported: HashSet<u64> = rows.iter().map(|r| r.id.cookie).collect();
        self.baseline(v, h, Some(&reported));
        (rows, namespaces)
    }

    /// What the next window's counts start from: now, for the listeners just `reported`
    /// (all of them when `None`). A listener the listing missed (made after the dump, its
    /// SYNs already counted) keeps its window open until a report shows it.
    fn baseline(&mut self, v: &View<'_>, h: &Holders, reported: Option<&HashSet<u64>>) {
        self.requests_then = v
            .tracker
            .requests()
            .listeners()
            .iter()
            .map(|(&cookie, now)| {
                let then = if reported.is_none_or(|r| r.contains(&cookie)) {
                    *now
                } else {
                    self.requests_then.get(&cookie).copied().unwrap_or_default()
                };
                (cookie, then)
            })
            .collect();
        self.drops_then = h.listeners.iter().map(|l| (l.id.cookie, l.drops)).collect();
        // Merged, not replaced: a namespace one listing missed (its counters unreadable for
        // a moment) must not count from zero when the next one shows it again. (A
        // namespace whose inode came back with smaller counters counts from zero:
        // `NetnsCounters::since`.)
        for c in &h.counters {
            self.counters_then.insert(c.netns, *c);
        }
    }

    fn report(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        let Some(h) = v.holders else {
            return Ok(()); // the listing failed (said once by the live loop)
        };
        let window_ns = now_ns.saturating_sub(self.window_start_ns.unwrap_or(now_ns));
        self.window_start_ns = Some(now_ns);
        let (rows, namespaces) = self.rows(v, h);
        match self.format {
            Format::Json => {
                let mut time = String::new();
                self.times.rfc3339(now_ns, &mut time);
                let rec = JsonReport {
                    time: &time,
                    window_ns,
                    listeners: rows.iter().map(json_row).collect(),
                    namespaces: &namespaces,
                };
                serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
                self.out.write_all(b"\n")?;
            }
            Format::Text => {
                let text = self.text(now_ns, window_ns, &rows, &namespaces);
                self.out.write_all(text.as_bytes())?;
            }
        }
        self.out.flush()
    }

    fn text(
        &mut self,
        now_ns: u64,
        window_ns: u64,
        rows: &[ListenerRow],
        namespaces: &[NetnsCounters],
    ) -> String {
        let mut s = String::new();
        self.times.time_of_day(now_ns, &mut s);
        let _ = writeln!(
            s,
            "  {} listeners, window {}",
            rows.len(),
            human_ns(window_ns)
        );
        let _ = writeln!(
            s,
            "{:<11} {:<28} {:<20} {:>5} {:>5} {:>8} {:>7} {:>6} {:>6} {:>7} {:>7} {:>6} {:>6}",
            "NETNS",
            "LISTENER",
            "OWNER",
            "SYN-Q",
            "PEAK",
            "ACCEPT-Q",
            "BACKLOG",
            "SYNS",
            "DONE",
            "EXPIRED",
            "ABORTED",
            "RTX",
            "DROPS"
        );
        for r in rows {
            let owner = r.owner.as_ref().map_or_else(
                || "-".to_string(),
                |(pid, comm)| format!("{}[{pid}]", escaped(comm)),
            );
            let q = &r.requests;
            let [accept_queue, backlog, drops] = match r.queues {
                Some((queue, limit, dropped)) => [queue, limit, dropped].map(|n| n.to_string()),
                None => ["-", "-", "-"].map(String::from),
            };
            let _ = writeln!(
                s,
                "{:<11} {:<28} {:<20} {:>5} {:>5} {:>8} {:>7} {:>6} {:>6} {:>7} {:>7} {:>6} {:>6}",
                r.id.netns,
                listener_address(&r.id),
                owner,
                q.queued,
                q.peak,
                accept_queue,
                backlog,
                q.syns,
                q.completed,
                q.expired,
                q.aborted,
                q.synack_retrans,
                drops
            );
        }
        for n in namespaces {
            let _ = writeln!(
                s,
                "netns {}: ListenOverflows {}, ListenDrops {}, SyncookiesSent {}, TCPReqQFullDrop {}, TCPReqQFullDoCookies {}, TCPSynRetrans {}",
                n.netns,
                n.listen_overflows,
                n.listen_drops,
                n.syncookies_sent,
                n.req_q_full_drop,
                n.req_q_full_do_cookies,
                n.syn_retrans
            );
        }
        s.push('\n');
        s
    }
}

/// `127.0.0.1:8080`, `[::]:8080`.
fn listener_address(id: &SocketId) -> String {
    match id.family {
        Family::Ipv4 => format!("{}:{}", id.saddr, id.sport),
        Family::Ipv6 => format!("[{}]:{}", id.saddr, id.sport),
    }
}

fn json_row(r: &ListenerRow) -> JsonListener<'_> {
    let q = &r.requests;
    JsonListener {
        id: (&r.id).into(),
        owner_pid: r.owner.as_ref().map(|o| o.0),
        owner_comm: r.owner.as_ref().map(|o| o.1.as_str()),
        syn_queue: q.queued,
        syn_queue_peak: q.peak,
        accept_queue: r.queues.map(|q| q.0),
        backlog: r.queues.map(|q| q.1),
        syns: q.syns,
        completed: q.completed,
        expired: q.expired,
        aborted: q.aborted,
        synack_retrans: q.synack_retrans,
        drops: r.queues.map(|q| q.2),
    }
}

impl<W: Write> Sink for ListenSink<W> {
    fn holder_want(&self) -> HolderWant {
        HolderWant::AtIntervals(TcpState::Listen)
    }

    fn started(&mut self, start_ns: Option<u64>) -> io::Result<()> {
        self.window_start_ns = start_ns;
        Ok(())
    }

    /// The listing taken when tracing began: the first window's counts start from it. A
    /// listing that comes outside a report later (asked for a report the next interval
    /// overtook, seen on 6.1 under emulation) is not one: moving the baselines to it
    /// would drop its window's counts.
    fn holders(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        if let Some(h) = v.holders
            && !std::mem::replace(&mut self.based, true)
        {
            self.baseline(v, h, None);
            self.window_start_ns.get_or_insert(now_ns);
        }
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.report(now_ns, v)
    }

    fn finish(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.report(now_ns, v)
    }
}

#[cfg(test)]
mod tests {
    use jiff::tz::TimeZone;

    use super::*;
    use crate::clock::WallClock;
    use crate::model::TimerOp;
    use crate::pipeline::Totals;
    use crate::source::sockdiag::ListenerQueue;
    use crate::tracker::Tracker;
    use crate::tracker::tests::{request_of, tr};

    const S: u64 = 1_000_000_000;

    fn sink(format: Format) -> ListenSink<Vec<u8>> {
        let clock = WallClock {
            boot_offset_ns: 1_795_299_000_000_000_000,
        };
        ListenSink::new(
            Vec::new(),
            format,
            TimeFormatter::new(clock, TimeZone::UTC),
            KernelFilter::default(),
            CgroupNames::none(),
        )
    }

    /// The listener of `tr`'s sockets (cookie 50 as the requests say), as sock_diag lists
    /// it, with `drops`; and its namespace's counters.
    fn listed(drops: u32, overflows: u64) -> Holders {
        let mut id = tr(50, 0, TcpState::Close, TcpState::Listen, 1).id;
        id.cookie = 50;
        Holders {
            listeners: vec![ListenerQueue {
                id,
                inode: 77,
                cgroup: 0,
                accept_queue: 2,
                backlog: 1,
                drops,
            }],
            counters: vec![NetnsCounters {
                netns: id.netns,
                listen_overflows: overflows,
                listen_drops: overflows,
                syncookies_sent: 0,
                syn_retrans: 0,
                req_q_full_drop: 0,
                req_q_full_do_cookies: 0,
            }],
            ..Holders::default()
        }
    }

    /// Two SYNs at the listener: one completes, one waits.
    fn tracker() -> Tracker {
        let mut t = Tracker::default();
        let child = tr(7, 2 * S, TcpState::Listen, TcpState::SynRecv, 0);
        t.request(&request_of(&child, TimerOp::Arm, 0xa, S));
        let mut waiting = request_of(&child, TimerOp::Arm, 0xb, S + 1);
        waiting.id.dport += 1;
        t.request(&waiting);
        t.observe(&child, &mut Vec::new());
        t
    }

    #[test]
    fn a_report_counts_the_window_from_the_start_listing() {
        let mut s = sink(Format::Json);
        let mut t = Tracker::default();
        let totals = Totals::default();
        // At the start: 3 drops and 3 overflows already.
        let start = listed(3, 3);
        let v = View {
            totals: &totals,
            tracker: &t,
            holders: Some(&start),
        };
        s.started(Some(0)).unwrap();
        s.holders(0, &v).unwrap();
        t = tracker();
        let now = listed(5, 4);
        let v = View {
            totals: &totals,
            tracker: &t,
            holders: Some(&now),
        };
        s.interval(3 * S, &v).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        let rec: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let l = &rec["listeners"][0];
        assert_eq!(rec["window_ns"], 3 * S);
        assert_eq!(
            (l["sport"].as_u64(), l["cookie"].as_u64()),
            (Some(40000), Some(50))
        );
        assert_eq!(
            [
                "syn_queue",
                "syn_queue_peak",
                "syns",
                "completed",
                "accept_queue",
                "backlog",
                "drops"
            ]
            .map(|f| l[f].as_u64()),
            [1, 2, 2, 1, 2, 1, 2].map(Some),
            "{rec}"
        );
        assert_eq!(rec["namespaces"][0]["listen_overflows"], 1, "{rec}");
    }

    /// A listing that missed the namespace's counters does not reset their baseline: the
    /// next window counts from the last one seen (seen on 6.1 under emulation: the
    /// overflows were counted twice).
    #[test]
    fn a_namespace_missing_from_one_listing_is_not_counted_twice() {
        let mut s = sink(Format::Json);
        let t = Tracker::default();
        let totals = Totals::default();
        let view = |h| View {
            totals: &totals,
            tracker: &t,
            holders: Some(h),
        };
        let (start, three) = (listed(0, 0), listed(3, 3));
        let mut missing = listed(3, 3);
        missing.counters.clear();
        s.started(Some(0)).unwrap();
        s.holders(0, &view(&start)).unwrap();
        s.interval(S, &view(&three)).unwrap();
        s.interval(2 * S, &view(&missing)).unwrap();
        // A listing outside a report (its report was overtaken): no baseline moves.
        let five = listed(5, 5);
        s.holders(3 * S, &view(&five)).unwrap();
        s.interval(3 * S, &view(&three)).unwrap();
        s.interval(4 * S, &view(&five)).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        let overflows: Vec<u64> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| {
                r["namespaces"].as_array().map_or(0, |n| {
                    n.iter()
                        .filter_map(|c| c["listen_overflows"].as_u64())
                        .sum()
                })
            })
            .collect();
        assert_eq!(overflows, [3, 0, 0, 2], "{out}");
    }

    #[test]
    fn text_has_a_row_per_listener_and_a_line_per_namespace() {
        let mut s = sink(Format::Text);
        let t = tracker();
        let totals = Totals::default();
        let h = listed(3, 3);
        let v = View {
            totals: &totals,
            tracker: &t,
            holders: Some(&h),
        };
        s.interval(S, &v).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "22:10:01.000  1 listeners, window 0ns", "{out}");
        assert!(lines[1].starts_with("NETNS       LISTENER"), "{out}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "4026531840",
                "127.0.0.1:40000",
                "-",
                "1",
                "2",
                "2",
                "1",
                "2",
                "1",
                "0",
                "0",
                "0",
                "3"
            ],
            "{out}"
        );
        assert!(
            lines[3].starts_with("netns 4026531840: ListenOverflows 3, ListenDrops 3"),
            "{out}"
        );
    }

    #[test]
    fn a_listener_the_listing_missed_keeps_its_counts_for_the_next_report() {
        let mut s = sink(Format::Json);
        let t = tracker();
        let totals = Totals::default();
        // Dumped just before the listener was made: its SYNs are counted, it is not listed.
        let missed = Holders::default();
        let listed = listed(0, 0);
        for h in [&missed, &listed] {
            let v = View {
                totals: &totals,
                tracker: &t,
                holders: Some(h),
            };
            s.interval(S, &v).unwrap();
        }
        let out = String::from_utf8(s.into_inner()).unwrap();
        let reports: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(reports[0]["listeners"].as_array().map(Vec::len), Some(0));
        let l = &reports[1]["listeners"][0];
        assert_eq!(
            (l["syns"].as_u64(), l["completed"].as_u64()),
            (Some(2), Some(1)),
            "{out}"
        );
    }
}
