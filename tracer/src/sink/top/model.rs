//! `top`'s model: what the screen shows, as a pure function of the tracker and of the
//! transitions seen since the last refresh. No terminal here: [`super::render`] draws a
//! [`Screen`], and the tests build one from synthetic streams.
//!
//! Sockets per state are the tracker's (recounted per group at every refresh); rates and
//! time-in-state histograms come from the transitions between refreshes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use hdrhistogram::Histogram;

use crate::model::{TcpState, Transition};
use crate::sink::cgroup_label;
use crate::sink::leaks::{Leak, leaks};
use crate::source::cgroup::CgroupNames;
use crate::source::host::Holders;
use crate::source::kernel::KernelFilter;
use crate::tracker::{FastMap, GroupCounts, Observed, Role, SocketLife, Tracker};

/// How many refreshes the header's sparklines keep (at the default 1 s, five minutes).
pub const HISTORY: usize = 300;
/// Groups of a view that keep time-in-state histograms; past it the one idle longest
/// gives up its own (each is a few KiB per state it saw).
pub const MAX_HISTOGRAM_GROUPS: usize = 128;
/// A group with no socket left and no activity for this long is forgotten.
const FORGET_NS: u64 = 600_000_000_000;
/// Highest recorded time in a state: an hour (longer ones count as an hour).
const MAX_HIST_NS: u64 = 3_600_000_000_000;
/// Most leaks the leaks pane keeps (oldest first).
const MAX_LEAKS: usize = 64;

/// What the table's rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViewKind {
    /// A row per owner process (sockets of no known owner share one).
    Processes,
    /// A row per cgroup: its container when its path names one.
    Containers,
    /// A row per listener (namespace and port): its own socket and those it accepted.
    Listeners,
}

impl ViewKind {
    pub const ALL: [ViewKind; 3] = [
        ViewKind::Processes,
        ViewKind::Containers,
        ViewKind::Listeners,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ViewKind::Processes => "processes",
            ViewKind::Containers => "containers",
            ViewKind::Listeners => "listeners",
        }
    }

    #[must_use]
    pub fn next(self) -> ViewKind {
        match self {
            ViewKind::Processes => ViewKind::Containers,
            ViewKind::Containers => ViewKind::Listeners,
            ViewKind::Listeners => ViewKind::Processes,
        }
    }
}

/// A row's identity within its view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKey {
    /// An owner process; pid 0: no owner known.
    Process(u32),
    /// A cgroup id; 0: not shown by the kernel.
    Cgroup(u64),
    /// A listener: its network namespace and local port.
    Listener(u32, u16),
}

/// The states the table and the header show a column for, in the order of a connection's
/// life (CLOSE and NEW_SYN_RECV are never a socket's state for long).
pub const SHOWN: [TcpState; 10] = [
    TcpState::Listen,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::TimeWait,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
];

/// Time-in-state histograms, ns, 2 significant digits, 32-bit counts, resized up to the
/// largest value seen.
pub type StateHist = Histogram<u32>;

fn new_hist() -> StateHist {
    Histogram::new(2).unwrap_or_else(|_| unreachable!("2 significant digits is valid"))
}

/// What a group did since tracing began (histograms) and since the last refresh (counts).
#[derive(Default)]
struct Activity {
    /// The latest name seen (a process's comm).
    name: String,
    connects: u64,
    accepts: u64,
    /// Connects and accepts per second over the last refresh window.
    rates: (f64, f64),
    /// Time in each state, by kernel state number (`None`: none seen, or this group gave
    /// up its histograms to a busier one).
    hists: Option<Box<[Option<StateHist>; 13]>>,
    last_active_ns: u64,
}

/// One view's groups.
#[derive(Default)]
struct Groups {
    by_key: HashMap<GroupKey, Activity>,
    with_hists: usize,
}

impl Groups {
    fn touch(&mut self, key: GroupKey, now_ns: u64) -> &mut Activity {
        let a = self.by_key.entry(key).or_default();
        a.last_active_ns = a.last_active_ns.max(now_ns);
        a
    }

    /// The histograms of `key` (a group already touched), given to it if it has none:
    /// taken from the group idle longest at the cap.
    fn hists_of(&mut self, key: GroupKey) -> Option<&mut [Option<StateHist>; 13]> {
        if self.by_key.get(&key)?.hists.is_none() {
            if self.with_hists >= MAX_HISTOGRAM_GROUPS {
                let idle = self
                    .by_key
                    .iter()
                    .filter(|(k, a)| a.hists.is_some() && **k != key)
                    .min_by_key(|(_, a)| a.last_active_ns)
                    .map(|(k, _)| *k);
                if let Some(a) = idle.and_then(|k| self.by_key.get_mut(&k)) {
                    a.hists = None;
                    self.with_hists -= 1;
                }
            }
            self.with_hists += 1;
        }
        let a = self.by_key.get_mut(&key)?;
        Some(a.hists.get_or_insert_with(Box::default))
    }

    /// Forgets groups idle since `before_ns` that have no socket (`live`).
    fn forget_idle(&mut self, before_ns: u64, live: impl Fn(&GroupKey) -> bool) {
        let mut freed = 0;
        self.by_key.retain(|k, a| {
            let keep = a.last_active_ns >= before_ns || live(k);
            if !keep && a.hists.is_some() {
                freed += 1;
            }
            keep
        });
        self.with_hists -= freed;
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: GroupKey,
    /// What identifies it: a pid, a cgroup id, a namespace.
    pub id: String,
    /// What people call it: a command, a container or cgroup path, an address.
    pub name: String,
    /// Sockets per state now, by kernel state number.
    pub states: [u64; 13],
    pub total: u64,
    /// Per second over the last refresh window.
    pub connects: f64,
    pub accepts: f64,
    /// How long its oldest CLOSE_WAIT socket has been in it (`at_least`: it was already
    /// there when tracing began).
    pub oldest_close_wait: Option<(u64, bool)>,
}

/// The selected row's detail: time in each state it saw, and one state's distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Detail {
    /// State, count, p50, p99 (ns).
    pub states: Vec<(TcpState, u64, u64, u64)>,
    /// The state whose distribution is drawn, with its counts per decade bucket
    /// ([`DECADES`]).
    pub histogram: Option<(TcpState, [u64; DECADES.len()])>,
}

/// Upper bounds of the detail histogram's buckets (ns), the last one open.
pub const DECADES: [(&str, u64); 9] = [
    ("<10us", 10_000),
    ("<100us", 100_000),
    ("<1ms", 1_000_000),
    ("<10ms", 10_000_000),
    ("<100ms", 100_000_000),
    ("<1s", 1_000_000_000),
    ("<10s", 10_000_000_000),
    ("<1m", 60_000_000_000),
    (">=1m", u64::MAX),
];

/// One socket of the leaks pane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakRow {
    pub pid: Option<u32>,
    pub comm: String,
    pub fd: Option<u32>,
    pub age_ns: u64,
    pub age_at_least: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Everything one refresh computed: the rows of the current view (unsorted, unfiltered:
/// the keys re-sort and filter them without a new refresh).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Refresh {
    /// Kernel monotonic time of the refresh.
    pub now_ns: u64,
    /// Its wall time of day, as the header prints it.
    pub clock: String,
    pub states_now: [u64; 13],
    /// Sockets per state at each past refresh, oldest first.
    pub history: VecDeque<[u64; 13]>,
    pub transitions_per_s: f64,
    pub new_per_s: f64,
    pub lost: u64,
    pub rows: Vec<Row>,
    /// The CLOSE_WAIT sockets the last holder listing showed, oldest first.
    pub leaks: Vec<LeakRow>,
    /// Whether the holders were ever listed (the leaks pane says "waiting" before).
    pub leaks_listed: bool,
}

/// The aggregate `top` keeps between refreshes.
pub struct TopModel {
    groups: [Groups; 3],
    /// Transitions, and connects + accepts, since the window started.
    transitions: u64,
    new_connections: u64,
    window_start_ns: Option<u64>,
    pub refresh: Refresh,
    /// `-p PID`: only sockets this process owns.
    pub owner_pid: Option<u32>,
    /// Applied to the holders' sockets (the kernel applies it to the events).
    pub filter: KernelFilter,
    pub names: CgroupNames,
    /// Kernel monotonic time tracing began: the age floor of sockets already there.
    pub start_ns: Option<u64>,
    /// The CLOSE_WAIT sockets of the last holder listing: cookie, age, `at_least`.
    close_wait: Vec<(u64, u64, bool)>,
}

/// A socket's row in the listeners' view, as the tracker counts them: a listener's and
/// the connections it accepted are (namespace, local port).
fn listener_key(role: Role, netns: u32, sport: u16) -> Option<GroupKey> {
    matches!(role, Role::Listener | Role::Passive).then_some(GroupKey::Listener(netns, sport))
}

fn view_index(v: ViewKind) -> usize {
    match v {
        ViewKind::Processes => 0,
        ViewKind::Containers => 1,
        ViewKind::Listeners => 2,
    }
}

impl TopModel {
    pub fn new(filter: KernelFilter, names: CgroupNames) -> Self {
        TopModel {
            groups: Default::default(),
            transitions: 0,
            new_connections: 0,
            window_start_ns: None,
            refresh: Refresh::default(),
            owner_pid: None,
            filter,
            names,
            start_ns: None,
            close_wait: Vec::new(),
        }
    }

    /// Tracing began at `start_ns` (live), or with the first event (a replay, `None`): the
    /// first rate window starts there.
    pub fn started(&mut self, start_ns: Option<u64>) {
        self.start_ns = start_ns;
        self.window_start_ns = start_ns;
    }

    /// One transition of the TCP view.
    pub fn transition(&mut self, t: &Transition, o: &Observed) {
        let now = t.ts_ns;
        self.window_start_ns.get_or_insert(now);
        self.transitions += 1;
        let connect = t.new == TcpState::SynSent;
        let accept = t.old == TcpState::SynRecv && t.new == TcpState::Established;
        self.new_connections += u64::from(connect || accept);
        let keys = [
            Some(GroupKey::Process(o.owner.map_or(0, |o| o.pid))),
            Some(GroupKey::Cgroup(t.cgroup)),
            listener_key(o.role, t.id.netns, o.sport),
        ];
        for (groups, key) in self.groups.iter_mut().zip(keys) {
            let Some(key) = key else { continue };
            let a = groups.touch(key, now);
            if let (GroupKey::Process(_), Some(owner)) = (key, o.owner) {
                let comm = owner.comm.to_str_lossy();
                if a.name != comm {
                    a.name = comm.into_owned();
                }
            }
            a.connects += u64::from(connect);
            a.accepts += u64::from(accept);
            let Some(ns) = o.old_ns else { continue };
            let hists = match a.hists.as_deref_mut() {
                Some(h) => h,
                None => match groups.hists_of(key) {
                    Some(h) => h,
                    None => continue,
                },
            };
            let _ = hists[t.old as usize]
                .get_or_insert_with(new_hist)
                .record(ns.clamp(1, MAX_HIST_NS));
        }
    }

    fn key_of(view: ViewKind, life: &SocketLife) -> Option<GroupKey> {
        match view {
            ViewKind::Processes => Some(GroupKey::Process(life.owner.map_or(0, |o| o.pid))),
            ViewKind::Containers => Some(GroupKey::Cgroup(life.cgroup)),
            ViewKind::Listeners => listener_key(life.role, life.id.netns, life.id.sport),
        }
    }

    /// A refresh at `now_ns`: sockets per state from the tracker, rates over the window
    /// since the last one, the rows of `view`, and the leaks pane from `holders` when
    /// listed. Returns what it computed.
    pub fn refresh(
        &mut self,
        now_ns: u64,
        clock: String,
        view: ViewKind,
        tracker: &Tracker,
        lost: u64,
        holders: Option<&Holders>,
    ) -> &Refresh {
        let secs = self
            .window_start_ns
            .map(|s| now_ns.saturating_sub(s) as f64 / 1e9)
            .filter(|&s| s > 0.0);
        let per_s = |n: u64| secs.map_or(0.0, |s| n as f64 / s);
        let r = &mut self.refresh;
        r.now_ns = now_ns;
        r.clock = clock;
        r.states_now = tracker.state_counts();
        if r.history.len() == HISTORY {
            r.history.pop_front();
        }
        r.history.push_back(r.states_now);
        r.transitions_per_s = per_s(self.transitions);
        r.lost = lost;
        r.new_per_s = per_s(self.new_connections);
        // The window closes: its rates stay until the next.
        self.transitions = 0;
        self.new_connections = 0;
        self.window_start_ns = Some(now_ns);
        for g in &mut self.groups {
            for a in g.by_key.values_mut() {
                a.rates = (per_s(a.connects), per_s(a.accepts));
                a.connects = 0;
                a.accepts = 0;
            }
        }
        if let Some(h) = holders {
            self.leaks(now_ns, tracker, h);
        }
        self.rows(now_ns, view, tracker);
        &self.refresh
    }

    /// The rows of `view` at `now_ns`: its groups' sockets per state (from the tracker),
    /// and their rates over the last refresh window.
    pub fn rows(&mut self, now_ns: u64, view: ViewKind, tracker: &Tracker) {
        let mut rows = match tracker.group_counts() {
            // -p counts only some of a group's sockets: each socket is looked at.
            Some(g) if self.owner_pid.is_none() => self.counted_rows(view, tracker, g),
            _ => self.walked_rows(now_ns, view, tracker),
        };
        let mut names: HashMap<u64, String> = HashMap::new();
        let groups = &mut self.groups[view_index(view)];
        groups.forget_idle(now_ns.saturating_sub(FORGET_NS), |k| rows.contains_key(k));
        for (key, a) in &groups.by_key {
            if a.rates == (0.0, 0.0) && !rows.contains_key(key) {
                continue;
            }
            let row = rows.entry(*key).or_insert_with(|| Row::empty(*key));
            (row.connects, row.accepts) = a.rates;
            if !a.name.is_empty() {
                row.name.clone_from(&a.name);
            }
        }
        let mut out: Vec<Row> = rows.into_values().collect();
        for row in &mut out {
            match row.key {
                GroupKey::Process(0) => {
                    row.id = "-".into();
                    row.name = "(no owner known)".into();
                }
                GroupKey::Process(pid) => row.id = pid.to_string(),
                GroupKey::Cgroup(id) => {
                    row.id = if id == 0 { "-".into() } else { id.to_string() };
                    row.name.clone_from(
                        names
                            .entry(id)
                            .or_insert_with(|| cgroup_label(id, self.names.get(id))),
                    );
                }
                GroupKey::Listener(netns, port) => {
                    row.id = netns.to_string();
                    row.name = format!(":{port}");
                }
            }
        }
        self.refresh.rows = out;
    }

    /// The rows of `view` from the tracker's per-group counts (no socket walked), their
    /// oldest CLOSE_WAIT from the last holder listing's.
    pub(crate) fn counted_rows(
        &self,
        view: ViewKind,
        tracker: &Tracker,
        g: &GroupCounts,
    ) -> FastMap<GroupKey, Row> {
        let mut rows: FastMap<GroupKey, Row> = FastMap::default();
        let mut add = |key: GroupKey, states: &[u64; 13]| {
            let row = rows.entry(key).or_insert_with(|| Row::empty(key));
            row.states = *states;
            row.total = states.iter().sum();
        };
        match view {
            ViewKind::Processes => {
                for (&pid, s) in &g.by_owner {
                    add(GroupKey::Process(pid), s);
                }
            }
            ViewKind::Containers => {
                for (&id, s) in &g.by_cgroup {
                    add(GroupKey::Cgroup(id), s);
                }
            }
            ViewKind::Listeners => {
                for (&(netns, port), s) in &g.by_listener {
                    add(GroupKey::Listener(netns, port), s);
                }
            }
        }
        // Owners seen only in the start-up snapshot (listeners'): named from it.
        if view == ViewKind::Processes {
            for listener in tracker.listeners() {
                if let Some(o) = listener.owner
                    && let Some(row) = rows.get_mut(&GroupKey::Process(o.pid))
                    && row.name.is_empty()
                {
                    row.name = o.comm.to_str_lossy().into_owned();
                }
            }
        }
        for &(cookie, age, at_least) in &self.close_wait {
            let key = tracker.socket(cookie).and_then(|l| Self::key_of(view, l));
            if let Some(row) = key.and_then(|k| rows.get_mut(&k))
                && row.oldest_close_wait.is_none_or(|(a, _)| age > a)
            {
                row.oldest_close_wait = Some((age, at_least));
            }
        }
        rows
    }

    /// The rows of `view` from every tracked socket.
    pub(crate) fn walked_rows(
        &self,
        now_ns: u64,
        view: ViewKind,
        tracker: &Tracker,
    ) -> FastMap<GroupKey, Row> {
        let start_ns = self.start_ns.unwrap_or(0);
        let mut rows: FastMap<GroupKey, Row> = FastMap::default();
        for (life, state) in tracker.sockets_in_states() {
            if self
                .owner_pid
                .is_some_and(|pid| life.owner.is_none_or(|o| o.pid != pid))
            {
                continue;
            }
            let (Some(state), Some(key)) = (state, Self::key_of(view, life)) else {
                continue;
            };
            let row = rows.entry(key).or_insert_with(|| Row::empty(key));
            row.states[state as usize] += 1;
            row.total += 1;
            if let (GroupKey::Process(_), Some(o)) = (key, life.owner)
                && row.name.is_empty()
            {
                row.name = o.comm.to_str_lossy().into_owned();
            }
            if state == TcpState::CloseWait {
                let (age, at_least) = match life.entered_ns() {
                    Some(at) => (now_ns.saturating_sub(at), false),
                    None => (now_ns.saturating_sub(start_ns), true),
                };
                if row.oldest_close_wait.is_none_or(|(a, _)| age > a) {
                    row.oldest_close_wait = Some((age, at_least));
                }
            }
        }
        rows
    }

    /// The leaks pane: the CLOSE_WAIT sockets `holders` lists, oldest first.
    fn leaks(&mut self, now_ns: u64, tracker: &Tracker, holders: &Holders) {
        let found: Vec<_> = holders
            .sockets
            .iter()
            .filter(|(s, h)| {
                s.state == TcpState::CloseWait
                    && self
                        .owner_pid
                        .is_none_or(|pid| h.as_ref().is_some_and(|h| h.pid == pid))
                    && self.filter.keeps_listed(&s.id, s.cgroup, &mut self.names)
            })
            .cloned()
            .collect();
        let start = self.start_ns.unwrap_or(0);
        let now = now_ns.max(holders.at_ns);
        let list: Vec<Leak> = leaks(found, tracker, TcpState::CloseWait, now, start, 0);
        self.close_wait = list
            .iter()
            .map(|l| (l.socket.id.cookie, l.age_ns, l.age_at_least))
            .collect();
        self.refresh.leaks = list
            .into_iter()
            .take(MAX_LEAKS)
            .map(|l| LeakRow {
                pid: l.holder.as_ref().map(|h| h.pid),
                comm: l
                    .holder
                    .as_ref()
                    .map(|h| h.comm.clone())
                    .unwrap_or_default(),
                fd: l.holder.as_ref().map(|h| h.fd),
                age_ns: l.age_ns,
                age_at_least: l.age_at_least,
                local: SocketAddr::new(l.socket.id.saddr, l.socket.id.sport),
                remote: SocketAddr::new(l.socket.id.daddr, l.socket.id.dport),
            })
            .collect();
        self.refresh.leaks_listed = true;
    }

    /// The detail of row `key` of `view`: its time-in-state percentiles, and the
    /// distribution of `focus` (or, when it saw none, of the state it saw most).
    pub fn detail(&self, view: ViewKind, key: GroupKey, focus: Option<TcpState>) -> Detail {
        let hists = self.groups[view_index(view)]
            .by_key
            .get(&key)
            .and_then(|a| a.hists.as_deref());
        let Some(hists) = hists else {
            return Detail {
                states: Vec::new(),
                histogram: None,
            };
        };
        let states: Vec<(TcpState, u64, u64, u64)> = TcpState::ALL
            .into_iter()
            .filter_map(|s| {
                let h = hists[s as usize].as_ref()?;
                Some((
                    s,
                    h.len(),
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                ))
            })
            .collect();
        let shown = focus
            .filter(|s| hists[*s as usize].is_some())
            .or_else(|| states.iter().max_by_key(|(_, n, ..)| *n).map(|(s, ..)| *s));
        let histogram = shown.and_then(|s| {
            let h = hists[s as usize].as_ref()?;
            let mut buckets = [0u64; DECADES.len()];
            for v in h.iter_recorded() {
                let value = v.value_iterated_to();
                let i = DECADES
                    .iter()
                    .position(|(_, bound)| value < *bound)
                    .unwrap_or(DECADES.len() - 1);
                buckets[i] += u64::from(v.count_at_value());
            }
            Some((s, buckets))
        });
        Detail { states, histogram }
    }
}

impl Row {
    fn empty(key: GroupKey) -> Row {
        Row {
            key,
            id: String::new(),
            name: String::new(),
            states: [0; 13],
            total: 0,
            connects: 0.0,
            accepts: 0.0,
            oldest_close_wait: None,
        }
    }
}
