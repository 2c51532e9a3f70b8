//! The listen path: request sockets, from the SYN to their end.
//!
//! A listener keeps a request socket (NEW_SYN_RECV) for each SYN it answers until the
//! handshake completes; the kernel makes the child socket (LISTEN -> SYN_RECV) only when
//! the final ACK comes. The kernel shows a request through its timer (`reqsk_timer_handler`,
//! see `tracer-ebpf/src/request.rs`):
//!
//! - arm: the SYN was queued (a new request), or the timer was re-armed after an expiry
//!   that retransmitted the SYN-ACK (`retrans` tells how many so far);
//! - cancel: before an expiry (an expire follows on the same CPU, microseconds later), or
//!   the request ended early: its handshake completed, an RST, its listener closed;
//! - expire: a re-arm follows, or (retries exhausted) the request is dropped.
//!
//! A request joins its child by namespace and 4-tuple at the child's LISTEN -> SYN_RECV
//! (Linux 6.15+ reports the child's peer there) or at its SYN_RECV -> ESTABLISHED (older
//! kernels: the child's first event has no peer port yet). A cancel or expiry that nothing
//! followed within [`SETTLE_NS`] ends the request: `aborted`, or `expired`.

use std::collections::VecDeque;
use std::net::IpAddr;

use super::{FastMap, Owner, SETTLE_NS};
use crate::model::{RequestEvent, SocketId, TimerOp, Transition};

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestEnd {
    /// The final ACK came: the child socket was made.
    Completed,
    /// The SYN-ACK retries ran out (`tcp_synack_retries`), or the final ACK found the
    /// accept queue full and the retries ran out meanwhile.
    Expired,
    /// Ended early without a child: an RST from the peer, or its listener closed.
    Aborted,
}

/// What the tracker counts of one listener's requests (cumulative, since tracing began).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerRequests {
    /// Requests waiting now: the SYN queue as tcplens saw it fill.
    pub queued: u32,
    /// Most requests waiting at once since [`Requests::take_peaks`].
    pub peak: u32,
    /// Requests seen queued.
    pub syns: u64,
    pub completed: u64,
    pub expired: u64,
    pub aborted: u64,
    /// SYN-ACKs retransmitted.
    pub synack_retrans: u64,
}

/// A request joined to its child: when its SYN was queued and how many SYN-ACKs were
/// retransmitted for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    pub syn_ns: u64,
    pub retrans: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Armed,
    /// Cancelled at this time: an expiry follows, or it ended early.
    Cancelled(u64),
    /// Expired at this time: a re-arm follows, or it was dropped.
    Expiring(u64),
}

#[derive(Clone, Copy, Debug)]
struct Request {
    listener: u64,
    key: TupleKey,
    /// When its SYN was queued; `None` for a request first seen on a re-arm.
    syn_ns: Option<u64>,
    retrans: u8,
    phase: Phase,
}

/// Namespace and 4-tuple, IPv4-mapped IPv6 addresses as IPv4 (a dual-stack listener's
/// request for an IPv4 SYN is IPv4, its child IPv6 with mapped addresses).
type TupleKey = (u32, IpAddr, u16, IpAddr, u16);

fn tuple_key(id: &SocketId) -> TupleKey {
    (
        id.netns,
        id.saddr.to_canonical(),
        id.sport,
        id.daddr.to_canonical(),
        id.dport,
    )
}

/// The requests being followed, and what each listener's came to.
#[derive(Debug)]
pub struct Requests {
    /// By the request's kernel address.
    live: FastMap<u64, Request>,
    by_tuple: FastMap<TupleKey, u64>,
    /// Cancels and expiries not resolved yet, oldest first: (time, request).
    unsettled: VecDeque<(u64, u64)>,
    /// By listener cookie.
    listeners: FastMap<u64, ListenerRequests>,
    /// Every listener's, together.
    total: ListenerRequests,
    /// Listeners that closed since the last report, by cookie: who they were. Their
    /// counts go at the next [`Requests::take_peaks`] (once reported).
    closed: FastMap<u64, (SocketId, Option<Owner>)>,
    cap: usize,
    /// Requests not followed because `cap` were.
    pub untracked: u64,
}

impl Requests {
    pub fn new(cap: usize) -> Self {
        Requests {
            live: FastMap::default(),
            by_tuple: FastMap::default(),
            unsettled: VecDeque::new(),
            listeners: FastMap::default(),
            total: ListenerRequests::default(),
            closed: FastMap::default(),
            cap: cap.max(1),
            untracked: 0,
        }
    }

    /// Each listener's requests, by listener cookie.
    pub fn listeners(&self) -> &FastMap<u64, ListenerRequests> {
        &self.listeners
    }

    /// Every listener's counts together.
    pub fn total(&self) -> &ListenerRequests {
        &self.total
    }

    /// Restarts the peaks from the queues now (an interval report took them), and forgets
    /// the listeners that closed.
    pub fn take_peaks(&mut self) {
        // A closed listener goes once its last requests ended (and were reported); until
        // then its identity stays for the reports to come.
        let closed = &mut self.closed;
        self.listeners.retain(|cookie, l| {
            let gone = l.queued == 0 && closed.remove(cookie).is_some();
            !gone
        });
        for l in self.listeners.values_mut().chain([&mut self.total]) {
            l.peak = l.queued;
        }
    }

    /// The listener `id` closed (its requests end with their own events).
    pub fn listener_closed(&mut self, id: SocketId, owner: Option<Owner>) {
        if self.listeners.contains_key(&id.cookie) {
            self.closed.insert(id.cookie, (id, owner));
        }
    }

    /// A listener that closed since the last report: who it was.
    pub fn closed_listener(&self, cookie: u64) -> Option<&(SocketId, Option<Owner>)> {
        self.closed.get(&cookie)
    }

    /// Requests being followed.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// One event of a request's timer.
    pub fn event(&mut self, ev: &RequestEvent) {
        match (ev.op, self.live.get(&ev.req).map(|r| r.phase)) {
            (TimerOp::Arm, Some(Phase::Expiring(_))) => {
                // Re-armed after an expiry: the SYN-ACK went again (when `retrans` grew).
                if let Some(r) = self.live.get_mut(&ev.req) {
                    let more = u64::from(ev.retrans.saturating_sub(r.retrans));
                    r.retrans = r.retrans.max(ev.retrans);
                    r.phase = Phase::Armed;
                    let listener = r.listener;
                    self.bump(listener, |l| l.synack_retrans += more);
                }
            }
            (TimerOp::Arm, known) => {
                if known.is_some() {
                    // Its address holds a new request: the old one's end went unseen.
                    self.end(ev.req, RequestEnd::Aborted);
                }
                self.start(ev);
            }
            (TimerOp::Cancel, Some(Phase::Armed)) => {
                self.set_phase(ev.req, Phase::Cancelled(ev.ts_ns));
            }
            (TimerOp::Expire, Some(Phase::Cancelled(_) | Phase::Armed)) => {
                self.set_phase(ev.req, Phase::Expiring(ev.ts_ns));
            }
            // A request from before tracing, or one already joined to its child.
            _ => {}
        }
    }

    fn start(&mut self, ev: &RequestEvent) {
        if self.live.len() >= self.cap {
            self.untracked += 1;
            return;
        }
        let key = tuple_key(&ev.id);
        // A first sight on a re-arm (retransmissions already) is not the SYN.
        let fresh = ev.retrans == 0;
        self.live.insert(
            ev.req,
            Request {
                listener: ev.listener,
                key,
                syn_ns: fresh.then_some(ev.ts_ns),
                retrans: ev.retrans,
                phase: Phase::Armed,
            },
        );
        self.by_tuple.insert(key, ev.req);
        self.bump(ev.listener, |l| {
            l.queued += 1;
            l.peak = l.peak.max(l.queued);
            l.syns += u64::from(fresh);
        });
    }

    fn set_phase(&mut self, req: u64, phase: Phase) {
        if let Some(r) = self.live.get_mut(&req) {
            r.phase = phase;
            if let Phase::Cancelled(at) | Phase::Expiring(at) = phase {
                self.unsettled.push_back((at, req));
            }
        }
    }

    /// Changes the counts of `listener`, and the total, alike.
    fn bump(&mut self, listener: u64, f: impl Fn(&mut ListenerRequests)) {
        f(self.listeners.entry(listener).or_default());
        f(&mut self.total);
    }

    fn end(&mut self, req: u64, end: RequestEnd) -> Option<Request> {
        let r = self.live.remove(&req)?;
        if self.by_tuple.get(&r.key) == Some(&req) {
            self.by_tuple.remove(&r.key);
        }
        self.bump(r.listener, |l| {
            l.queued = l.queued.saturating_sub(1);
            match end {
                RequestEnd::Completed => l.completed += 1,
                RequestEnd::Expired => l.expired += 1,
                RequestEnd::Aborted => l.aborted += 1,
            }
        });
        Some(r)
    }

    /// The request whose handshake the child's transition `t` completes, if one waits at
    /// its namespace and 4-tuple.
    pub fn join(&mut self, t: &Transition) -> Option<Joined> {
        if self.live.is_empty() || t.id.dport == 0 {
            return None;
        }
        let req = *self.by_tuple.get(&tuple_key(&t.id))?;
        let r = self.end(req, RequestEnd::Completed)?;
        Some(Joined {
            syn_ns: r.syn_ns?,
            retrans: r.retrans,
        })
    }

    /// Ends the requests whose cancel or expiry nothing followed by `upto_ns - SETTLE_NS`.
    pub fn settle(&mut self, upto_ns: u64) {
        while let Some(&(ts, req)) = self.unsettled.front() {
            if ts.saturating_add(SETTLE_NS) > upto_ns {
                break;
            }
            self.unsettled.pop_front();
            match self.live.get(&req).map(|r| r.phase) {
                Some(Phase::Cancelled(at)) if at == ts => {
                    self.end(req, RequestEnd::Aborted);
                }
                Some(Phase::Expiring(at)) if at == ts => {
                    self.end(req, RequestEnd::Expired);
                }
                _ => {}
            }
        }
    }
}
