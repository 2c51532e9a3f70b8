//! The tracker: a pure state machine over decoded transitions.
//!
//! It holds one record per live socket, keyed by the kernel's `struct sock` address: the
//! states the socket went through and when, its 4-tuple (filled in as later events bring
//! what early ones lack), its owner, and its role. A transition to CLOSE ends the record and
//! hands back the socket's whole life; a reused address then starts a fresh one. It keeps
//! no clock and does no I/O: "now" is passed in where ages matter, so it runs the same on
//! live and recorded streams. Memory is bounded: past `max_sockets` the least recently
//! active socket is evicted (its life handed back, marked `evicted`).
//!
//! TIME_WAIT: the kernel moves a closing socket into a separate timewait socket and reports
//! the full socket's FIN_WAIT2 (or CLOSING) → CLOSE, never TIME_WAIT. The timewait
//! socket's timer events (see `source/timewait.rs`) carry its 4-tuple; the tracker joins
//! the timewait socket to the life that ended into it, hides that X → CLOSE, and derives
//! the TCP view: → TIME_WAIT when the socket enters it, TIME_WAIT → CLOSE when its timer
//! runs out (`time_wait_expired`) or it is killed early (`time_wait_killed`). Derived
//! transitions are handed out by [`Tracker::take_derived`].

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::model::{Comm, Family, Task, TcpState, TimerOp, TimewaitEvent, Transition, Via};

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
    use TcpState::*;
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, Close) | (_, FinWait1) | (CloseWait, LastAck)
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
        }
    }

    /// How a transition into CLOSE from `old` ended the socket.
    fn from_close(old: TcpState) -> End {
        use TcpState::*;
        match old {
            // FIN_WAIT2/CLOSING -> CLOSE: the connection moves into a timewait socket.
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
    pub sk: u64,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub owner: Option<Owner>,
    pub role: Role,
    pub first_seen_mid_life: bool,
    /// Every state in order; the last is CLOSE (`ns: None`) unless the life was cut short.
    pub spans: Vec<Span>,
    pub end: End,
    /// From entering the first state to the end; `None` when first seen mid-life.
    pub lifetime_ns: Option<u64>,
    /// In the start-up snapshot: the socket existed before tracing began (its first
    /// state was entered at or before then).
    pub existed_at_start: bool,
}

impl SocketLife {
    pub fn state(&self) -> Option<TcpState> {
        self.spans.last().map(|s| s.state)
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub evicted: u64,
    /// Transitions whose OLD state differed from the state the tracker held (an event
    /// missed, or lost in the kernel).
    pub mismatched: u64,
}

pub struct Tracker {
    socks: LruCache<u64, SocketLife>,
    /// Sockets of the start-up snapshot not seen on the tracepoint yet, by 4-tuple (the
    /// snapshot has no `struct sock` address): their state then.
    seeds: HashMap<Tuple, TcpState>,
    stats: TrackerStats,
    /// Live timewait sockets, by `inet_timewait_sock` address.
    tw: LruCache<u64, Timewait>,
    /// Timewait sockets armed but not yet joined to the full socket that became them
    /// (its X → CLOSE follows the arming, on the same CPU).
    tw_join: HashMap<Tuple, u64>,
    /// Timer cancels waiting for their expiry or re-arm, oldest first: (time, address).
    pending: VecDeque<(u64, u64)>,
    /// Derived transitions not yet handed out.
    derived: Vec<(Transition, Observed)>,
    clock: Option<Jiffies>,
}

/// How long after a timer cancel its expiry or re-arm may still show up. The kernel emits
/// them microseconds apart on one CPU; past this the timewait socket was killed.
pub const SETTLE_NS: u64 = 100_000_000;
/// A re-arm follows its cancel within the same locked section of the timer code.
const REARM_NS: u64 = 1_000_000;
/// `TCP_TIMEWAIT_LEN`: every entry into TIME_WAIT (and restart of it) arms the timer for
/// this long.
const TIMEWAIT_LEN_S: u64 = 60;

/// One timewait socket, carrying on the life of the socket that became it.
struct Timewait {
    /// Its last span is the kernel's `tw_substate` as the timer events last showed it.
    life: SocketLife,
    /// A cancel not resolved yet (expiry, re-arm, or kill).
    cancel: Option<TimewaitEvent>,
    /// sock_diag shows TIME_WAIT while the timer events still say FIN_WAIT2: the kernel
    /// flipped the substate without a timer event. Counted as TIME_WAIT; the flip itself
    /// is placed from the timer's expiry when it ends.
    diag_time_wait: bool,
}

impl Timewait {
    fn in_fin_wait2(&self) -> bool {
        self.life.state() == Some(TcpState::FinWait2)
    }
}

/// Maps jiffies to kernel monotonic time, learned from the timer events themselves.
#[derive(Clone, Copy, Debug)]
struct Jiffies {
    tick_ns: u64,
    /// `TCP_TIMEWAIT_LEN` in jiffies.
    timewait_len: u64,
    /// Monotonic ns of jiffy 0: the least `ts - jiffies * tick` seen, which is the tick
    /// edge plus the shortest delay observed.
    base: Option<i128>,
}

/// Local address and port, remote address and port.
pub type Tuple = (IpAddr, u16, IpAddr, u16);

/// A socket of the start-up snapshot (sock_diag at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub state: TcpState,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SOCKETS)
    }
}

impl Tracker {
    /// A tracker holding at most `max_sockets` live sockets (at least 1).
    pub fn new(max_sockets: usize) -> Self {
        let cap = NonZeroUsize::new(max_sockets).unwrap_or(NonZeroUsize::MIN);
        Tracker {
            socks: LruCache::new(cap),
            seeds: HashMap::new(),
            stats: TrackerStats::default(),
            tw: LruCache::new(cap),
            tw_join: HashMap::new(),
            pending: VecDeque::new(),
            derived: Vec::new(),
            clock: None,
        }
    }

    /// The kernel's HZ, which places an entry into TIME_WAIT that the kernel made without
    /// a timer event (from the timer's `expires`). Without it such entries are unknown.
    pub fn set_hz(&mut self, hz: u32) {
        if hz > 0 {
            self.clock = Some(Jiffies {
                tick_ns: (1_000_000_000 + u64::from(hz) / 2) / u64::from(hz),
                timewait_len: TIMEWAIT_LEN_S * u64::from(hz),
                base: None,
            });
        }
    }

    /// Seeds the sockets that existed when tracing began (at most the socket cap). When
    /// one of them first shows up on the tracepoint, its life is marked
    /// `existed_at_start`.
    pub fn seed(&mut self, seeds: impl IntoIterator<Item = Seed>) {
        let cap = self.socks.cap().get();
        for s in seeds.into_iter().take(cap) {
            self.seeds
                .insert((s.saddr, s.sport, s.daddr, s.dport), s.state);
        }
    }

    /// Live sockets per state (indexed by kernel state number): tracked lives by their
    /// current state, plus snapshot sockets not seen on the tracepoint since.
    pub fn state_counts(&self) -> [u64; 13] {
        let mut counts = [0u64; 13];
        for (_, life) in self.socks.iter() {
            if let Some(state) = life.state() {
                counts[state as usize] += 1;
            }
        }
        for (_, tw) in self.tw.iter() {
            let state = if tw.diag_time_wait {
                Some(TcpState::TimeWait)
            } else {
                tw.life.state()
            };
            if let Some(state) = state {
                counts[state as usize] += 1;
            }
        }
        for state in self.seeds.values() {
            counts[*state as usize] += 1;
        }
        counts
    }

    /// Live timewait sockets (in the TIME_WAIT or FIN_WAIT2 substate).
    pub fn timewait_sockets(&self) -> usize {
        self.tw.len()
    }

    /// Whether a timewait socket is in FIN_WAIT2 as far as its timer events show (its
    /// turn to TIME_WAIT may have come without one).
    pub fn has_fin_wait2_timewait(&self) -> bool {
        self.tw
            .iter()
            .any(|(_, tw)| tw.in_fin_wait2() && !tw.diag_time_wait)
    }

    /// sock_diag's list of the sockets in TIME_WAIT now: timewait sockets among them that
    /// the timer events still show in FIN_WAIT2 are counted in TIME_WAIT from now on.
    pub fn saw_in_time_wait(&mut self, in_time_wait: &std::collections::HashSet<Tuple>) {
        for (_, tw) in self.tw.iter_mut() {
            if tw.in_fin_wait2() && in_time_wait.contains(&tuple(&tw.life)) {
                tw.diag_time_wait = true;
            }
        }
    }

    /// Snapshot sockets not seen on the tracepoint since (they may have ended unseen).
    pub fn seeded(&self) -> usize {
        self.seeds.len()
    }

    /// Number of sockets being tracked, timewait sockets included.
    pub fn live(&self) -> usize {
        self.socks.len() + self.tw.len()
    }

    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    /// The tracked sockets, most recently active first, then the timewait sockets.
    pub fn sockets(&self) -> impl Iterator<Item = &SocketLife> {
        self.socks
            .iter()
            .map(|(_, life)| life)
            .chain(self.tw.iter().map(|(_, tw)| &tw.life))
    }

    /// Transitions derived since the last call (→ TIME_WAIT, TIME_WAIT → CLOSE), in order.
    pub fn take_derived(&mut self) -> impl Iterator<Item = (Transition, Observed)> + '_ {
        self.derived.drain(..)
    }

    /// Whether derived transitions wait to be taken.
    pub fn has_derived(&self) -> bool {
        !self.derived.is_empty()
    }

    /// Feeds one transition. Lives that end (the socket closed, or another was evicted to
    /// make room) are pushed onto `ended`.
    pub fn observe(&mut self, t: &Transition, ended: &mut Vec<SocketLife>) -> Observed {
        if !self.socks.contains(&t.sk) {
            if self.socks.len() == self.socks.cap().get()
                && let Some((_, mut victim)) = self.socks.pop_lru()
            {
                victim.end = End::Evicted;
                self.stats.evicted += 1;
                ended.push(victim);
            }
            let mut life = start(t);
            if life.first_seen_mid_life
                && let Some(state) = self.seeds.remove(&(t.saddr, t.sport, t.daddr, t.dport))
            {
                life.existed_at_start = state == t.old;
            }
            self.socks.put(t.sk, life);
        }
        let Some(life) = self.socks.get_mut(&t.sk) else {
            unreachable_observed(t)
        };

        // Fill in what early events lack (the local port is 0 at CLOSE -> SYN_SENT).
        if t.sport != 0 {
            life.sport = t.sport;
            life.saddr = t.saddr;
        }
        if t.dport != 0 {
            life.dport = t.dport;
            life.daddr = t.daddr;
        }
        if task_is_owner(t.old, t.new) {
            life.owner = Some(Owner {
                pid: t.task.pid,
                comm: t.task.comm,
            });
        }

        // Entries are clamped to be monotonic per socket: the ring buffer is not strictly
        // time-ordered across CPUs, and no duration may be negative.
        let entered = life
            .spans
            .last()
            .and_then(|s| s.entered_ns)
            .map_or(t.ts_ns, |prev| prev.max(t.ts_ns));
        let mut old_ns = None;
        match life.spans.last_mut() {
            Some(last) if last.state == t.old => {
                old_ns = last.entered_ns.map(|e| entered - e);
                last.ns = old_ns;
            }
            Some(_) => {
                // A missed event: OLD was entered at an unknown time.
                self.stats.mismatched += 1;
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

        let mut observed = Observed {
            old_ns,
            owner: life.owner,
            sport: life.sport,
            dport: life.dport,
            hidden: false,
        };
        if t.new == TcpState::Close
            && let Some(mut life) = self.socks.pop(&t.sk)
        {
            if matches!(t.old, TcpState::FinWait2 | TcpState::Closing)
                && !self.tw_join.is_empty()
                && let Some(tw) = self.tw_join.remove(&tuple(&life))
            {
                // The socket lives on as a timewait socket: this CLOSE is not its end.
                life.spans.pop();
                if let Some(last) = life.spans.last_mut() {
                    last.ns = None;
                }
                self.join(tw, life, t.task);
                observed.hidden = true;
            } else {
                life.end = End::from_close(t.old);
                life.lifetime_ns = lifetime(&life, entered);
                ended.push(life);
            }
        }
        observed
    }

    /// Feeds one timewait timer event. Lives that end are pushed onto `ended`; derived
    /// transitions wait in [`Tracker::take_derived`].
    pub fn timewait(&mut self, ev: &TimewaitEvent, ended: &mut Vec<SocketLife>) {
        self.learn_jiffies(ev);
        match ev.op {
            TimerOp::Arm => self.armed(ev, ended),
            TimerOp::Cancel => {
                let tw = self.timewait_entry(ev, ended);
                tw.cancel = Some(*ev);
                self.pending.push_back((ev.ts_ns, ev.tw));
            }
            TimerOp::Expire => {
                let tw = self.timewait_entry(ev, ended);
                tw.cancel = None;
                let at = self.flip_time(ev);
                let end = match ev.substate {
                    TcpState::TimeWait => End::TimeWaitExpired,
                    // An orphan's FIN_WAIT2 ran out its tcp_fin_timeout.
                    _ => End::Closed,
                };
                self.end_timewait(ev, at, end, ended);
            }
        }
    }

    /// Resolves the timer cancels older than `upto_ns - SETTLE_NS` that neither an expiry
    /// nor a re-arm followed: those timewait sockets were killed (port reuse, RST or SYN,
    /// namespace teardown). Called with event times, with "now" while live, and with
    /// `u64::MAX` at the end.
    pub fn settle(&mut self, upto_ns: u64, ended: &mut Vec<SocketLife>) {
        while let Some(&(ts, addr)) = self.pending.front() {
            if ts.saturating_add(SETTLE_NS) > upto_ns {
                break;
            }
            self.pending.pop_front();
            let Some(cancel) = self.tw.peek(&addr).and_then(|tw| tw.cancel) else {
                continue;
            };
            if cancel.ts_ns == ts {
                self.killed(&cancel, ended);
            }
        }
    }

    fn killed(&mut self, cancel: &TimewaitEvent, ended: &mut Vec<SocketLife>) {
        let at = self.flip_time(cancel);
        self.end_timewait(cancel, at, End::TimeWaitKilled, ended);
    }

    /// A timer armed: a new timewait socket, or a re-arm of a known one.
    fn armed(&mut self, ev: &TimewaitEvent, ended: &mut Vec<SocketLife>) {
        if let Some(tw) = self.tw.get_mut(&ev.tw) {
            let same = tuple(&tw.life) == ev_tuple(ev);
            let rearm = match &tw.cancel {
                Some(c) => same && ev.ts_ns.saturating_sub(c.ts_ns) <= REARM_NS,
                None => same,
            };
            if rearm {
                // The substate turned TIME_WAIT (the peer's FIN) or TIME_WAIT restarted.
                tw.cancel = None;
                if tw.life.state() != Some(ev.substate) {
                    move_to(
                        &mut tw.life,
                        ev.substate,
                        Some(ev.ts_ns),
                        ev,
                        &mut self.derived,
                    );
                }
                return;
            }
            // A new timewait socket where one lived: that one was killed.
            match tw.cancel {
                Some(c) => self.killed(&c, ended),
                None => self.end_timewait(ev, None, End::TimeWaitKilled, ended),
            }
        }
        let life = timewait_life(ev, Some(ev.ts_ns), false);
        self.put_timewait(ev.tw, life, ended);
        self.tw_join.insert(ev_tuple(ev), ev.tw);
    }

    /// The known timewait socket `ev` is about, or a new record for one that began before
    /// tracing (or was evicted).
    fn timewait_entry(&mut self, ev: &TimewaitEvent, ended: &mut Vec<SocketLife>) -> &mut Timewait {
        if !self.tw.contains(&ev.tw) {
            let seed = self.seeds.remove(&ev_tuple(ev));
            let life = timewait_life(ev, None, seed.is_some());
            self.put_timewait(ev.tw, life, ended);
        }
        match self.tw.get_mut(&ev.tw) {
            Some(tw) => tw,
            None => unreachable_timewait(ev.tw),
        }
    }

    fn put_timewait(&mut self, addr: u64, life: SocketLife, ended: &mut Vec<SocketLife>) {
        if self.tw.len() == self.tw.cap().get()
            && let Some((_, mut victim)) = self.tw.pop_lru()
        {
            self.tw_join.remove(&tuple(&victim.life));
            victim.life.end = End::Evicted;
            self.stats.evicted += 1;
            ended.push(victim.life);
        }
        self.tw.put(
            addr,
            Timewait {
                life,
                cancel: None,
                diag_time_wait: false,
            },
        );
    }

    /// The full socket `life` ended into the timewait socket at `addr`: the timewait
    /// socket carries on that life (its owner, role and states).
    fn join(&mut self, addr: u64, mut life: SocketLife, task: Task) {
        let Some(tw) = self.tw.get_mut(&addr) else {
            return;
        };
        for span in &tw.life.spans {
            if life.state() != Some(span.state) {
                let at = span.entered_ns;
                let ts = at.unwrap_or(0);
                move_to_at(&mut life, span.state, at, ts, task, &mut self.derived);
            }
        }
        tw.life = life;
    }

    /// When the kernel turned the FIN_WAIT2 substate into TIME_WAIT without a timer event
    /// (the re-arm stayed in the same timer-wheel bucket): the timer was then set to
    /// `TCP_TIMEWAIT_LEN` from that moment, so its `expires` places it, within a tick.
    /// `None` when the event shows no such flip or the time cannot be placed.
    fn flip_time(&self, ev: &TimewaitEvent) -> Option<u64> {
        let tw = self.tw.peek(&ev.tw)?;
        if ev.substate != TcpState::TimeWait || tw.life.state() == Some(TcpState::TimeWait) {
            return None;
        }
        let clock = self.clock?;
        let entry = ev.expires.checked_sub(clock.timewait_len)?;
        let ns = clock.base?
            + i128::from(entry) * i128::from(clock.tick_ns)
            + i128::from(clock.tick_ns / 2);
        u64::try_from(ns).ok()
    }

    /// Ends the timewait socket of `ev` at `ev.ts_ns` (after a substate flip at `flip`,
    /// when the event shows one).
    fn end_timewait(
        &mut self,
        ev: &TimewaitEvent,
        flip: Option<u64>,
        end: End,
        ended: &mut Vec<SocketLife>,
    ) {
        let Some(mut tw) = self.tw.pop(&ev.tw) else {
            return;
        };
        if self.tw_join.get(&tuple(&tw.life)) == Some(&ev.tw) {
            self.tw_join.remove(&tuple(&tw.life));
        }
        if tw.life.state() != Some(ev.substate) {
            move_to_at(
                &mut tw.life,
                ev.substate,
                flip,
                ev.ts_ns,
                ev.task,
                &mut self.derived,
            );
        }
        move_to(
            &mut tw.life,
            TcpState::Close,
            Some(ev.ts_ns),
            ev,
            &mut self.derived,
        );
        tw.life.end = end;
        tw.life.lifetime_ns = lifetime(&tw.life, ev.ts_ns);
        ended.push(tw.life);
    }

    fn learn_jiffies(&mut self, ev: &TimewaitEvent) {
        if let Some(clock) = &mut self.clock
            && ev.jiffies != 0
        {
            let base = i128::from(ev.ts_ns) - i128::from(ev.jiffies) * i128::from(clock.tick_ns);
            clock.base = Some(clock.base.map_or(base, |b| b.min(base)));
        }
    }

    /// Ends every tracked life as `still_open` at `now_ns` (tracing stopped), timewait
    /// sockets included.
    pub fn close_all(&mut self, now_ns: u64) -> Vec<SocketLife> {
        let mut out = Vec::with_capacity(self.live());
        let tws = std::iter::from_fn(|| self.tw.pop_lru().map(|(_, tw)| tw.life));
        let mut lives: Vec<SocketLife> = tws.collect();
        while let Some((_, life)) = self.socks.pop_lru() {
            lives.push(life);
        }
        for mut life in lives {
            life.end = End::StillOpen;
            life.lifetime_ns = lifetime(&life, now_ns);
            out.push(life);
        }
        self.tw_join.clear();
        self.pending.clear();
        out
    }
}

/// A timewait socket's own life, before (or without) the connection it came from: its
/// substate entered at `entered` (`None`: before tracing).
fn timewait_life(ev: &TimewaitEvent, entered: Option<u64>, existed_at_start: bool) -> SocketLife {
    SocketLife {
        sk: ev.tw,
        family: ev.family,
        saddr: ev.saddr,
        sport: ev.sport,
        daddr: ev.daddr,
        dport: ev.dport,
        owner: None,
        role: Role::Unknown,
        first_seen_mid_life: true,
        spans: vec![Span {
            state: ev.substate,
            entered_ns: entered,
            ns: None,
        }],
        end: End::StillOpen,
        lifetime_ns: None,
        existed_at_start,
    }
}

fn tuple(life: &SocketLife) -> Tuple {
    (life.saddr, life.sport, life.daddr, life.dport)
}

fn ev_tuple(ev: &TimewaitEvent) -> Tuple {
    (ev.saddr, ev.sport, ev.daddr, ev.dport)
}

/// Moves `life` into `state` at `at` (`None`: not known when), with a derived transition
/// stamped by the timer event `ev`.
fn move_to(
    life: &mut SocketLife,
    state: TcpState,
    at: Option<u64>,
    ev: &TimewaitEvent,
    derived: &mut Vec<(Transition, Observed)>,
) {
    move_to_at(life, state, at, ev.ts_ns, ev.task, derived);
}

/// As [`move_to`]: `ts_ns` is when the move became known (no later than it happened).
fn move_to_at(
    life: &mut SocketLife,
    state: TcpState,
    at: Option<u64>,
    ts_ns: u64,
    task: Task,
    derived: &mut Vec<(Transition, Observed)>,
) {
    let last_entered = life.spans.last().and_then(|s| s.entered_ns);
    // Never before the previous entry (clamped as in `observe`).
    let at = at.map(|a| last_entered.map_or(a, |e| a.max(e)));
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
        family: life.family,
        saddr: life.saddr,
        sport: life.sport,
        daddr: life.daddr,
        dport: life.dport,
        old,
        new: state,
        task,
        via: Via::Timewait,
    };
    derived.push((
        t,
        Observed {
            old_ns,
            owner: life.owner,
            sport: life.sport,
            dport: life.dport,
            hidden: false,
        },
    ));
}

#[cold]
fn unreachable_observed(t: &Transition) -> ! {
    // `put` just inserted the key into a cache with room for it.
    panic!("tracker lost socket {:#x} right after inserting it", t.sk)
}

#[cold]
fn unreachable_timewait(addr: u64) -> ! {
    // `put_timewait` just inserted the key into a cache with room for it.
    panic!("tracker lost timewait socket {addr:#x} right after inserting it")
}

/// A new record for the first transition seen of a socket.
fn start(t: &Transition) -> SocketLife {
    use TcpState::*;
    let (role, fresh) = match (t.old, t.new) {
        (Close, SynSent) => (Role::Active, true),
        (Close, Listen) => (Role::Listener, true),
        (Listen, SynRecv) => (Role::Passive, true),
        _ => (Role::Unknown, false),
    };
    SocketLife {
        sk: t.sk,
        family: t.family,
        saddr: t.saddr,
        sport: t.sport,
        daddr: t.daddr,
        dport: t.dport,
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
pub(crate) mod tests {
    use super::*;
    use crate::model::{Family, Task};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    pub(crate) fn tr(sk: u64, ts: u64, old: TcpState, new: TcpState, pid: u32) -> Transition {
        Transition {
            ts_ns: ts,
            sk,
            family: Family::Ipv4,
            saddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport: 40000,
            daddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 8080,
            old,
            new,
            task: Task {
                pid,
                tid: pid,
                comm: Comm::from_name(&format!("task{pid}")),
            },
            via: Via::Tracepoint,
        }
    }

    use TcpState::*;

    fn feed(t: &mut Tracker, evs: &[Transition]) -> (Vec<Observed>, Vec<SocketLife>) {
        let mut ended = Vec::new();
        let obs = evs.iter().map(|e| t.observe(e, &mut ended)).collect();
        (obs, ended)
    }

    #[test]
    fn an_active_life_with_durations() {
        let mut t = Tracker::default();
        let mut first = tr(1, 100, Close, SynSent, 7);
        first.sport = 0; // not chosen yet at connect()
        let (obs, ended) = feed(
            &mut t,
            &[
                first,
                tr(1, 190, SynSent, Established, 9),
                tr(1, 1190, Established, FinWait1, 7),
                tr(1, 1200, FinWait1, FinWait2, 9),
                tr(1, 1210, FinWait2, Close, 9),
            ],
        );
        let old_ns: Vec<_> = obs.iter().map(|o| o.old_ns).collect();
        assert_eq!(old_ns, [None, Some(90), Some(1000), Some(10), Some(10)]);
        assert_eq!(obs[0].sport, 0);
        assert_eq!(obs[1].sport, 40000);
        assert_eq!(t.live(), 0);
        assert_eq!(ended.len(), 1);
        let life = &ended[0];
        assert_eq!(life.role, Role::Active);
        assert_eq!(life.end, End::Closed);
        assert!(!life.first_seen_mid_life);
        assert_eq!(life.sport, 40000);
        assert_eq!(life.owner.map(|o| o.pid), Some(7));
        assert_eq!(
            life.spans,
            [
                Span {
                    state: SynSent,
                    entered_ns: Some(100),
                    ns: Some(90)
                },
                Span {
                    state: Established,
                    entered_ns: Some(190),
                    ns: Some(1000)
                },
                Span {
                    state: FinWait1,
                    entered_ns: Some(1190),
                    ns: Some(10)
                },
                Span {
                    state: FinWait2,
                    entered_ns: Some(1200),
                    ns: Some(10)
                },
                Span {
                    state: Close,
                    entered_ns: Some(1210),
                    ns: None
                },
            ]
        );
        assert_eq!(life.lifetime_ns, Some(1110));
    }

    #[test]
    fn first_seen_mid_life_is_unknown() {
        let mut t = Tracker::default();
        let (obs, ended) = feed(
            &mut t,
            &[
                tr(2, 500, Established, CloseWait, 3),
                tr(2, 800, CloseWait, LastAck, 4),
                tr(2, 900, LastAck, Close, 5),
            ],
        );
        assert_eq!(obs[0].old_ns, None);
        assert_eq!(obs[0].owner, None);
        assert_eq!(obs[1].old_ns, Some(300));
        let life = &ended[0];
        assert!(life.first_seen_mid_life);
        assert_eq!(life.role, Role::Unknown);
        assert_eq!(
            life.spans[0],
            Span {
                state: Established,
                entered_ns: None,
                ns: None
            }
        );
        assert_eq!(life.lifetime_ns, None);
        assert_eq!(life.owner.map(|o| o.pid), Some(4));
    }

    #[test]
    fn a_missed_event_makes_the_next_duration_unknown() {
        let mut t = Tracker::default();
        let (obs, _) = feed(
            &mut t,
            &[
                tr(3, 0, Close, SynSent, 1),
                // SYN_SENT -> ESTABLISHED was lost.
                tr(3, 50, Established, FinWait1, 1),
                tr(3, 60, FinWait1, FinWait2, 1),
            ],
        );
        assert_eq!(obs[1].old_ns, None);
        assert_eq!(obs[2].old_ns, Some(10));
        assert_eq!(t.stats().mismatched, 1);
        let life = t.sockets().next().unwrap();
        let states: Vec<_> = life.spans.iter().map(|s| (s.state, s.ns)).collect();
        assert_eq!(
            states,
            [
                (SynSent, None),
                (Established, None),
                (FinWait1, Some(10)),
                (FinWait2, None)
            ]
        );
    }

    #[test]
    fn resets_and_refusals_end_as_reset() {
        let mut t = Tracker::default();
        let (_, ended) = feed(
            &mut t,
            &[
                tr(4, 0, Close, SynSent, 1),
                tr(4, 5, SynSent, Close, 1),
                tr(5, 0, Close, SynSent, 1),
                tr(5, 5, SynSent, Established, 1),
                tr(5, 9, Established, Close, 1),
                tr(6, 0, Close, Listen, 2),
                tr(6, 9, Listen, Close, 2),
            ],
        );
        let ends: Vec<_> = ended.iter().map(|l| (l.sk, l.end, l.role)).collect();
        assert_eq!(
            ends,
            [
                (4, End::Reset, Role::Active),
                (5, End::Reset, Role::Active),
                (6, End::Closed, Role::Listener)
            ]
        );
    }

    #[test]
    fn owner_comes_from_process_context_only() {
        let mut t = Tracker::default();
        // The passive child: its handshake and the peer's FIN run in softirq on top of
        // unrelated tasks 50 and 51.
        let (obs, ended) = feed(
            &mut t,
            &[
                tr(5, 0, Listen, SynRecv, 50),
                tr(5, 1, SynRecv, Established, 50),
                tr(5, 2, Established, CloseWait, 51),
                tr(5, 3, CloseWait, LastAck, 42), // the server's close(): process context
                tr(5, 4, LastAck, Close, 51),
            ],
        );
        let owners: Vec<_> = obs.iter().map(|o| o.owner.map(|o| o.pid)).collect();
        assert_eq!(owners, [None, None, None, Some(42), Some(42)]);
        assert_eq!(ended[0].role, Role::Passive);
        assert_eq!(
            ended[0].owner,
            Some(Owner {
                pid: 42,
                comm: Comm::from_name("task42")
            })
        );
    }

    #[test]
    fn a_reused_address_starts_a_fresh_record() {
        let mut t = Tracker::default();
        let (obs, ended) = feed(
            &mut t,
            &[
                tr(6, 0, Close, SynSent, 1),
                tr(6, 10, SynSent, Close, 1),
                tr(6, 20, Close, Listen, 2), // same struct sock address, a new socket
            ],
        );
        assert_eq!(obs[2].old_ns, None);
        assert_eq!(obs[2].owner.map(|o| o.pid), Some(2));
        assert_eq!(ended.len(), 1);
        let live: Vec<_> = t.sockets().collect();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].role, Role::Listener);
        assert_eq!(live[0].spans.len(), 1);
    }

    #[test]
    fn eviction_keeps_the_cap_and_drops_the_least_recently_active() {
        let mut t = Tracker::new(3);
        let mut ended = Vec::new();
        for sk in 1..=3 {
            t.observe(&tr(sk, sk, Close, SynSent, 1), &mut ended);
        }
        t.observe(&tr(1, 10, SynSent, Established, 1), &mut ended); // 1 is active again
        t.observe(&tr(4, 11, Close, SynSent, 1), &mut ended); // evicts 2
        assert_eq!(t.live(), 3);
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].sk, ended[0].end), (2, End::Evicted));
        assert_eq!(t.stats().evicted, 1);
    }

    #[test]
    fn seeded_sockets_are_marked_when_they_show_up() {
        let mut t = Tracker::default();
        let here: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let seed = |sport, state| Seed {
            saddr: here,
            sport,
            daddr: here,
            dport: 8080,
            state,
        };
        t.seed([seed(40000, CloseWait), seed(40001, Established)]);
        assert_eq!(t.seeded(), 2);
        // tr() uses local port 40000: this one was in CLOSE_WAIT at start.
        let (_, ended) = feed(
            &mut t,
            &[
                tr(1, 10, CloseWait, LastAck, 5),
                tr(1, 20, LastAck, Close, 6),
            ],
        );
        assert!(ended[0].existed_at_start);
        assert!(ended[0].first_seen_mid_life);
        assert_eq!(ended[0].owner.map(|o| o.pid), Some(5));
        assert_eq!(t.seeded(), 1);
        // A socket not in the snapshot is not marked.
        let (_, ended) = feed(
            &mut t,
            &[tr(2, 30, Established, Close, 1)].map(|mut e| {
                e.sport = 45000;
                e
            }),
        );
        assert!(!ended[0].existed_at_start);
    }

    #[test]
    fn still_open_at_exit() {
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        t.observe(&tr(7, 100, Close, SynSent, 1), &mut ended);
        t.observe(&tr(7, 200, SynSent, Established, 1), &mut ended);
        let open = t.close_all(1200);
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].end, End::StillOpen);
        assert_eq!(open[0].lifetime_ns, Some(1100));
        assert_eq!(open[0].spans.last().unwrap().ns, None);
        assert_eq!(t.live(), 0);
    }

    fn twe(op: TimerOp, ts: u64, substate: TcpState, expires: u64, jiffies: u64) -> TimewaitEvent {
        let t = tr(1, 0, Close, Close, 0);
        TimewaitEvent {
            ts_ns: ts,
            op,
            tw: 0xbeef,
            family: t.family,
            saddr: t.saddr,
            sport: t.sport,
            daddr: t.daddr,
            dport: t.dport,
            substate,
            expires,
            jiffies,
            task: Task {
                pid: 0,
                tid: 0,
                comm: Comm::from_name("swapper/0"),
            },
        }
    }

    /// Connect, close first, FIN_WAIT2: what every timewait test starts from (socket 1,
    /// owner pid 7, FIN_WAIT2 entered at 1_200).
    fn closing(t: &mut Tracker) {
        let (_, ended) = feed(
            t,
            &[
                tr(1, 100, Close, SynSent, 7),
                tr(1, 200, SynSent, Established, 9),
                tr(1, 1_000, Established, FinWait1, 7),
                tr(1, 1_200, FinWait1, FinWait2, 9),
            ],
        );
        assert!(ended.is_empty());
    }

    fn derived(t: &mut Tracker) -> Vec<(TcpState, TcpState, u64, Option<u64>)> {
        t.take_derived()
            .map(|(tr, o)| {
                assert_eq!(tr.via, Via::Timewait);
                (tr.old, tr.new, tr.ts_ns, o.old_ns)
            })
            .collect()
    }

    fn states(life: &SocketLife) -> Vec<(TcpState, Option<u64>, Option<u64>)> {
        life.spans
            .iter()
            .map(|s| (s.state, s.entered_ns, s.ns))
            .collect()
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn time_wait_joins_the_life_and_expires() {
        let mut t = Tracker::default();
        t.set_hz(250);
        closing(&mut t);
        let mut ended = Vec::new();
        // The peer's FIN: the timewait socket is armed in TIME_WAIT, then the full socket
        // goes FIN_WAIT2 -> CLOSE.
        t.timewait(&twe(TimerOp::Arm, 5_000, TimeWait, 15_000, 0), &mut ended);
        let o = t.observe(&tr(1, 5_010, FinWait2, Close, 0), &mut ended);
        assert!(
            o.hidden,
            "the kernel's FIN_WAIT2 -> CLOSE is not the TCP view"
        );
        assert!(ended.is_empty());
        assert_eq!(derived(&mut t), [(FinWait2, TimeWait, 5_000, Some(3_800))]);
        assert_eq!(t.state_counts()[TimeWait as usize], 1);
        assert_eq!(t.timewait_sockets(), 1);
        // 60 s later: cancel, then expiry.
        let end = 5_000 + 60 * S;
        t.timewait(
            &twe(TimerOp::Cancel, end, TimeWait, 15_000, 15_000),
            &mut ended,
        );
        t.timewait(
            &twe(TimerOp::Expire, end + 20, TimeWait, 15_000, 15_000),
            &mut ended,
        );
        t.settle(u64::MAX, &mut ended);
        assert_eq!(
            derived(&mut t),
            [(TimeWait, Close, end + 20, Some(60 * S + 20))]
        );
        let life = &ended[0];
        assert_eq!(life.end, End::TimeWaitExpired);
        assert_eq!(life.sk, 1, "the life keeps the full socket's identity");
        assert_eq!(life.role, Role::Active);
        assert_eq!(life.owner.map(|o| o.pid), Some(7));
        assert_eq!(
            states(life)[3..],
            [
                (FinWait2, Some(1_200), Some(3_800)),
                (TimeWait, Some(5_000), Some(60 * S + 20)),
                (Close, Some(end + 20), None),
            ]
        );
        assert_eq!(life.lifetime_ns, Some(end + 20 - 100));
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn a_silent_flip_is_placed_from_the_timer_expiry() {
        let mut t = Tracker::default();
        t.set_hz(250);
        closing(&mut t);
        let mut ended = Vec::new();
        // Jiffy j starts at 10 s + j * 4 ms. The app closed first: the timewait socket
        // starts in FIN_WAIT2 right at the tick of jiffy 1000, armed for 60 s.
        let at = |j: u64| 10 * S + j * 4_000_000;
        t.timewait(
            &twe(TimerOp::Arm, at(1_000), FinWait2, 16_000, 1_000),
            &mut ended,
        );
        t.observe(&tr(1, at(1_000) + 10, FinWait2, Close, 0), &mut ended);
        assert_eq!(derived(&mut t), [], "FIN_WAIT2 just goes on");
        // The peer's FIN at jiffy 1125 (0.5 s later) re-armed the timer to 1125 + 15000
        // without any event; the expiry shows TIME_WAIT.
        let end = at(16_125) + 2_000_000;
        t.timewait(
            &twe(TimerOp::Cancel, end, TimeWait, 16_125, 16_125),
            &mut ended,
        );
        t.timewait(
            &twe(TimerOp::Expire, end + 10, TimeWait, 16_125, 16_125),
            &mut ended,
        );
        // Placed in the middle of jiffy 1125.
        let flip = at(1_125) + 2_000_000;
        assert_eq!(
            derived(&mut t),
            [
                (FinWait2, TimeWait, flip, Some(flip - 1_200)),
                (TimeWait, Close, end + 10, Some(end + 10 - flip)),
            ]
        );
        assert_eq!(ended[0].end, End::TimeWaitExpired);
    }

    #[test]
    fn a_rearm_after_cancel_is_the_flip_not_an_end() {
        let mut t = Tracker::default();
        t.set_hz(250);
        closing(&mut t);
        let mut ended = Vec::new();
        t.timewait(
            &twe(TimerOp::Arm, 2 * S, FinWait2, 16_000, 1_000),
            &mut ended,
        );
        t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
        // 3 s later the FIN re-arms into another timer bucket: cancel, then arm.
        t.timewait(
            &twe(TimerOp::Cancel, 5 * S, TimeWait, 16_000, 1_750),
            &mut ended,
        );
        t.timewait(
            &twe(TimerOp::Arm, 5 * S + 5_000, TimeWait, 16_750, 1_750),
            &mut ended,
        );
        t.settle(5 * S + SETTLE_NS * 2, &mut ended);
        assert!(ended.is_empty(), "a re-arm is no kill");
        assert_eq!(
            derived(&mut t),
            [(
                FinWait2,
                TimeWait,
                5 * S + 5_000,
                Some(5 * S + 5_000 - 1_200)
            )]
        );
    }

    #[test]
    fn a_cancel_nothing_follows_is_a_kill() {
        let mut t = Tracker::default();
        t.set_hz(250);
        closing(&mut t);
        let mut ended = Vec::new();
        t.timewait(
            &twe(TimerOp::Arm, 2 * S, TimeWait, 16_000, 1_000),
            &mut ended,
        );
        t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
        derived(&mut t);
        t.timewait(
            &twe(TimerOp::Cancel, 3 * S, TimeWait, 16_000, 1_250),
            &mut ended,
        );
        t.settle(3 * S + SETTLE_NS - 1, &mut ended);
        assert!(ended.is_empty(), "not settled before the margin");
        t.settle(3 * S + SETTLE_NS, &mut ended);
        assert_eq!(derived(&mut t), [(TimeWait, Close, 3 * S, Some(S))]);
        assert_eq!(ended[0].end, End::TimeWaitKilled);
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn an_orphan_fin_wait2_runs_out() {
        let mut t = Tracker::default();
        t.set_hz(250);
        closing(&mut t);
        let mut ended = Vec::new();
        t.timewait(
            &twe(TimerOp::Arm, 2 * S, FinWait2, 1_500, 1_000),
            &mut ended,
        );
        t.observe(&tr(1, 2 * S + 10, FinWait2, Close, 0), &mut ended);
        t.timewait(
            &twe(TimerOp::Cancel, 4 * S, FinWait2, 1_500, 1_500),
            &mut ended,
        );
        t.timewait(
            &twe(TimerOp::Expire, 4 * S + 10, FinWait2, 1_500, 1_500),
            &mut ended,
        );
        assert_eq!(
            derived(&mut t),
            [(FinWait2, Close, 4 * S + 10, Some(4 * S + 10 - 1_200))]
        );
        assert_eq!(ended[0].end, End::Closed);
        assert!(!ended[0].spans.iter().any(|s| s.state == TimeWait));
    }

    #[test]
    fn a_timewait_socket_from_before_tracing() {
        let mut t = Tracker::default();
        let here = IpAddr::V4(Ipv4Addr::LOCALHOST);
        t.seed([Seed {
            saddr: here,
            sport: 40000,
            daddr: here,
            dport: 8080,
            state: TimeWait,
        }]);
        assert_eq!(t.state_counts()[TimeWait as usize], 1);
        let mut ended = Vec::new();
        t.timewait(&twe(TimerOp::Cancel, 2 * S, TimeWait, 1, 1), &mut ended);
        t.timewait(&twe(TimerOp::Expire, 2 * S + 1, TimeWait, 1, 1), &mut ended);
        let life = &ended[0];
        assert!(life.existed_at_start && life.first_seen_mid_life);
        assert_eq!(
            states(life),
            [(TimeWait, None, None), (Close, Some(2 * S + 1), None)]
        );
        assert_eq!(life.end, End::TimeWaitExpired);
        assert_eq!(t.state_counts()[TimeWait as usize], 0);
    }

    fn any_state() -> impl Strategy<Value = TcpState> {
        (1u8..=12).prop_map(|n| TcpState::from_kernel(n).unwrap())
    }

    proptest! {
        /// Random streams over a few sockets, with timestamps jittered backwards as events
        /// from different CPUs can be: every finished life's known durations add up to its
        /// lifetime, and no duration is ever negative (they are u64, so "negative" would
        /// show as a huge wrap-around).
        #[test]
        fn durations_sum_to_lifetime(
            steps in proptest::collection::vec((0u64..4, any_state(), any_state(), 0u64..1000, any::<bool>()), 1..200),
        ) {
            let mut t = Tracker::new(3);
            let mut ended = Vec::new();
            let mut ts = 1_000_000u64;
            for (sk, old, new, dt, back) in steps {
                ts = if back { ts.saturating_sub(dt) } else { ts + dt };
                let o = t.observe(&tr(sk, ts, old, new, 1), &mut ended);
                prop_assert!(o.old_ns.is_none_or(|ns| ns < 1_000_000));
                prop_assert!(t.live() <= 3);
            }
            ended.extend(t.close_all(ts + 10));
            for life in &ended {
                for s in &life.spans {
                    prop_assert!(s.ns.is_none_or(|ns| ns < 1_000_000), "{life:?}");
                }
                let Some(lifetime) = life.lifetime_ns else { continue };
                // Fresh lives: every span but the last is known, and they add up.
                let known: u64 = life.spans.iter().filter_map(|s| s.ns).sum();
                let unknown = life.spans.iter().rev().skip(1).filter(|s| s.ns.is_none()).count();
                if unknown == 0 {
                    let last_entered = life.spans.last().and_then(|s| s.entered_ns).unwrap();
                    let first_entered = life.spans[0].entered_ns.unwrap();
                    prop_assert_eq!(known, last_entered - first_entered);
                    prop_assert!(lifetime >= known);
                }
            }
        }
    }
}
