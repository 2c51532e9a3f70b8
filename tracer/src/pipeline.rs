//! The pipeline of `shared/design.md`, stage by stage for each event: the recorder gets
//! it raw, the tracker follows its socket, the sinks get the transition with what the
//! tracker knows of it, the lives it ended, and the run's totals at intervals and at exit.
//! The loops that feed it (live, replay) are in `app.rs`.

use std::io;

use crate::model::{Comm, KernelEvent, TcpState, Transition};
use crate::sink::top::Link;
use crate::sink::{HolderWant, Sink, View};
use crate::source::cgroup::CgroupNames;
use crate::source::host::{Answer, Holders, Snapshot};
use crate::source::kernel::{KernelFilter, LossSource, Lost, SourceError};
use crate::tracker::{Owner, Seed, SocketLife, Tracker};

/// What a run saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Events read (from the ring buffer or the file).
    pub events: u64,
    /// Of the events, timewait timer events and request timer events (the rest are state
    /// transitions).
    pub timewait: u64,
    pub requests: u64,
    /// Events the kernel lost, by reason.
    pub lost: Lost,
    /// Ring buffer records that did not decode (a bug if ever non-zero: the ABI is shared).
    pub bad: u64,
}

impl Totals {
    /// What the kernel lost so far: ring buffer drops and every program's recursion misses.
    pub fn read_lost(&mut self, source: &impl LossSource) -> Result<(), SourceError> {
        self.lost = source.lost()?;
        Ok(())
    }
}

/// The tracker and the sinks that read from it.
pub struct Pipeline<'a> {
    pub tracker: Tracker,
    sinks: Vec<&'a mut dyn Sink>,
    ended: Vec<SocketLife>,
    /// Applied in userspace on replay (the kernel applies it live).
    pub filter: Option<KernelFilter>,
    /// `-p PID`: only sockets this process owns.
    pub owner_pid: Option<u32>,
    /// Follow timewait sockets (off: `--no-timewait`, which also skips them on replay).
    pub timewait: bool,
    /// `--cgroup`: a timewait socket has no cgroup for the kernel to filter on, so its
    /// events pass; only those of a life already followed (its full socket passed) count.
    pub timewait_of_known_only: bool,
    /// Follow each socket, and reconcile the tracker with sock_diag while live (off for
    /// `record`: its one sink takes the raw events, and their replay tracks them).
    pub track: bool,
    pub totals: Totals,
    /// A screen (`top`): its keys wake the loops, and may stop them.
    pub link: Option<Link>,
}

impl<'a> Pipeline<'a> {
    pub fn new(tracker: Tracker, sinks: Vec<&'a mut dyn Sink>) -> Self {
        Pipeline {
            tracker,
            sinks,
            ended: Vec::new(),
            filter: None,
            owner_pid: None,
            timewait: true,
            timewait_of_known_only: false,
            track: true,
            totals: Totals::default(),
            link: None,
        }
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink) -> io::Result<()>) -> io::Result<()> {
        self.sinks.iter_mut().try_for_each(|s| f(&mut **s))
    }

    /// Seeds the tracker with the start-up snapshot's sockets that `filter` keeps (with
    /// `--cgroup`, timewait sockets have no cgroup to keep them by: they are left out).
    pub fn seed(&mut self, snapshot: Snapshot, filter: &KernelFilter) {
        let mut names = if filter.cgroup.is_some() {
            CgroupNames::host()
        } else {
            CgroupNames::none()
        };
        let holders = &snapshot.listener_holders;
        let seeds = snapshot
            .sockets
            .into_iter()
            .filter(|s| filter.keeps_listed(&s.id, s.cgroup, &mut names))
            .map(|s| Seed {
                id: s.id,
                state: s.state,
                timewait: s.is_timewait(),
                cgroup: s.cgroup,
                owner: holders.get(&s.inode).map(|h| Owner {
                    pid: h.pid,
                    comm: Comm::from_name(&h.comm),
                }),
            });
        self.tracker.seed(seeds, snapshot.taken_ns);
    }

    /// Tracing started: live at kernel monotonic `start_ns`, on replay at the first event.
    pub fn started(&mut self, start_ns: Option<u64>) -> io::Result<()> {
        self.each(|s| s.started(start_ns))
    }

    /// The states whose holders the sinks report: at every interval (and exit), or only
    /// those wanted between intervals too (`periodic`).
    pub fn holder_states(&self, periodic: bool) -> Vec<TcpState> {
        let mut states: Vec<TcpState> = Vec::new();
        for s in &self.sinks {
            match s.holder_want() {
                HolderWant::None => {}
                HolderWant::AtIntervals(state) => {
                    if !periodic {
                        states.push(state);
                    }
                }
                HolderWant::Periodically(wanted) => states.extend_from_slice(wanted),
            }
        }
        states.sort();
        states.dedup();
        states
    }

    /// Runs `f` on every sink with the view of the run as it stands.
    fn each_viewed(
        &mut self,
        holders: Option<&Holders>,
        mut f: impl FnMut(&mut dyn Sink, &View<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let view = View {
            totals: &self.totals,
            tracker: &self.tracker,
            holders,
        };
        self.sinks.iter_mut().try_for_each(|s| f(&mut **s, &view))
    }

    /// One decoded event: to the recorder as it is, then through the tracker to the
    /// sinks, followed by what it derived and the lives it ended.
    pub fn event(&mut self, ev: &KernelEvent) -> io::Result<()> {
        for s in &mut self.sinks {
            s.event(ev)?;
        }
        match ev {
            KernelEvent::Timewait(_) => self.totals.timewait += 1,
            KernelEvent::Request(_) => self.totals.requests += 1,
            KernelEvent::Transition(_) => {}
        }
        if !self.track {
            return Ok(());
        }
        match ev {
            KernelEvent::Transition(t) => self.transition(t)?,
            KernelEvent::Timewait(tw) => {
                let kept =
                    self.filter.as_ref().is_none_or(|f| {
                        f.keeps(tw.id.family, tw.id.sport, tw.id.dport, tw.id.netns)
                    }) && (!self.timewait_of_known_only || self.tracker.socket(tw.key()).is_some());
                if self.timewait && kept {
                    self.tracker.timewait(tw, &mut self.ended);
                }
            }
            KernelEvent::Request(r) => {
                let kept = self
                    .filter
                    .as_ref()
                    .is_none_or(|f| f.keeps(r.id.family, r.id.sport, r.id.dport, r.id.netns));
                if kept {
                    self.tracker.request(r);
                }
            }
        }
        self.tracker.settle(ev.ts_ns(), &mut self.ended);
        self.flush_derived()?;
        self.flush_ended()
    }

    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        if let Some(f) = &self.filter
            && !f.keeps(t.id.family, t.id.sport, t.id.dport, t.id.netns)
        {
            return Ok(());
        }
        // The sinks see the cookie the tracker keys the socket by.
        let vetted = self.tracker.vetted(t);
        let t = vetted.as_ref().unwrap_or(t);
        let o = self.tracker.observe_vetted(t, &mut self.ended);
        if !o.hidden && owned(self.owner_pid, o.owner.as_ref()) {
            for s in &mut self.sinks {
                s.transition(t, &o)?;
            }
        }
        Ok(())
    }

    /// Resolves timewait timer cancels that nothing followed by `now_ns` (killed sockets);
    /// returns whether anything was handed to the sinks.
    pub fn settle(&mut self, now_ns: u64) -> io::Result<bool> {
        self.tracker.settle(now_ns, &mut self.ended);
        let any = self.tracker.has_derived() || !self.ended.is_empty();
        self.flush_derived()?;
        self.flush_ended()?;
        Ok(any)
    }

    fn flush_derived(&mut self) -> io::Result<()> {
        if !self.tracker.has_derived() {
            return Ok(());
        }
        for (t, o) in self.tracker.take_derived() {
            if owned(self.owner_pid, o.owner.as_ref()) {
                for s in &mut self.sinks {
                    s.transition(&t, &o)?;
                }
            }
        }
        Ok(())
    }

    fn flush_ended(&mut self) -> io::Result<()> {
        // drain() keeps the buffer's capacity: no allocation per closed socket.
        for life in self.ended.drain(..) {
            if !owned(self.owner_pid, life.owner.as_ref()) {
                continue;
            }
            for s in &mut self.sinks {
                s.life_ended(&life)?;
            }
        }
        Ok(())
    }

    pub fn batch_done(&mut self) -> io::Result<()> {
        self.each_viewed(None, |s, v| s.batch_done(v))
    }

    /// What the host said (see `source/host.rs`), once every event before it is in.
    pub fn host_answer(&mut self, answer: Answer) -> io::Result<()> {
        match answer {
            Answer::Listing(listing) => {
                self.tracker.reconcile(&listing, &mut self.ended);
            }
            Answer::Flips { from_ns, turned } => {
                for (cookie, at) in turned {
                    self.tracker.flipped(cookie, at, from_ns);
                }
            }
            // Holders go to the sinks with a report ([`Pipeline::interval`]) or alone
            // ([`Pipeline::holders`]); the snapshot is asked for once, before the first
            // event ([`Pipeline::seed`]).
            Answer::Holders(_) | Answer::Snapshot(_) => {}
            Answer::Failed(e) => log::debug!("sock_diag: {e}"),
        }
        self.flush_derived()?;
        self.flush_ended()
    }

    /// An interval report at `now_ns`, with the holders the sinks want when listed.
    pub fn interval(&mut self, now_ns: u64, holders: Option<&Holders>) -> io::Result<()> {
        self.each_viewed(holders, |s, v| s.interval(now_ns, v))?;
        // The next report's SYN queue peaks start from the queues now.
        self.tracker.requests_mut().take_peaks();
        Ok(())
    }

    /// Holders listed between intervals (for [`HolderWant::Periodically`] sinks).
    pub fn holders(&mut self, now_ns: u64, holders: &Holders) -> io::Result<()> {
        self.each_viewed(Some(holders), |s, v| s.holders(now_ns, v))
    }

    /// The screen asked to stop (`q`).
    pub fn quit_asked(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.control.quit.get())
    }

    /// Tracing stopped at `now_ns`: sinks finish against the tracker as it stands, then
    /// the sockets still open end as `still_open` (callers flush with `batch_done`).
    pub fn finish(&mut self, now_ns: u64, holders: Option<&Holders>) -> io::Result<()> {
        // Every event is in: a cancel nothing followed was a kill.
        self.settle(u64::MAX)?;
        self.each_viewed(holders, |s, v| s.finish(now_ns, v))?;
        self.ended = self.tracker.close_all(now_ns);
        self.flush_ended()
    }
}

/// `-p PID`: whether a socket with this owner is shown.
fn owned(pid: Option<u32>, owner: Option<&Owner>) -> bool {
    pid.is_none_or(|pid| owner.is_some_and(|o| o.pid == pid))
}
