//! The host's own word on its sockets, off the event loop: sock_diag listings that the
//! tracker reconciles with what the events showed, asked and answered on a thread of their
//! own so that the ring keeps being drained meanwhile.
//!
//! - A listing ([`Ask::Listing`]): every socket in some states, in every namespace. Sockets
//!   it no longer lists lost their end (ring loss, an exit the kernel skipped); a timewait
//!   socket it shows in TIME_WAIT turned so, at the time its timer tells.
//! - A flip check ([`Ask::Flips`]): which timewait sockets the events show in FIN_WAIT2 have
//!   turned TIME_WAIT without a timer event, and when. A dump of FIN_WAIT2 sockets (few, as
//!   a rule) tells which turned; each of those is then looked up by its cookie for its
//!   timer (or, when there are many, one dump of TIME_WAIT sockets); see `timewait.rs`.
//! - The start-up snapshot ([`Ask::Snapshot`]): every socket when tracing began.
//! - Holders ([`Ask::Holders`]): sockets in some states with the process holding each.

use std::collections::{HashMap, HashSet};
use std::io;

use crate::clock::monotonic_now_ns;
use crate::model::TcpState;
use crate::source::netstat::NetnsCounters;
use crate::source::procs::{Holder, OwnerIndex};
use crate::source::sockdiag::{self, DiagError, DiagSocket, ListenerQueue};
use crate::source::timewait::{self, Turned, turned_at};
use crate::tracker::{FlipCandidate, Listed, Listing};

/// Every TCP state sock_diag lists that a tracked socket can be in.
pub const LISTED_STATES: [TcpState; 11] = {
    use TcpState::{
        Close, CloseWait, Closing, Established, FinWait1, FinWait2, LastAck, Listen, SynRecv,
        SynSent, TimeWait,
    };
    [
        Established,
        SynSent,
        SynRecv,
        FinWait1,
        FinWait2,
        TimeWait,
        CloseWait,
        LastAck,
        Listen,
        Closing,
        Close,
    ]
};

pub enum Ask {
    /// Every TCP socket on the host now, in every namespace: the start-up snapshot.
    Snapshot,
    /// Every socket in these states, in every namespace.
    Listing(Vec<TcpState>),
    /// Which of these timewait sockets turned TIME_WAIT, and when.
    Flips(Vec<FlipCandidate>),
    /// Every socket in these states, with its holder.
    Holders(Vec<TcpState>),
}

/// Sockets in some states, each with the process holding it (`None`: no process holds it,
/// or it could not be read).
#[derive(Clone, Debug, Default)]
pub struct Holders {
    /// Kernel monotonic time the listing began.
    pub at_ns: u64,
    /// How long the listing and the holder lookup took.
    pub took_ns: u64,
    pub sockets: Vec<(DiagSocket, Option<Holder>)>,
    /// When LISTEN is among the states: every listener's queues, and each namespace's
    /// listen counters (the kernel's, since the namespace was made).
    pub listeners: Vec<ListenerQueue>,
    pub counters: Vec<NetnsCounters>,
}

/// The sockets of the start-up snapshot, and when the dump ended (kernel monotonic), with
/// the process holding each listener (by inode): the owner of what it will accept.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sockets: Vec<DiagSocket>,
    pub taken_ns: u64,
    pub listener_holders: HashMap<u64, Holder>,
}

pub enum Answer {
    Snapshot(Snapshot),
    Listing(Listing),
    /// What a flip check that began at `from_ns` found.
    Flips {
        from_ns: u64,
        turned: Turned,
    },
    Holders(Holders),
    Failed(DiagError),
}

/// The thread that answers.
pub struct HostWorker {
    asks: std::sync::mpsc::Sender<Ask>,
    answers: tokio::sync::mpsc::UnboundedReceiver<Answer>,
    pending: bool,
}

impl HostWorker {
    pub fn start() -> io::Result<HostWorker> {
        let (asks, ask_rx) = std::sync::mpsc::channel::<Ask>();
        let (answer_tx, answers) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("tcplens-host".into())
            .spawn(move || {
                let mut owners = OwnerIndex::new();
                for ask in ask_rx {
                    if answer_tx.send(answer(ask, &mut owners)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(HostWorker {
            asks,
            answers,
            pending: false,
        })
    }

    /// Asks, unless an answer is still pending; returns whether it asked.
    pub fn ask(&mut self, ask: Ask) -> bool {
        if self.pending {
            return false;
        }
        self.pending = self.asks.send(ask).is_ok();
        self.pending
    }

    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// The next answer; never resolves while nothing is asked.
    pub async fn answer(&mut self) -> Answer {
        if !self.pending {
            return std::future::pending().await;
        }
        match self.answers.recv().await {
            Some(a) => {
                self.pending = false;
                a
            }
            None => std::future::pending().await,
        }
    }
}

fn answer(ask: Ask, owners: &mut OwnerIndex) -> Answer {
    let result = match ask {
        Ask::Snapshot => sockdiag::dump(&LISTED_STATES, None).map(|found| {
            let taken_ns = monotonic_now_ns();
            let listeners: Vec<u64> = found
                .sockets
                .iter()
                .filter(|s| s.state == TcpState::Listen)
                .map(|s| s.inode)
                .collect();
            owners.resolve(listeners.iter().copied());
            let listener_holders = listeners
                .iter()
                .filter_map(|&inode| Some((inode, owners.holder(inode)?.clone())))
                .collect();
            Answer::Snapshot(Snapshot {
                sockets: found.sockets,
                taken_ns,
                listener_holders,
            })
        }),
        Ask::Listing(states) => listing(&states).map(Answer::Listing),
        Ask::Flips(candidates) => {
            timewait::flips(&candidates).map(|(from_ns, turned)| Answer::Flips { from_ns, turned })
        }
        Ask::Holders(states) => holders(&states, owners).map(Answer::Holders),
    };
    result.unwrap_or_else(Answer::Failed)
}

/// Every socket in `states`, in every namespace, with its holder (`owners` caches them
/// from one call to the next).
pub fn holders(states: &[TcpState], owners: &mut OwnerIndex) -> Result<Holders, DiagError> {
    let at_ns = monotonic_now_ns();
    let found = sockdiag::dump_all(states)?;
    let inodes: HashSet<u64> = found.iter().map(|s| s.inode).collect();
    owners.resolve(inodes.iter().copied());
    owners.retain(&inodes);
    let sockets = found
        .into_iter()
        .map(|s| {
            let holder = owners.holder(s.inode).cloned();
            (s, holder)
        })
        .collect();
    let (listeners, counters) = if states.contains(&TcpState::Listen) {
        (
            sockdiag::listener_queues()?,
            crate::source::netstat::netns_counters(None)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Holders {
        at_ns,
        took_ns: monotonic_now_ns().saturating_sub(at_ns),
        sockets,
        listeners,
        counters,
    })
}

/// Every socket in `states`, in every namespace.
pub fn listing(states: &[TcpState]) -> Result<Listing, DiagError> {
    let from_ns = monotonic_now_ns();
    let dump = sockdiag::dump(states, None)?;
    let to_ns = monotonic_now_ns();
    let seen = from_ns / 2 + to_ns / 2;
    Ok(Listing {
        from_ns,
        to_ns,
        netns: dump.netns,
        states: states.to_vec(),
        sockets: dump
            .sockets
            .iter()
            .map(|s| {
                let listed = Listed {
                    state: s.state,
                    timewait: s.is_timewait(),
                    turned_at: turned_at(s, seen),
                };
                (s.id.cookie, listed)
            })
            .collect(),
    })
}
