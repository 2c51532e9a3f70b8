//! The tracker: a pure state machine over decoded events.
//!
//! It holds one record per socket, keyed by the socket's identity: its cookie, which the
//! kernel keeps for the socket's whole life, TIME_WAIT included (see [`identity`]). A record
//! has the states the socket went through and when, its 4-tuple (filled in as later events
//! bring what early ones lack), namespace, owner and role. A transition to CLOSE ends it and
//! hands back the socket's whole life. It keeps no clock and does no I/O: "now" and what
//! sock_diag lists are passed in, so it runs the same on live and recorded streams. Memory is
//! bounded: past `max_sockets` the least recently active socket is evicted (its life handed
//! back, marked `evicted`).
//!
//! - When a socket's kernel address shows up with another cookie, the kernel did not show
//!   the end of the socket that had it: that life ends `unseen`; two sockets are never
//!   merged.
//! - TIME_WAIT ([`timewait`]): the kernel moves a closing socket into a timewait socket,
//!   which carries the same cookie, and reports the full socket's FIN_WAIT2 (or CLOSING) →
//!   CLOSE, never TIME_WAIT. The timewait socket's timer events carry the life on; that
//!   CLOSE is hidden and the TCP view is derived: → TIME_WAIT, then TIME_WAIT → CLOSE when the
//!   timer runs out or the socket is killed early. Derived transitions are handed out by
//!   [`Tracker::take_derived`].
//! - sock_diag ([`Tracker::reconcile`], [`Tracker::flipped`]): sockets it no longer lists
//!   end `unseen` (their end was lost), and a timewait socket that turned from FIN_WAIT2 to
//!   TIME_WAIT without any timer event is moved when it shows so.
//! - The listen path ([`request`]): request sockets, from the SYN to their end; a passive
//!   socket's life starts at its SYN (a NEW_SYN_RECV span) when its request was seen.
//!
//! [`identity`]: crate::model::key

mod jiffies;
pub mod request;
mod timewait;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use lru::LruCache;

pub use jiffies::JiffyClock;
pub use request::{ListenerRequests, RequestEnd, Requests};
pub use timewait::{FlipCandidate, SETTLE_NS, TIMEWAIT_LEN_S};

/// The maps looked up on every event: keyed by kernel addresses, cookies and tuples, so a
/// fast hash (seeded per process) rather than SipHash.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

pub use crate::model::SocketId;
use crate::model::{Comm, ConnFacts, RequestEvent, Task, TcpState, TimewaitEvent, Transition, Via};

/// The task of a derived transition no event showed (what sock_diag listed).
const NO_TASK: Task = Task {
    pid: 0,
    tid: 0,
    comm: Comm::EMPTY,
};

/// Default cap on tracked sockets.
pub const DEFAULT_MAX_SOCKETS: usize = 262_144;

/// The process that owns a socket, as far as process-context transitions show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
}

/// Whether the task on the CPU at this transition is, by the kernel's code paths, the
/// socket's owner: connect, listen, the application's own close or shutdown, and the close
/// of a listener. Everything else may run in softirq on top of an unrelated task (see
/// shared/notes/kernel.md), so it says nothing about the owner.
pub fn task_is_owner(old: TcpState, new: TcpState) -> bool {
    use TcpState::{Close, CloseWait, FinWait1, LastAck, Listen, SynSent};
    matches!(
        (old, new),
        (Close, SynSent | Listen) | (Listen, Close) | (_, FinWait1) | (CloseWait, LastAck)
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened by `connect()`.
    Active,
    /// Accepted from a listener.
    Passive,
    Listener,
    /// First seen mid-life.
    Unknown,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Passive => "passive",
            Role::Listener => "listener",
            Role::Unknown => "unknown",
        }
    }
}

/// How a socket's life ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// An orderly close (FIN exchange, listener closed).
    Closed,
    /// Aborted: RST sent or received, connection refused, SO_LINGER 0.
    Reset,
    TimeWaitExpired,
    TimeWaitKilled,
    /// Dropped from the tracker at its socket cap.
    Evicted,
    /// Still open when tracing stopped.
    StillOpen,
    /// The kernel never showed this life's end: its socket address started a new life, or
    /// sock_diag no longer lists it.
    Unseen,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Reset => "reset",
            End::TimeWaitExpired => "time_wait_expired",
            End::TimeWaitKilled => "time_wait_killed",
            End::Evicted => "evicted",
            End::StillOpen => "still_open",
            End::Unseen => "unseen",
        }
    }

    /// How a transition into CLOSE from `old` ended the socket.
    fn from_close(old: TcpState) -> End {
        use TcpState::{Close, Closing, FinWait2, LastAck, Listen, TimeWait};
        match old {
            // FIN_WAIT2/CLOSING -> CLOSE without a timewait socket (none was made).
            LastAck | FinWait2 | Closing | TimeWait | Listen | Close => End::Closed,
            _ => End::Reset,
        }
    }
}

/// One state of a socket's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub state: TcpState,
    /// When the socket entered it (kernel monotonic ns); `None` when not seen.
    pub entered_ns: Option<u64>,
    /// How long it stayed; `None` when unknown or still in it.
    pub ns: Option<u64>,
}

/// A socket's whole life as the tracker saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLife {
    /// The full socket's kernel address (the timewait socket's when the full socket was
    /// never seen).
    pub sk: u64,
    pub id: SocketId,
    pub owner: Option<Owner>,
    pub role: Role,
    pub first_seen_mid_life: bool,
    /// Every state in order; the last is CLOSE (`ns: None`) unless the life was cut short.
    pub spans: Vec<Span>,
    pub end: End,
    /// From entering the first state to the end; `None` when first seen mid-life or the
    /// end is unknown.
    pub lifetime_ns: Option<u64>,
    /// In the start-up snapshot: the socket existed before tracing began.
    pub existed_at_start: bool,
    /// The socket's cgroup v2 id (0: unknown), from its events or sock_diag.
    pub cgroup: u64,
    /// The connection's counters at its latest transition that showed them: at its end,
    /// their final values.
    pub facts: Option<ConnFacts>,
}

impl SocketLife {
    pub fn state(&self) -> Option<TcpState> {
        self.spans.last().map(|s| s.state)
    }

    /// When the socket entered its current state, when seen.
    pub fn entered_ns(&self) -> Option<u64> {
        self.spans.last().and_then(|s| s.entered_ns)
    }
}

/// What the tracker knows about one transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Time spent in the state the socket left; `None` when its entry was not seen.
    pub old_ns: Option<u64>,
    /// The socket's owner, when known.
    pub owner: Option<Owner>,
    /// The socket's ports as known so far (the event's own may still be 0).
    pub sport: u16,
    pub dport: u16,
    /// Not a step of the TCP view: the kernel's X → CLOSE of a socket that lives on as a
    /// timewait socket (its → TIME_WAIT is derived instead).
    pub hidden: bool,
    /// At a passive socket's SYN_RECV → ESTABLISHED: the server-side handshake, from its SYN
    /// queued to now, when its request was seen.
    pub syn_ns: Option<u64>,
    /// The socket's role as known so far.
    pub role: Role,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub evicted: u64,
    /// Transitions whose OLD state differed from the state the tracker held (an event
    /// missed, or lost in the kernel), and sockets sock_diag showed in another state.
    pub mismatched: u64,
    /// Lives ended `unseen` because their socket address started another socket's life.
    pub unseen_reused: u64,
    /// Lives ended `unseen` because sock_diag no longer listed their socket.
    pub unseen_gone: u64,
    /// Requests (SYNs queued) not followed because `max_sockets` were.
    pub requests_untracked: u64,
}

/// Local address and port, remote address and port.
pub type Tuple = (IpAddr, u16, IpAddr, u16);

/// A socket of the start-up snapshot (sock_diag at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    pub id: SocketId,
    /// Its state; for a timewait socket, its substate.
    pub state: TcpState,
    /// A timewait socket (in the TIME_WAIT or FIN_WAIT2 substate).
    pub timewait: bool,
    /// Its cgroup v2 id (0: none shown).
    pub cgroup: u64,
    /// For a listener: the process holding it, as /proc showed it at start (the owner of
    /// the connections it will accept).
    pub owner: Option<Owner>,
}

/// What sock_diag listed, for [`Tracker::reconcile`]: every socket in `states` of the
/// namespaces `netns`, dumped between `from_ns` and `to_ns` (kernel monotonic).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub from_ns: u64,
    pub to_ns: u64,
    pub netns: HashSet<u32>,
    pub states: Vec<TcpState>,
    /// By socket cookie.
    pub sockets: HashMap<u64, Listed>,
}

/// One socket of a [`Listing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its state; a timewait socket's substate.
    pub state: TcpState,
    /// A timewait socket.
    pub timewait: bool,
    /// A timewait socket in TIME_WAIT: when it entered it (monotonic ns, from its timer),
    /// when known.
    pub turned_at: Option<u64>,
}

/// One tracked socket.
struct Tracked {
    life: SocketLife,
    /// The timewait socket carrying this life on, once its timer was armed.
    tw: Option<Timewait>,
    /// A socket of the start-up snapshot not seen on a tracepoint since: the end of the
    /// snapshot. An event from before it supersedes the snapshot.
    seeded_ns: Option<u64>,
    /// Kernel time of the latest event about this socket (or of its snapshot): sock_diag
    /// listings taken after it judge it.
    last_ns: u64,
}

/// The timewait part of a life.
struct Timewait {
    /// The `inet_timewait_sock` (0: not known, from the snapshot).
    addr: u64,
    /// Its timer was detached: expiry, re-arm or kill comes next.
    cancel: Option<TimewaitEvent>,
    /// sock_diag shows it in TIME_WAIT while its timer events still say FIN_WAIT2, and
    /// when it turned is not known yet: counted as TIME_WAIT, placed when its timer ends.
    flipped: bool,
}

pub struct Tracker {
    /// Unbounded as a cache (it would allocate its whole capacity up front); `cap` is
    /// enforced on insertion.
    lives: LruCache<u64, Tracked>,
    cap: usize,
    /// Live sockets per state (kernel state number): kept up to date as lives are added,
    /// changed and removed, so that reading them costs nothing.
    counts: [u64; 13],
    /// The same per owner, cgroup and listener, when asked for ([`Tracker::count_groups`]).
    groups: Option<Box<GroupCounts>>,
    /// Full sockets' kernel addresses -> their identity.
    by_sk: FastMap<u64, u64>,
    /// Listeners: (namespace, local port) -> their identity. An accepted socket's owner is
    /// its listener's until its own process context shows one.
    listeners: FastMap<(u32, u16), u64>,
    /// Timewait sockets in the FIN_WAIT2 substate, as far as the events show: the ones
    /// whose turn to TIME_WAIT may come without an event.
    fin_wait2: FastSet<u64>,
    /// Timer cancels not resolved yet, oldest first: (time, identity).
    cancels: VecDeque<(u64, u64)>,
    /// The unresolved cancel on each CPU: the next event of that CPU resolves it.
    cpu_cancel: FastMap<u32, u64>,
    /// Derived transitions not yet handed out.
    derived: Vec<(Transition, Observed)>,
    /// Request sockets (the listen path).
    requests: Requests,
    clock: JiffyClock,
    stats: TrackerStats,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SOCKETS)
    }
}

impl Tracker {
    /// A tracker holding at most `max_sockets` sockets (at least 1).
    pub fn new(max_sockets: usize) -> Self {
        Tracker {
            lives: LruCache::unbounded(),
            cap: max_sockets.max(1),
            counts: [0; 13],
            by_sk: FastMap::default(),
            listeners: FastMap::default(),
            groups: None,
            fin_wait2: FastSet::default(),
            cancels: VecDeque::new(),
            cpu_cancel: FastMap::default(),
            derived: Vec::new(),
            requests: Requests::new(max_sockets),
            clock: JiffyClock::default(),
            stats: TrackerStats::default(),
        }
    }

    /// The kernel's HZ when known in advance (old recordings stored it); otherwise it is
    /// learned from the events.
    pub fn set_hz(&mut self, hz: u32) {
        self.clock = JiffyClock::with_hz(hz);
    }

    /// The kernel's HZ, once learned.
    pub fn hz(&self) -> Option<u32> {
        self.clock.hz()
    }

    /// Seeds the sockets sock_diag listed when tracing began (at most the socket cap),
    /// taken by `taken_ns`. A seeded socket's life is marked `existed_at_start`; an event
    /// from before `taken_ns` replaces what the snapshot said of it.
    pub fn seed(&mut self, seeds: impl IntoIterator<Item = Seed>, taken_ns: u64) {
        for s in seeds {
            if self.lives.len() >= self.cap {
                break;
            }
            let id = s.id;
            if id.cookie == 0 || self.lives.contains(&id.cookie) {
                continue;
            }
            let life = SocketLife {
                sk: 0,
                id,
                owner: s.owner,
                role: if s.state == TcpState::Listen {
                    Role::Listener
                } else {
                    Role::Unknown
                },
                first_seen_mid_life: true,
                spans: vec![Span {
                    state: s.state,
                    entered_ns: None,
                    ns: None,
                }],
                end: End::StillOpen,
                lifetime_ns: None,
                existed_at_start: true,
                cgroup: s.cgroup,
                facts: None,
            };
            if s.state == TcpState::Listen {
                self.listeners.insert((id.netns, id.sport), id.cookie);
            }
            if s.timewait && s.state == TcpState::FinWait2 {
                self.fin_wait2.insert(id.cookie);
            }
            self.put_new(
                id.cookie,
                Tracked {
                    life,
                    tw: s.timewait.then_some(Timewait {
                        addr: 0,
                        cancel: None,
                        flipped: false,
                    }),
                    seeded_ns: Some(taken_ns),
                    last_ns: taken_ns,
                },
            );
        }
    }

    /// Live sockets per state (indexed by kernel state number), snapshot sockets included.
    pub fn state_counts(&self) -> [u64; 13] {
        self.counts
    }

    /// Keeps live sockets per state for each owner, cgroup and listener too (what `top`
    /// shows without walking every socket at each refresh); counts those tracked now.
    pub fn count_groups(&mut self) {
        self.groups = Some(Box::new(self.recount_groups()));
    }

    /// The per-group counts, when [`Tracker::count_groups`] asked for them.
    pub fn group_counts(&self) -> Option<&GroupCounts> {
        self.groups.as_deref()
    }

    /// The per-group counts recomputed from every life (what [`Tracker::group_counts`]
    /// must equal).
    pub(crate) fn recount_groups(&self) -> GroupCounts {
        let mut g = GroupCounts::default();
        for (_, t) in &self.lives {
            let tally = t.tally();
            if let Some(state) = tally.state {
                g.count(&tally, state, 1);
            }
        }
        g
    }

    /// The counts recomputed from every life: what [`Tracker::state_counts`] must equal.
    #[cfg(test)]
    pub(crate) fn recount(&self) -> [u64; 13] {
        let mut counts = [0u64; 13];
        for (_, t) in &self.lives {
            if let Some(state) = t.state() {
                counts[state as usize] += 1;
            }
        }
        counts
    }

    /// Number of sockets being tracked.
    pub fn live(&self) -> usize {
        self.lives.len()
    }

    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    /// The tracked sockets, most recently active first.
    pub fn sockets(&self) -> impl Iterator<Item = &SocketLife> {
        self.lives.iter().map(|(_, t)| &t.life)
    }

    /// The listener on local port `port` of namespace `netns`, when followed.
    fn listener(&self, netns: u32, port: u16) -> Option<&SocketLife> {
        self.socket(*self.listeners.get(&(netns, port))?)
    }

    /// The listeners followed.
    pub fn listeners(&self) -> impl Iterator<Item = &SocketLife> {
        self.listeners.values().filter_map(|&id| self.socket(id))
    }

    /// The tracked sockets with the state each counts in (see [`Tracker::state_counts`]:
    /// a timewait socket sock_diag saw turn TIME_WAIT counts as TIME_WAIT before its
    /// timer says so).
    pub fn sockets_in_states(&self) -> impl Iterator<Item = (&SocketLife, Option<TcpState>)> {
        self.lives.iter().map(|(_, t)| (&t.life, t.state()))
    }

    /// The tracked socket with this identity (cookie), if any.
    pub fn socket(&self, id: u64) -> Option<&SocketLife> {
        self.lives.peek(&id).map(|t| &t.life)
    }

    /// One event of a request socket's timer (the listen path).
    pub fn request(&mut self, ev: &RequestEvent) {
        self.clock.learn(ev.ts_ns, ev.jiffies);
        self.requests.event(ev);
        self.stats.requests_untracked = self.requests.untracked;
    }

    /// The request sockets followed, and each listener's counts.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    pub fn requests_mut(&mut self) -> &mut Requests {
        &mut self.requests
    }

    /// Transitions derived since the last call (→ TIME_WAIT, TIME_WAIT → CLOSE), in order.
    pub fn take_derived(&mut self) -> impl Iterator<Item = (Transition, Observed)> + '_ {
        self.derived.drain(..)
    }

    /// Whether derived transitions wait to be taken.
    pub fn has_derived(&self) -> bool {
        !self.derived.is_empty()
    }

    /// Feeds one transition. Lives that end (the socket closed, another socket took its
    /// address, or one was evicted to make room) are pushed onto `ended`.
    pub fn observe(&mut self, t: &Transition, ended: &mut Vec<SocketLife>) -> Observed {
        match self.vetted(t) {
            Some(v) => self.observe_vetted(&v, ended),
            None => self.observe_vetted(t, ended),
        }
    }

    /// [`Tracker::observe`] for a transition already through [`Tracker::vetted`] (the
    /// pipeline vets once, and hands the sinks the same transition).
    pub(crate) fn observe_vetted(
        &mut self,
        t: &Transition,
        ended: &mut Vec<SocketLife>,
    ) -> Observed {
        let id = t.key();
        self.clock.learn(t.ts_ns, t.jiffies);
        self.resolve_cancel_on(t.cpu, id, None, ended);
        if let Some(prev) = self.by_sk.insert(t.sk, id)
            && prev != id
            && !self.adopt_cookie(prev, id, t)
        {
            // The address belongs to another socket now: the kernel did not show the end
            // of the one that had it (a timewait socket carrying that life on is fine).
            if self.lives.peek(&prev).is_some_and(|p| p.tw.is_none()) {
                self.end(prev, End::Unseen, None, ended);
                self.stats.unseen_reused += 1;
            }
        }
        let tracked = self.entry(t, ended);
        tracked.last_ns = tracked.last_ns.max(t.ts_ns);
        if tracked.tw.is_some() && t.new == TcpState::Close {
            // The full socket's X -> CLOSE after it became a timewait socket: not the end,
            // but its counters' last sight (a timewait socket keeps none).
            if t.facts.is_some() {
                tracked.life.facts = t.facts;
            }
            let life = &tracked.life;
            let observed = Observed {
                old_ns: None,
                owner: life.owner,
                sport: life.id.sport,
                dport: life.id.dport,
                hidden: true,
                syn_ns: None,
                role: life.role,
            };
            if self.by_sk.get(&t.sk) == Some(&id) {
                self.by_sk.remove(&t.sk);
            }
            return observed;
        }
        let before = tracked.tally();
        let child = tracked.life.role == Role::Passive
            && matches!(
                (t.old, t.new),
                (TcpState::Listen, TcpState::SynRecv) | (TcpState::SynRecv, TcpState::Established)
            );
        let (mut observed, entered, mismatched) = step(&mut tracked.life, t);
        let after = tracked.tally();
        let listening = (t.new == TcpState::Listen).then_some((t.id.netns, tracked.life.id.sport));
        self.moved(before, after);
        if let Some(port) = listening {
            self.listeners.insert(port, id);
        }
        if child && let Some(tracked) = self.lives.peek_mut(&id) {
            observed.syn_ns = join_request(&mut self.requests, &mut tracked.life, t, entered);
        }
        if mismatched {
            self.stats.mismatched += 1;
        }
        if t.new == TcpState::Close {
            self.by_sk.remove(&t.sk);
            self.end(id, End::from_close(t.old), Some(entered), ended);
        }
        observed
    }

    /// `t` without its cookie when it is a child's LISTEN -> SYN_RECV carrying its
    /// listener's: kernels that set that state before giving the child its request's
    /// cookie (Linux 6.1) report the one copied from the listener. The child has no cookie
    /// of its own yet; its next event brings it ([`Tracker::adopt_cookie`]). `None` (and
    /// no copy) for every other event.
    pub fn vetted(&self, t: &Transition) -> Option<Transition> {
        let listeners = (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv)
            && t.id.cookie != 0
            && self
                .lives
                .peek(&t.id.cookie)
                .is_some_and(|l| l.life.sk != t.sk && l.state() == Some(TcpState::Listen));
        // Copied only when it changes (then_some would copy every event).
        if listeners {
            let id = SocketId { cookie: 0, ..t.id };
            Some(Transition { id, ..*t })
        } else {
            None
        }
    }

    /// A passive child seen only at its creation (LISTEN -> SYN_RECV), at the same address,
    /// whose next event brings another cookie: on kernels that set that state before giving
    /// the child its request's cookie and peer address (Linux 6.1), its first event had
    /// none of its own (none, its listener's, or one the kernel then overwrote). Its socket
    /// cannot have been freed and reused meanwhile without a CLOSE, which would have ended
    /// the record. The record `prev` moves to the cookie `id`; returns whether it did.
    fn adopt_cookie(&mut self, prev: u64, id: u64, t: &Transition) -> bool {
        let newborn = self.lives.peek(&prev).is_some_and(|p| {
            let l = &p.life;
            l.sk == t.sk
                && l.role == Role::Passive
                && l.id.netns == t.id.netns
                && l.id.sport == t.id.sport
                && matches!(l.spans.as_slice(), [s] if s.state == TcpState::SynRecv)
        });
        if !newborn || t.id.cookie == 0 || t.old != TcpState::SynRecv || self.lives.contains(&id) {
            return false;
        }
        // Same state before and after: the per-state counts stand.
        if let Some(mut moved) = self.lives.pop(&prev) {
            moved.life.id.cookie = t.id.cookie;
            self.lives.put(id, moved);
        }
        true
    }

    /// The record of the socket of `t`, started when new (evicting the least recently
    /// active one when full). A snapshot record yields to an event from before the
    /// snapshot: the events since tracing began tell that socket's story.
    fn entry(&mut self, t: &Transition, ended: &mut Vec<SocketLife>) -> &mut Tracked {
        let id = t.key();
        let replace = match self.lives.get_mut(&id) {
            Some(known) => known.seeded_ns.take().is_some_and(|taken| t.ts_ns < taken),
            None => true,
        };
        if replace {
            let mut fresh = Tracked {
                life: start(t),
                tw: None,
                seeded_ns: None,
                last_ns: t.ts_ns,
            };
            if fresh.life.role == Role::Passive {
                fresh.life.owner = self.listener_owner(t.id.netns, t.id.sport);
            }
            match self.lives.get_mut(&id) {
                Some(seeded) => {
                    // It was there before the snapshot, unless this event is its birth.
                    let before = seeded.tally();
                    let existed = fresh.life.first_seen_mid_life;
                    *seeded = fresh;
                    seeded.life.existed_at_start = existed;
                    let after = seeded.tally();
                    self.fin_wait2.remove(&id);
                    self.moved(before, after);
                }
                None => self.insert(id, fresh, ended),
            }
        }
        match self.lives.get_mut(&id) {
            Some(t) => t,
            None => unreachable_entry(id),
        }
    }

    /// The owner of the listener on local port `port` of namespace `netns`, when known.
    fn listener_owner(&self, netns: u32, port: u16) -> Option<Owner> {
        self.listener(netns, port)?.owner
    }

    /// Inserts a new record, evicting the least recently active one when full.
    fn insert(&mut self, id: u64, tracked: Tracked, ended: &mut Vec<SocketLife>) {
        if self.lives.len() >= self.cap
            && let Some(&victim) = self.lives.peek_lru().map(|(k, _)| k)
            && let Some(mut victim) = self.remove(victim)
        {
            victim.life.end = End::Evicted;
            self.stats.evicted += 1;
            ended.push(victim.life);
        }
        self.put_new(id, tracked);
    }

    /// Adds a record (the caller made room), counted in its state.
    fn put_new(&mut self, id: u64, tracked: Tracked) {
        self.count(tracked.tally(), 1);
        self.lives.put(id, tracked);
    }

    /// Takes a record out, uncounted and unindexed.
    fn remove(&mut self, id: u64) -> Option<Tracked> {
        let t = self.lives.pop(&id)?;
        self.count(t.tally(), -1);
        self.forget(id, &t);
        Some(t)
    }

    /// A record changed in place, from `before` to `after` (its state, or a group).
    fn moved(&mut self, before: Tally, after: Tally) {
        if after != before {
            self.count(before, -1);
            self.count(after, 1);
        }
    }

    fn count(&mut self, tally: Tally, delta: i64) {
        if let Some(state) = tally.state {
            let n = &mut self.counts[state as usize];
            *n = n.saturating_add_signed(delta);
            if let Some(g) = self.groups.as_deref_mut() {
                g.count(&tally, state, delta);
            }
        }
    }

    /// Drops the indexes that point at a record that is going away.
    fn forget(&mut self, id: u64, t: &Tracked) {
        if self.by_sk.get(&t.life.sk) == Some(&id) {
            self.by_sk.remove(&t.life.sk);
        }
        let port = (t.life.id.netns, t.life.id.sport);
        if t.life.role == Role::Listener && self.listeners.get(&port) == Some(&id) {
            self.listeners.remove(&port);
        }
        self.fin_wait2.remove(&id);
    }

    /// Ends the life of `id` as `end` at `at` (when known).
    fn end(&mut self, id: u64, end: End, at: Option<u64>, ended: &mut Vec<SocketLife>) {
        let Some(t) = self.remove(id) else {
            return;
        };
        let mut life = t.life;
        if life.role == Role::Listener {
            self.requests.listener_closed(life.id, life.owner);
        }
        life.end = end;
        life.lifetime_ns = at.and_then(|at| lifetime(&life, at));
        ended.push(life);
    }

    /// sock_diag's listing: a socket it no longer lists ended without the kernel showing
    /// it (`unseen`); one it lists in another state is moved to that state (a timewait
    /// socket turning TIME_WAIT, at the time its timer says). Only sockets of the listed
    /// namespaces and states, quiet since before the listing began, are judged: anything
    /// newer has events of its own. Returns how many sockets ended.
    pub fn reconcile(&mut self, l: &Listing, ended: &mut Vec<SocketLife>) -> u64 {
        let judged: Vec<(u64, TcpState)> = self
            .lives
            .iter()
            .filter(|(_, t)| {
                l.netns.contains(&t.life.id.netns)
                    && t.last_ns < l.from_ns
                    && t.tw.as_ref().is_none_or(|tw| tw.cancel.is_none())
            })
            .filter_map(|(&id, t)| Some((id, t.state()?, t.tw.is_some())))
            .filter(|&(_, state, timewait)| {
                // Every state the socket may be in now must be listed: a timewait socket
                // in FIN_WAIT2 may have turned TIME_WAIT without an event.
                l.states.contains(&state)
                    && (!timewait
                        || state != TcpState::FinWait2
                        || l.states.contains(&TcpState::TimeWait))
            })
            .map(|(id, state, _)| (id, state))
            .collect();
        let mut gone = 0;
        for (id, state) in judged {
            let Some(listed) = l.sockets.get(&id) else {
                self.end(id, End::Unseen, None, ended);
                self.stats.unseen_gone += 1;
                gone += 1;
                continue;
            };
            if listed.timewait {
                // Its events did not show it become a timewait socket (they were lost).
                self.adopt_timewait(id);
            }
            match (state, listed.state) {
                (held, now) if held == now => {}
                (TcpState::FinWait2, TcpState::TimeWait) if listed.timewait => {
                    self.flipped(id, listed.turned_at, l.from_ns);
                }
                (_, now) => {
                    self.stats.mismatched += 1;
                    if let Some(t) = self.lives.peek_mut(&id) {
                        let before = t.tally();
                        self.fin_wait2.remove(&id);
                        move_to(
                            &mut t.life,
                            now,
                            None,
                            (l.to_ns, NO_TASK),
                            &mut self.derived,
                        );
                        if now == TcpState::FinWait2 && t.tw.is_some() {
                            self.fin_wait2.insert(id);
                        }
                        let after = t.tally();
                        self.moved(before, after);
                    }
                }
            }
        }
        gone
    }

    /// Marks the life `id` as carried on by a timewait socket (sock_diag lists it as one).
    fn adopt_timewait(&mut self, id: u64) {
        let Some(t) = self.lives.peek_mut(&id) else {
            return;
        };
        if t.tw.is_none() {
            t.tw = Some(Timewait {
                addr: 0,
                cancel: None,
                flipped: false,
            });
            if t.life.state() == Some(TcpState::FinWait2) {
                self.fin_wait2.insert(id);
            }
        }
    }

    /// Ends every tracked life as `still_open` at `now_ns` (tracing stopped). Sockets of
    /// the start-up snapshot that no event ever showed are not lives tcplens saw: they are
    /// dropped.
    pub fn close_all(&mut self, now_ns: u64) -> Vec<SocketLife> {
        let mut out = Vec::with_capacity(self.live());
        while let Some((_, t)) = self.lives.pop_lru() {
            if t.seeded_ns.is_some() {
                continue;
            }
            let mut life = t.life;
            life.end = End::StillOpen;
            life.lifetime_ns = lifetime(&life, now_ns);
            out.push(life);
        }
        self.by_sk.clear();
        self.listeners.clear();
        self.fin_wait2.clear();
        self.cancels.clear();
        self.cpu_cancel.clear();
        self.counts = [0; 13];
        if let Some(g) = self.groups.as_deref_mut() {
            *g = GroupCounts::default();
        }
        out
    }
}

/// What a record is counted by: its state, and the groups it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tally {
    state: Option<TcpState>,
    owner: u32,
    cgroup: u64,
    listener: Option<(u32, u16)>,
}

/// Live sockets per state for each owner process (pid 0: none known), each cgroup (0:
/// unknown) and each listener ((namespace, port): the listener and the connections it
/// accepted); a group with no socket left is dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GroupCounts {
    pub by_owner: FastMap<u32, [u64; 13]>,
    pub by_cgroup: FastMap<u64, [u64; 13]>,
    pub by_listener: FastMap<(u32, u16), [u64; 13]>,
}

impl GroupCounts {
    fn count(&mut self, t: &Tally, state: TcpState, delta: i64) {
        fn add<K: std::hash::Hash + Eq + Copy>(
            map: &mut FastMap<K, [u64; 13]>,
            key: K,
            state: TcpState,
            delta: i64,
        ) {
            let counts = map.entry(key).or_insert([0; 13]);
            let n = &mut counts[state as usize];
            *n = n.saturating_add_signed(delta);
            if delta < 0 && counts.iter().all(|&n| n == 0) {
                map.remove(&key);
            }
        }
        add(&mut self.by_owner, t.owner, state, delta);
        add(&mut self.by_cgroup, t.cgroup, state, delta);
        if let Some(l) = t.listener {
            add(&mut self.by_listener, l, state, delta);
        }
    }
}

impl Tracked {
    fn tally(&self) -> Tally {
        let l = &self.life;
        Tally {
            state: self.state(),
            owner: l.owner.map_or(0, |o| o.pid),
            cgroup: l.cgroup,
            listener: matches!(l.role, Role::Listener | Role::Passive)
                .then_some((l.id.netns, l.id.sport)),
        }
    }

    /// The state the socket is in as far as the tracker knows (a timewait socket that
    /// sock_diag saw turn TIME_WAIT counts as TIME_WAIT).
    fn state(&self) -> Option<TcpState> {
        if self.tw.as_ref().is_some_and(|tw| tw.flipped) {
            return Some(TcpState::TimeWait);
        }
        self.life.state()
    }
}

/// Moves `life` into `state` at `at` (`None`: not known when), with a derived transition
/// stamped `at`, or `ts_ns` (when the move became known) if `at` is unknown; `task` is the
/// task of the event that showed it (none for what sock_diag showed).
fn move_to(
    life: &mut SocketLife,
    state: TcpState,
    at: Option<u64>,
    (ts_ns, task): (u64, Task),
    derived: &mut Vec<(Transition, Observed)>,
) {
    // Never before the previous entry (clamped as in `observe`).
    let at = at.map(|a| life.entered_ns().map_or(a, |e| a.max(e)));
    let old = life.state().unwrap_or(state);
    let mut old_ns = None;
    if let Some(last) = life.spans.last_mut() {
        old_ns = last.entered_ns.zip(at).map(|(e, a)| a - e);
        last.ns = old_ns;
    }
    life.spans.push(Span {
        state,
        entered_ns: at,
        ns: None,
    });
    let t = Transition {
        ts_ns: at.unwrap_or(ts_ns),
        sk: life.sk,
        id: life.id,
        old,
        new: state,
        task,
        via: Via::Timewait,
        cpu: None,
        jiffies: 0,
        cgroup: life.cgroup,
        facts: None,
    };
    derived.push((
        t,
        Observed {
            old_ns,
            owner: life.owner,
            sport: life.id.sport,
            dport: life.id.dport,
            hidden: false,
            syn_ns: None,
            role: life.role,
        },
    ));
}

/// Moves `life` along transition `t`: what the tracker knows of it, when the new state was
/// entered, and whether the event's old state was not the one held (an event missed).
fn step(life: &mut SocketLife, t: &Transition) -> (Observed, u64, bool) {
    // Fill in what early events lack (the local port is 0 at CLOSE -> SYN_SENT).
    life.sk = t.sk;
    if t.id.sport != 0 {
        life.id.sport = t.id.sport;
        life.id.saddr = t.id.saddr;
    }
    if t.id.dport != 0 {
        life.id.dport = t.id.dport;
        life.id.daddr = t.id.daddr;
    }
    if t.cgroup != 0 {
        life.cgroup = t.cgroup;
    }
    // A listener is no connection: its counters stay zero.
    if t.facts.is_some() && life.role != Role::Listener {
        life.facts = t.facts;
    }
    if task_is_owner(t.old, t.new) {
        life.owner = Some(Owner {
            pid: t.task.pid,
            comm: t.task.comm,
        });
    }
    // Entries are clamped to be monotonic per socket: the ring buffer is not strictly
    // time-ordered across CPUs, and no duration may be negative.
    let entered = life.entered_ns().map_or(t.ts_ns, |prev| prev.max(t.ts_ns));
    let mut old_ns = None;
    let mut mismatched = false;
    match life.spans.last_mut() {
        Some(last) if last.state == t.old => {
            old_ns = last.entered_ns.map(|e| entered - e);
            last.ns = old_ns;
        }
        Some(_) => {
            // A missed event: OLD was entered at an unknown time.
            mismatched = true;
            life.spans.push(Span {
                state: t.old,
                entered_ns: None,
                ns: None,
            });
        }
        None => {}
    }
    life.spans.push(Span {
        state: t.new,
        entered_ns: Some(entered),
        ns: None,
    });
    let observed = Observed {
        old_ns,
        owner: life.owner,
        sport: life.id.sport,
        dport: life.id.dport,
        hidden: false,
        syn_ns: None,
        role: life.role,
    };
    (observed, entered, mismatched)
}

/// At a passive socket's first transitions (LISTEN -> SYN_RECV, SYN_RECV -> ESTABLISHED),
/// the request its handshake completes: its life
/// then starts at the SYN, with a NEW_SYN_RECV span. Returns, at SYN_RECV -> ESTABLISHED,
/// the time since the SYN (`entered`: when ESTABLISHED was entered).
fn join_request(
    requests: &mut Requests,
    life: &mut SocketLife,
    t: &Transition,
    entered: u64,
) -> Option<u64> {
    use TcpState::{Established, NewSynRecv};
    let first = life.spans.first()?;
    if first.state != NewSynRecv {
        let child_ns = first.entered_ns?;
        if let Some(j) = requests.join(t) {
            let syn_ns = j.syn_ns.min(child_ns);
            life.spans.insert(
                0,
                Span {
                    state: NewSynRecv,
                    entered_ns: Some(syn_ns),
                    ns: Some(child_ns - syn_ns),
                },
            );
        }
    }
    match life.spans.as_slice() {
        [syn, _, established, ..]
            if syn.state == NewSynRecv
                && established.state == Established
                && t.new == Established =>
        {
            Some(entered.saturating_sub(syn.entered_ns?))
        }
        _ => None,
    }
}

#[cold]
fn unreachable_entry(id: u64) -> ! {
    // `entry` just found or inserted the key in a cache with room for it.
    panic!("tracker lost socket {id:#x} right after inserting it")
}

/// A new record for the first transition seen of a socket.
fn start(t: &Transition) -> SocketLife {
    use TcpState::{Close, Listen, SynRecv, SynSent};
    let (role, fresh) = match (t.old, t.new) {
        (Close, SynSent) => (Role::Active, true),
        (Close, Listen) => (Role::Listener, true),
        (Listen, SynRecv) => (Role::Passive, true),
        _ => (Role::Unknown, false),
    };
    SocketLife {
        sk: t.sk,
        id: t.id,
        owner: None,
        role,
        first_seen_mid_life: !fresh,
        // A fresh socket's life starts with its first real state; a socket seen mid-life
        // starts in OLD, entered at an unknown time.
        spans: if fresh {
            Vec::with_capacity(6)
        } else {
            vec![Span {
                state: t.old,
                entered_ns: None,
                ns: None,
            }]
        },
        end: End::StillOpen,
        lifetime_ns: None,
        existed_at_start: false,
        cgroup: t.cgroup,
        facts: None,
    }
}

/// From the first state's entry to `end_ns`, which is never taken as earlier than the
/// last recorded entry (events from other CPUs, or "now", may carry earlier stamps).
fn lifetime(life: &SocketLife, end_ns: u64) -> Option<u64> {
    if life.first_seen_mid_life {
        return None;
    }
    let first = life.spans.first()?.entered_ns?;
    let last = life
        .spans
        .iter()
        .rev()
        .find_map(|s| s.entered_ns)
        .unwrap_or(first);
    Some(end_ns.max(last).saturating_sub(first))
}

#[cfg(test)]
pub(crate) mod tests;
