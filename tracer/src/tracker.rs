//! The tracker: a pure state machine over decoded transitions.
//!
//! It holds one record per live socket, keyed by the kernel's `struct sock` address, and
//! answers for each transition how long the socket spent in the state it left and who owns
//! it. It keeps no clock and does no I/O, so it runs the same on live and recorded streams.

use std::collections::HashMap;

use crate::model::{Comm, TcpState, Transition};

/// The process that owns a socket, as far as process-context transitions show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

#[derive(Clone, Copy, Debug)]
struct Sock {
    state: TcpState,
    /// When the socket entered `state`; `None` when that was not seen.
    entered_ns: Option<u64>,
    owner: Option<Owner>,
}

/// What the tracker knows about one transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Time spent in the state the socket left; `None` when its entry was not seen.
    pub old_ns: Option<u64>,
    /// The socket's owner, when known.
    pub owner: Option<Owner>,
}

#[derive(Default)]
pub struct Tracker {
    socks: HashMap<u64, Sock>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of sockets being tracked.
    pub fn live(&self) -> usize {
        self.socks.len()
    }

    /// Feeds one transition. A transition to CLOSE ends the socket's record, so a reused
    /// `struct sock` address starts afresh.
    pub fn observe(&mut self, t: &Transition) -> Observed {
        let prev = self.socks.remove(&t.sk);
        let old_ns = prev
            .filter(|s| s.state == t.old)
            .and_then(|s| s.entered_ns)
            // The ring buffer is not strictly time-ordered across CPUs: never negative.
            .map(|entered| t.ts_ns.saturating_sub(entered));
        let owner = if task_is_owner(t.old, t.new) {
            Some(Owner {
                pid: t.task.pid,
                comm: t.task.comm,
            })
        } else {
            prev.and_then(|s| s.owner)
        };
        if t.new != TcpState::Close {
            self.socks.insert(
                t.sk,
                Sock {
                    state: t.new,
                    entered_ns: Some(t.ts_ns),
                    owner,
                },
            );
        }
        Observed { old_ns, owner }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Family, Task};
    use std::net::{IpAddr, Ipv4Addr};

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
        }
    }

    use TcpState::*;

    #[test]
    fn durations_of_the_left_state() {
        let mut t = Tracker::new();
        assert_eq!(t.observe(&tr(1, 100, Close, SynSent, 7)).old_ns, None);
        assert_eq!(
            t.observe(&tr(1, 190, SynSent, Established, 9)).old_ns,
            Some(90)
        );
        assert_eq!(
            t.observe(&tr(1, 1190, Established, FinWait1, 7)).old_ns,
            Some(1000)
        );
        assert_eq!(t.live(), 1);
        assert_eq!(t.observe(&tr(1, 1200, FinWait1, Close, 9)).old_ns, Some(10));
        assert_eq!(t.live(), 0);
    }

    #[test]
    fn first_seen_mid_life_is_unknown() {
        let mut t = Tracker::new();
        let o = t.observe(&tr(2, 500, Established, CloseWait, 3));
        assert_eq!(o.old_ns, None);
        assert_eq!(o.owner, None);
        assert_eq!(
            t.observe(&tr(2, 800, CloseWait, LastAck, 4)).old_ns,
            Some(300)
        );
    }

    #[test]
    fn a_missed_event_makes_the_next_duration_unknown() {
        let mut t = Tracker::new();
        t.observe(&tr(3, 0, Close, SynSent, 1));
        // SYN_SENT -> ESTABLISHED was lost.
        assert_eq!(t.observe(&tr(3, 50, Established, FinWait1, 1)).old_ns, None);
        assert_eq!(
            t.observe(&tr(3, 60, FinWait1, FinWait2, 1)).old_ns,
            Some(10)
        );
    }

    #[test]
    fn out_of_order_timestamps_never_go_negative() {
        let mut t = Tracker::new();
        t.observe(&tr(4, 1000, Close, SynSent, 1));
        assert_eq!(
            t.observe(&tr(4, 990, SynSent, Established, 1)).old_ns,
            Some(0)
        );
    }

    #[test]
    fn owner_comes_from_process_context_only() {
        let mut t = Tracker::new();
        // The passive child: its handshake and the peer's FIN run in softirq on top of
        // unrelated tasks 50 and 51.
        assert_eq!(t.observe(&tr(5, 0, Listen, SynRecv, 50)).owner, None);
        assert_eq!(t.observe(&tr(5, 1, SynRecv, Established, 50)).owner, None);
        assert_eq!(t.observe(&tr(5, 2, Established, CloseWait, 51)).owner, None);
        // The server closes: process context, task 42 is the owner from here on.
        let owner = Owner {
            pid: 42,
            comm: Comm::from_name("task42"),
        };
        assert_eq!(
            t.observe(&tr(5, 3, CloseWait, LastAck, 42)).owner,
            Some(owner)
        );
        assert_eq!(t.observe(&tr(5, 4, LastAck, Close, 51)).owner, Some(owner));
    }

    #[test]
    fn a_reused_address_starts_a_fresh_record() {
        let mut t = Tracker::new();
        t.observe(&tr(6, 0, Close, SynSent, 1));
        t.observe(&tr(6, 10, SynSent, Close, 1));
        // Same struct sock address, new socket owned by someone else.
        let o = t.observe(&tr(6, 20, Close, Listen, 2));
        assert_eq!(o.old_ns, None);
        assert_eq!(o.owner.map(|o| o.pid), Some(2));
    }
}
