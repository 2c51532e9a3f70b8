//! TIME_WAIT: a closing socket lives on as a timewait socket with the same cookie, whose
//! timer events carry its life on. The kernel programs are in `tracer-ebpf/src/timewait.rs`,
//! their layout, attach and the flip checks in `source/timewait.rs`; this is the join.
//!
//! - arm: the socket enters the timewait socket's substate (TIME_WAIT, or FIN_WAIT2 for an
//!   orphan waiting out `tcp_fin_timeout`); the full socket's CLOSE that follows is hidden.
//!   An arm after a cancel is a re-arm: the substate may have turned TIME_WAIT.
//! - cancel: the kernel detaches the timer before every expiry and re-arm, and to kill the
//!   socket early (a SYN or RST into TIME_WAIT, port reuse, namespace teardown). Events of
//!   one CPU reach the ring in the order they happened, and an expiry or re-arm follows its
//!   cancel on the same CPU with nothing in between: the next event of that CPU tells which
//!   it was. Anything else next on that CPU, or nothing within [`SETTLE_NS`], is a kill.
//! - expire: the natural end.
//!
//! The kernel turns the FIN_WAIT2 substate into TIME_WAIT on the peer's FIN by re-arming the
//! timer, and when the new expiry falls in the same timer-wheel bucket it does so without
//! any event. sock_diag shows the turn ([`Tracker::flipped`], at most a second late when
//! live); failing that, the turn is placed at the end from the timer's expiry, which was set
//! to `TCP_TIMEWAIT_LEN` from that moment.

use super::{
    End, NO_TASK, Role, SocketId, SocketLife, Span, TcpState, Timewait, TimewaitEvent, Tracked,
    Tracker, lifetime, move_to, unreachable_entry,
};
use crate::model::TimerOp;

/// How long after a timer cancel its expiry or re-arm may still show up when no later
/// event of its CPU has told. The kernel emits them back to back (microseconds natively,
/// up to 1.5 ms seen under emulation); past this the socket was killed.
pub const SETTLE_NS: u64 = 200_000_000;
/// `TCP_TIMEWAIT_LEN`: every entry into TIME_WAIT (and restart of it) arms the timer for
/// this long.
pub const TIMEWAIT_LEN_S: u64 = 60;

/// A timewait socket the events show in FIN_WAIT2: sock_diag may show it turned.
pub type FlipCandidate = SocketId;

impl Tracker {
    /// Feeds one timewait timer event. Lives that end are pushed onto `ended`; derived
    /// transitions wait in [`Tracker::take_derived`].
    pub fn timewait(&mut self, ev: &TimewaitEvent, ended: &mut Vec<SocketLife>) {
        self.clock.learn(ev.ts_ns, ev.jiffies);
        let id = ev.key();
        self.resolve_cancel_on(ev.cpu, id, Some(ev.op), ended);
        match ev.op {
            TimerOp::Arm => self.armed(ev, id, ended),
            TimerOp::Cancel => {
                if let Some(tw) = self.timewait_entry(ev, id, ended).tw.as_mut() {
                    tw.cancel = Some(*ev);
                }
                self.cancels.push_back((ev.ts_ns, id));
                if let Some(cpu) = ev.cpu {
                    self.cpu_cancel.insert(cpu, id);
                }
            }
            TimerOp::Expire => {
                self.timewait_entry(ev, id, ended);
                let end = match ev.substate {
                    TcpState::TimeWait => End::TimeWaitExpired,
                    // An orphan's FIN_WAIT2 ran out its tcp_fin_timeout.
                    _ => End::Closed,
                };
                self.end_timewait(id, ev, end, ended);
            }
        }
    }

    /// Resolves the timer cancels older than `upto_ns - SETTLE_NS` that nothing resolved:
    /// those timewait sockets were killed. Called with event times, with "now" once the
    /// ring is drained, and with `u64::MAX` at the end.
    pub fn settle(&mut self, upto_ns: u64, ended: &mut Vec<SocketLife>) {
        self.requests.settle(upto_ns);
        while let Some(&(ts, id)) = self.cancels.front() {
            if ts.saturating_add(SETTLE_NS) > upto_ns {
                break;
            }
            self.cancels.pop_front();
            let pending = self
                .lives
                .peek(&id)
                .and_then(|t| Some(t.tw.as_ref()?.cancel?.ts_ns));
            if pending == Some(ts) {
                self.cpu_cancel.retain(|_, c| *c != id);
                self.kill(id, ended);
            }
        }
    }

    /// The next event on `cpu` (about socket `id`, a timer `op` or a transition) resolves
    /// that CPU's pending cancel: the same socket's expiry or re-arm, or else a kill.
    pub(super) fn resolve_cancel_on(
        &mut self,
        cpu: Option<u32>,
        id: u64,
        op: Option<TimerOp>,
        ended: &mut Vec<SocketLife>,
    ) {
        let Some(cpu) = cpu else {
            return;
        };
        let Some(pending) = self.cpu_cancel.remove(&cpu) else {
            return;
        };
        if pending == id && op.is_some() {
            return; // its expiry or re-arm (handled by the event itself)
        }
        self.kill(pending, ended);
    }

    fn kill(&mut self, id: u64, ended: &mut Vec<SocketLife>) {
        let cancel = self
            .lives
            .peek_mut(&id)
            .and_then(|t| t.tw.as_mut()?.cancel.take());
        if let Some(cancel) = cancel {
            self.end_timewait(id, &cancel, End::TimeWaitKilled, ended);
        }
    }

    /// A timer armed: the socket became a timewait socket, or its timer was re-armed.
    fn armed(&mut self, ev: &TimewaitEvent, id: u64, ended: &mut Vec<SocketLife>) {
        if !self.lives.contains(&id) {
            let tracked = Tracked {
                life: timewait_life(ev, Some(ev.ts_ns)),
                tw: None,
                seeded_ns: None,
                last_ns: ev.ts_ns,
            };
            self.insert(id, tracked, ended);
        }
        let Some(t) = self.lives.get_mut(&id) else {
            return;
        };
        let before = t.tally();
        touch(t, ev.ts_ns);
        let tw = t.tw.get_or_insert(Timewait {
            addr: ev.tw,
            cancel: None,
            flipped: false,
        });
        tw.addr = ev.tw;
        tw.cancel = None;
        if t.life.state() != Some(ev.substate) {
            tw.flipped = false;
            move_to(
                &mut t.life,
                ev.substate,
                Some(ev.ts_ns),
                (ev.ts_ns, ev.task),
                &mut self.derived,
            );
        }
        let after = t.tally();
        if ev.substate == TcpState::FinWait2 {
            self.fin_wait2.insert(id);
        } else {
            self.fin_wait2.remove(&id);
        }
        self.moved(before, after);
    }

    /// The record of the timewait socket `ev` is about; a new one for a socket that was
    /// never seen (older than tracing and not in the snapshot, or evicted).
    fn timewait_entry(
        &mut self,
        ev: &TimewaitEvent,
        id: u64,
        ended: &mut Vec<SocketLife>,
    ) -> &mut Tracked {
        if !self.lives.contains(&id) {
            let tracked = Tracked {
                life: timewait_life(ev, None),
                tw: None,
                seeded_ns: None,
                last_ns: ev.ts_ns,
            };
            self.insert(id, tracked, ended);
        }
        let Some(t) = self.lives.get_mut(&id) else {
            unreachable_entry(id)
        };
        touch(t, ev.ts_ns);
        t.tw.get_or_insert(Timewait {
            addr: ev.tw,
            cancel: None,
            flipped: false,
        });
        t
    }

    /// Ends the timewait socket `id` at `ev`: CLOSE, after the substate `ev` shows if the
    /// events had not shown the socket enter it.
    fn end_timewait(&mut self, id: u64, ev: &TimewaitEvent, end: End, ended: &mut Vec<SocketLife>) {
        let Some(t) = self.remove(id) else {
            return;
        };
        let mut life = t.life;
        if life.state() != Some(ev.substate) {
            // It turned TIME_WAIT without a timer event, and sock_diag did not place it:
            // the timer was set to TCP_TIMEWAIT_LEN from that moment.
            let at = match ev.substate {
                TcpState::TimeWait => self.turned_at(ev.expires),
                _ => None,
            };
            move_to(
                &mut life,
                ev.substate,
                at,
                (ev.ts_ns, ev.task),
                &mut self.derived,
            );
        }
        move_to(
            &mut life,
            TcpState::Close,
            Some(ev.ts_ns),
            (ev.ts_ns, ev.task),
            &mut self.derived,
        );
        life.end = end;
        life.lifetime_ns = lifetime(&life, ev.ts_ns);
        ended.push(life);
    }

    /// When a timer that expires at jiffy `expires` was set to `TCP_TIMEWAIT_LEN`.
    fn turned_at(&self, expires: u64) -> Option<u64> {
        let len = self.clock.jiffies_in(TIMEWAIT_LEN_S)?;
        self.clock.mono_ns(expires.checked_sub(len)?)
    }

    /// Timewait sockets the events show in FIN_WAIT2 (and not on their way out): the ones
    /// sock_diag may show turned TIME_WAIT.
    pub fn flip_candidates(&self) -> Vec<FlipCandidate> {
        self.fin_wait2
            .iter()
            .filter_map(|id| {
                let t = self.lives.peek(id)?;
                let tw = t.tw.as_ref()?;
                (tw.cancel.is_none() && !tw.flipped).then_some(t.life.id)
            })
            .collect()
    }

    /// sock_diag, listing from `from_ns` on, shows timewait socket `id` in TIME_WAIT while
    /// the events still say FIN_WAIT2: it turned at `at` (from its timer), or at a time
    /// not known yet (then it counts as TIME_WAIT and the turn is placed at its end).
    pub fn flipped(&mut self, id: u64, at: Option<u64>, from_ns: u64) {
        let Some(t) = self.lives.peek_mut(&id) else {
            return;
        };
        let before = t.tally();
        let Some(tw) = t.tw.as_mut() else {
            return;
        };
        if t.life.state() != Some(TcpState::FinWait2) || tw.cancel.is_some() || t.last_ns >= from_ns
        {
            return; // an event since tells more
        }
        self.fin_wait2.remove(&id);
        match at {
            Some(at) => {
                tw.flipped = false;
                move_to(
                    &mut t.life,
                    TcpState::TimeWait,
                    Some(at),
                    (at, NO_TASK),
                    &mut self.derived,
                );
            }
            None => tw.flipped = true,
        }
        let after = t.tally();
        self.moved(before, after);
    }
}

/// An event about a tracked socket: it is active, and a snapshot's word on it is past.
fn touch(t: &mut Tracked, ts_ns: u64) {
    t.last_ns = t.last_ns.max(ts_ns);
    t.seeded_ns = None;
}

/// A timewait socket's own life, for a socket never seen before: its substate entered at
/// `entered` (`None`: before tracing).
fn timewait_life(ev: &TimewaitEvent, entered: Option<u64>) -> SocketLife {
    SocketLife {
        sk: ev.tw,
        id: ev.id,
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
        existed_at_start: false,
        cgroup: 0,
        facts: None,
    }
}
