//! The pipeline, wired: source → decode → tracker → sinks, with the live loop that stops
//! on `--duration`, SIGINT or SIGTERM, and the replay of a record file.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use jiff::tz::TimeZone;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{
    CommonArgs, FloorArgs, LeaksArgs, ListenArgs, RecordArgs, ServeArgs, StatsArgs, TimelineArgs,
    TopArgs, TraceArgs, WatchArgs,
};
use crate::clock::{TimeFormatter, WallClock, monotonic_now_ns};
use crate::decode::decode;
use crate::pipeline::{Pipeline, Totals};
use crate::sink::Sink;
use crate::sink::leaks::{LeakQuery, LeaksSink};
use crate::sink::listen::ListenSink;
use crate::sink::metrics::{Metrics, MetricsSink};
use crate::sink::record::RecordSink;
use crate::sink::stats::StatsSink;
use crate::sink::timeline::TimelineSink;
use crate::sink::top::model::TopModel;
use crate::sink::top::{Link, TopSink, term};
use crate::sink::watch::{WatchPrinter, WatchSink};
use crate::source::cgroup::CgroupNames;
use crate::source::host::{self, Answer, Ask, HostWorker};
use crate::source::kernel::{DRAIN_INTERVAL, KernelFilter, KernelOptions, KernelSource, Lost};
use crate::source::record::{Item, RecordReader, RecordWriter};
use crate::source::sockdiag;
use crate::tracker::Tracker;
use std::sync::Arc;

/// One line on stderr, `tcplens: ` first. A closed stderr (`2>&1 | head -1`) is no error:
/// there is nobody left to tell.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(io::stderr().lock(), "tcplens: {line}");
}

/// How often the live loop asks sock_diag which timewait sockets turned TIME_WAIT without
/// a timer event (only while the events show some in FIN_WAIT2).
const FLIP_CHECK: Duration = Duration::from_secs(1);
/// How often the live loop reconciles the tracker with a full sock_diag listing.
const RESYNC: Duration = Duration::from_secs(10);
/// How often the holders of [`HolderWant::Periodically`] sinks are listed.
const HOLDERS_EVERY: Duration = Duration::from_secs(5);

/// Where events come from: the live kernel, or a record file (no root needed).
pub enum Input {
    Kernel(Box<KernelSource>),
    File {
        reader: Box<RecordReader<BufReader<File>>>,
        path: String,
    },
}

impl Input {
    pub fn open(common: &CommonArgs) -> Result<Input> {
        match &common.from {
            Some(path) => {
                let file =
                    File::open(path).with_context(|| format!("opening {}", path.display()))?;
                let reader = RecordReader::new(BufReader::with_capacity(1 << 16, file))
                    .map(Box::new)
                    .with_context(|| path.display().to_string())?;
                Ok(Input::File {
                    reader,
                    path: path.display().to_string(),
                })
            }
            None => Ok(Input::Kernel(Box::new(open_kernel(&common.trace)?))),
        }
    }

    /// A tracker for this input (on the live kernel, [`run`] seeds it with the start-up
    /// snapshot once the programs are attached).
    pub fn tracker(&self, max_sockets: usize) -> Tracker {
        let mut tracker = Tracker::new(max_sockets);
        if let Input::File { reader, .. } = self
            && let Some(hz) = reader.hz
        {
            tracker.set_hz(hz);
        }
        tracker
    }

    /// How cgroup ids are named: by this host's cgroups while tracing it; a recording's ids
    /// are another moment's (or host's), so a replay shows ids alone.
    pub fn cgroup_names(&self) -> CgroupNames {
        match self {
            Input::Kernel(_) => CgroupNames::host(),
            Input::File { .. } => CgroupNames::none(),
        }
    }

    /// The clock that maps the events' monotonic times to wall time.
    pub fn clock(&self) -> WallClock {
        match self {
            Input::Kernel(_) => WallClock::now(),
            Input::File { reader, .. } => reader.clock,
        }
    }
}

/// What a periodic resync lists: every state but TIME_WAIT, whose sockets end on their
/// timer, unless events were lost (a timer event among them).
fn resync_states(lost: &Lost) -> Vec<crate::model::TcpState> {
    host::LISTED_STATES
        .into_iter()
        .filter(|&s| s != crate::model::TcpState::TimeWait || lost.total() > 0)
        .collect()
}

fn open_kernel(trace: &TraceArgs) -> Result<KernelSource> {
    Ok(KernelSource::open(&KernelOptions {
        filter: trace.filter(),
        ring_size: trace.ring_size,
        timewait: !trace.no_timewait,
        requests: !trace.no_requests,
    })?)
}

/// Runs the pipeline over the input to its end (file) or until `--duration`, SIGINT or
/// SIGTERM (live). Output that goes away (`| head`) is a normal stop.
pub async fn run(
    input: Input,
    trace: &TraceArgs,
    interval: Option<Duration>,
    p: &mut Pipeline<'_>,
) -> Result<()> {
    let result = match input {
        Input::Kernel(source) => {
            p.timewait &= source.timewait;
            p.timewait_of_known_only = trace.cgroup.is_some();
            run_live(*source, trace, interval, p).await
        }
        Input::File { .. } if trace.cgroup.is_some() => {
            anyhow::bail!(
                "--cgroup filters live tracing in the kernel; it does not apply to --from"
            )
        }
        Input::File { reader, path } => {
            p.filter = Some(trace.filter());
            p.timewait = !trace.no_timewait;
            replay(*reader, &path, interval, p).await
        }
    };
    match result {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn run_live(
    mut source: KernelSource,
    trace: &TraceArgs,
    interval: Option<Duration>,
    p: &mut Pipeline<'_>,
) -> Result<()> {
    let KernelSource {
        events, logs, lost, ..
    } = &mut source;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = trace.duration.map(|d| tokio::time::Instant::now() + d);
    let mut every_second = tokio::time::interval(FLIP_CHECK);
    every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = interval.map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    let mut host = HostWorker::start().context("starting the sock_diag thread")?;
    if p.track {
        // Every socket that existed when the programs were attached, so that none falls
        // between the two. Without it tcplens still runs: such sockets are then only
        // "first seen mid-life".
        host.ask(Ask::Snapshot);
        match host.answer().await {
            Answer::Snapshot(snapshot) => p.seed(snapshot, &trace.filter()),
            Answer::Failed(e) => log::warn!("start-up socket snapshot unavailable: {e}"),
            _ => {}
        }
        // What the first window's listen counts start from.
        if p.holder_states(false)
            .contains(&crate::model::TcpState::Listen)
        {
            host.ask(Ask::Holders(vec![crate::model::TcpState::Listen]));
            if let Answer::Holders(h) = host.answer().await {
                p.holders(h.at_ns, &h)?;
            }
        }
    }
    let mut last_resync = tokio::time::Instant::now();
    let periodic_holders = p.holder_states(true);
    let mut last_holders: Option<tokio::time::Instant> = None;
    // An interval report waits for a flip check, so that its live counts are the kernel's,
    // and for the holders its sinks want.
    let mut report = Report::default();
    let mut reported_lost = 0;
    let mut failed: Option<io::Error> = None;

    // A screen says it by drawing.
    let wake = p.link.as_ref().map(|l| l.wake.clone());
    if wake.is_none() {
        say(format_args!(
            "tracing TCP state transitions; Ctrl-C to stop"
        ));
    }
    if let Err(e) = p.started(Some(monotonic_now_ns())) {
        failed = Some(e);
    }
    let feed = |p: &mut Pipeline<'_>, failed: &mut Option<io::Error>, b: &[u8]| {
        p.totals.events += 1;
        if failed.is_some() {
            return;
        }
        match decode(b) {
            Ok(ev) => {
                if let Err(e) = p.event(&ev) {
                    *failed = Some(e);
                }
            }
            Err(e) => {
                p.totals.bad += 1;
                log::warn!("undecodable event: {e}");
            }
        }
    };
    while failed.is_none() && !p.quit_asked() {
        tokio::select! {
            batch = events.next_batch(|b| feed(p, &mut failed, b)) => {
                batch?;
                if failed.is_none() && let Err(e) = p.batch_done() {
                    failed = Some(e);
                }
            }
            _ = drain_tick.tick() => {
                // Below the kernel's wakeup threshold events wait for this timer. Every
                // event stamped before `now` is in the ring by now, so timer cancels that
                // nothing followed by then can be settled.
                let now = monotonic_now_ns();
                let drained = events.drain_now(|b| feed(p, &mut failed, b)) > 0;
                let settled = match p.settle(now) {
                    Ok(any) => any,
                    Err(e) => {
                        failed.get_or_insert(e);
                        false
                    }
                };
                if (drained || settled)
                    && failed.is_none()
                    && let Err(e) = p.batch_done()
                {
                    failed = Some(e);
                }
            }
            answer = host.answer() => {
                // Every event from before the answer is in the ring: in first.
                events.drain_now(|b| feed(p, &mut failed, b));
                let done = report
                    .answered(answer, p, &mut host)
                    .and_then(|()| p.batch_done());
                if failed.is_none() && let Err(e) = done {
                    failed = Some(e);
                }
            }
            forwarded = logs.forward_logs() => forwarded?,
            _ = every_second.tick() => {
                p.totals.read_lost(lost)?;
                if p.totals.lost.total() > reported_lost {
                    let advice = if p.totals.lost.ring_full > 0 {
                        ": a larger --ring-size may help"
                    } else {
                        ""
                    };
                    log::warn!("{} so far{advice}", p.totals.lost);
                    reported_lost = p.totals.lost.total();
                }
                if p.track && !host.is_pending() {
                    if last_resync.elapsed() >= RESYNC {
                        last_resync = tokio::time::Instant::now();
                        host.ask(Ask::Listing(resync_states(&p.totals.lost)));
                    } else if !periodic_holders.is_empty()
                        && last_holders.is_none_or(|t| t.elapsed() >= HOLDERS_EVERY)
                    {
                        last_holders = Some(tokio::time::Instant::now());
                        host.ask(Ask::Holders(periodic_holders.clone()));
                    } else {
                        let candidates = p.tracker.flip_candidates();
                        if !candidates.is_empty() {
                            host.ask(Ask::Flips(candidates));
                        }
                    }
                }
            }
            () = tick(&mut ticks) => {
                p.totals.read_lost(lost)?;
                if let Err(e) = report.due(monotonic_now_ns(), p, &mut host) {
                    failed = Some(e);
                }
            }
            // A key: the screen takes it at the flush point.
            () = woken(wake.as_deref()) => {
                if let Err(e) = p.batch_done() {
                    failed = Some(e);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = sleep_until(deadline) => break,
        }
    }
    if failed.is_none() {
        events.drain_now(|b| feed(p, &mut failed, b));
    }
    let mut holders = None;
    if failed.is_none() && p.track {
        // At exit every socket shows in the state the kernel has it in: one last listing,
        // TIME_WAIT included.
        if host.is_pending() {
            let answer = host.answer().await;
            events.drain_now(|b| feed(p, &mut failed, b));
            p.host_answer(answer)?;
        }
        let last = host::listing(&host::LISTED_STATES);
        events.drain_now(|b| feed(p, &mut failed, b));
        match last {
            Ok(listing) => p.host_answer(Answer::Listing(listing))?,
            Err(e) => log::debug!("sock_diag at exit: {e}"),
        }
        let states = p.holder_states(false);
        if !states.is_empty() && host.ask(Ask::Holders(states)) {
            match host.answer().await {
                Answer::Holders(h) => holders = Some(h),
                Answer::Failed(e) => report.cannot_list(&e),
                _ => {}
            }
        }
    }
    p.totals.read_lost(lost)?;
    drop(source); // detaches the programs
    if let Some(e) = failed {
        return Err(e.into());
    }
    p.finish(monotonic_now_ns(), holders.as_ref())?;
    p.batch_done()?;
    Ok(())
}

/// An interval report on its way: its live counts must include the timewait sockets that
/// turned TIME_WAIT without an event, so a flip check goes first when any may have; then
/// the host lists the holders its sinks report (off the event loop).
#[derive(Default)]
struct Report {
    /// The report's time, once due.
    due: Option<u64>,
    /// What it waits for from the host.
    waiting: Option<Waiting>,
    /// Its flip check is done (or none was needed).
    flipped: bool,
    /// A failed holder listing was said.
    said_failure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    Flips,
    Holders,
}

impl Report {
    /// The interval ticked at `now_ns`. (A report still waiting is overtaken.)
    fn due(&mut self, now_ns: u64, p: &mut Pipeline<'_>, host: &mut HostWorker) -> io::Result<()> {
        self.due = Some(now_ns);
        self.waiting = None;
        self.flipped = false;
        self.go(p, host)
    }

    /// The host answered: what the tracker takes goes to it; holders go to the report
    /// waiting for them, or alone to the sinks that want them between reports.
    fn answered(
        &mut self,
        answer: Answer,
        p: &mut Pipeline<'_>,
        host: &mut HostWorker,
    ) -> io::Result<()> {
        let waiting = self.waiting.take();
        match (answer, waiting) {
            (Answer::Holders(h), Some(Waiting::Holders)) => {
                if let Some(at) = self.due.take() {
                    return p.interval(at, Some(&h));
                }
            }
            (Answer::Holders(h), _) => p.holders(h.at_ns, &h)?,
            (Answer::Failed(e), Some(Waiting::Holders)) => {
                self.cannot_list(&e);
                if let Some(at) = self.due.take() {
                    return p.interval(at, None);
                }
            }
            (answer, waiting) => {
                self.flipped |= waiting == Some(Waiting::Flips);
                p.host_answer(answer)?;
            }
        }
        self.go(p, host)
    }

    /// Says once that the holders could not be listed (their reports are skipped).
    fn cannot_list(&mut self, e: &sockdiag::DiagError) {
        if !std::mem::replace(&mut self.said_failure, true) {
            log::warn!("cannot list the sockets' holders: {e}");
        }
    }

    /// Asks the host for what the report needs next when it is free, or reports.
    fn go(&mut self, p: &mut Pipeline<'_>, host: &mut HostWorker) -> io::Result<()> {
        let Some(at) = self.due else {
            return Ok(());
        };
        if !p.track {
            self.due = None;
            return p.interval(at, None);
        }
        if self.waiting.is_some() || host.is_pending() {
            return Ok(()); // after the answer under way
        }
        if !self.flipped {
            self.flipped = true;
            let candidates = p.tracker.flip_candidates();
            if !candidates.is_empty() && host.ask(Ask::Flips(candidates)) {
                self.waiting = Some(Waiting::Flips);
                return Ok(());
            }
        }
        let states = p.holder_states(false);
        if !states.is_empty() && host.ask(Ask::Holders(states)) {
            self.waiting = Some(Waiting::Holders);
            return Ok(());
        }
        self.due = None;
        p.interval(at, None)
    }
}

/// Replays a record file. Intervals follow the recorded timestamps; on a screen (`top`)
/// each comes at its recorded pace, or when the keys step to it, and the end waits for
/// `q`. A corrupt or truncated file stops the replay with an error naming the byte
/// offset, after the sinks have reported what was read before it.
async fn replay(
    mut reader: RecordReader<BufReader<File>>,
    path: &str,
    interval: Option<Duration>,
    p: &mut Pipeline<'_>,
) -> Result<()> {
    let mut pace = p.link.clone().map(Pace::new).transpose()?;
    p.started(None)?;
    let step = interval.map(|d| d.as_nanos() as u64);
    let mut next_tick: Option<u64> = None;
    let mut last_ts = 0;
    let outcome = loop {
        if p.quit_asked() {
            break Ok(());
        }
        match reader.next_item() {
            Ok(Some(Item::Event(t))) => {
                p.totals.events += 1;
                if let Some(step) = step {
                    let ts = t.ts_ns();
                    let due = *next_tick.get_or_insert(ts + step);
                    if ts >= due {
                        if let Some(pace) = &mut pace {
                            pace.until(due, p).await?;
                        }
                        p.interval(due, None)?;
                        next_tick = Some(due + step * ((ts - due) / step + 1));
                    }
                }
                last_ts = last_ts.max(t.ts_ns());
                p.event(&t)?;
            }
            // Recordings keep the total; a replay reports it as the ring's.
            Ok(Some(Item::Lost(n))) => {
                p.totals.lost = Lost {
                    ring_full: n,
                    recursion: 0,
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if outcome.is_ok()
        && let Some(pace) = &mut pace
    {
        pace.end(last_ts, p).await?;
    }
    p.finish(last_ts, None)?;
    p.batch_done()?;
    outcome.with_context(|| format!("{path}: {} events read before the error", p.totals.events))
}

/// A replay on a screen: the intervals come at the recorded pace, or one per `n` while
/// stepping (`--step`, space), and the end waits for `q` (or SIGTERM).
struct Pace {
    link: Link,
    sigterm: tokio::signal::unix::Signal,
    /// The recorded time shown at a wall-clock instant: the pace's reference.
    origin: Option<(tokio::time::Instant, u64)>,
}

impl Pace {
    fn new(link: Link) -> Result<Pace> {
        Ok(Pace {
            link,
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            origin: None,
        })
    }

    /// Waits until the interval that ends at `due` is to be shown, or the screen quits.
    async fn until(&mut self, due: u64, p: &mut Pipeline<'_>) -> io::Result<()> {
        let control = self.link.control.clone();
        while !p.quit_asked() {
            if control.stepping.get() {
                self.origin = None;
                if control.steps.get() > 0 {
                    control.steps.set(control.steps.get() - 1);
                    return Ok(());
                }
                self.key(p).await?;
                continue;
            }
            let (at, from) = *self
                .origin
                .get_or_insert((tokio::time::Instant::now(), due));
            tokio::select! {
                () = tokio::time::sleep_until(at + Duration::from_nanos(due - from)) => return Ok(()),
                () = self.link.wake.notified() => {}
                _ = self.sigterm.recv() => control.quit.set(true),
            }
            p.batch_done()?;
        }
        Ok(())
    }

    /// The recording ended at `last_ts`: its last interval shows until `q`.
    async fn end(&mut self, last_ts: u64, p: &mut Pipeline<'_>) -> io::Result<()> {
        self.link.control.ended.set(true);
        p.interval(last_ts, None)?;
        while !p.quit_asked() {
            self.key(p).await?;
        }
        Ok(())
    }

    /// Waits for a key (or SIGTERM) and lets the screen take it.
    async fn key(&mut self, p: &mut Pipeline<'_>) -> io::Result<()> {
        tokio::select! {
            () = self.link.wake.notified() => {}
            _ = self.sigterm.recv() => self.link.control.quit.set(true),
        }
        p.batch_done()
    }
}

async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn woken(wake: Option<&tokio::sync::Notify>) {
    match wake {
        Some(w) => w.notified().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The closing lines on stderr: what was read and lost, and lives whose end was not seen.
fn report(p: &Pipeline<'_>) {
    say(format_args!("{}", summary(&p.totals, p.tracker.stats())));
}

/// `1234 events read (56 timewait, 7 request), 0 lost`, then what the tracker could not
/// follow.
pub fn summary(totals: &Totals, stats: &crate::tracker::TrackerStats) -> String {
    let mut s = format!(
        "{} events read ({} timewait, {} request), {}",
        totals.events, totals.timewait, totals.requests, totals.lost
    );
    if totals.bad > 0 {
        s.push_str(&format!(", {} undecodable", totals.bad));
    }
    let unseen = stats.unseen_reused + stats.unseen_gone;
    if unseen > 0 {
        s.push_str(&format!(
            "; {unseen} sockets ended unseen ({} addresses reused, {} gone from sock_diag)",
            stats.unseen_reused, stats.unseen_gone
        ));
    }
    if stats.evicted > 0 {
        s.push_str(&format!(
            "; {} sockets evicted at the --max-sockets cap",
            stats.evicted
        ));
    }
    if stats.requests_untracked > 0 {
        s.push_str(&format!(
            "; {} SYNs not followed at the --max-sockets cap",
            stats.requests_untracked
        ));
    }
    s
}

fn stdout() -> (BufWriter<io::StdoutLock<'static>>, bool) {
    let out = io::stdout();
    let tty = out.is_terminal();
    (BufWriter::with_capacity(64 << 10, out.lock()), tty)
}

fn formatter(clock: WallClock) -> TimeFormatter {
    TimeFormatter::new(clock, TimeZone::system())
}

/// The metrics sink and its HTTP server, when `--serve`/`serve` asks for them.
fn metrics(
    serve: Option<std::net::SocketAddr>,
    filter: KernelFilter,
    names: CgroupNames,
) -> Result<Option<MetricsSink>> {
    let Some(addr) = serve else {
        return Ok(None);
    };
    let metrics = Arc::new(Metrics::new());
    let bound = crate::sink::metrics::serve(addr, metrics.clone())
        .with_context(|| format!("serving metrics on {addr}"))?;
    say(format_args!("metrics on http://{bound}/metrics"));
    Ok(Some(
        MetricsSink::new(metrics, filter, monotonic_now_ns()).with_names(names),
    ))
}

/// The command's own sink, plus the metrics sink when there is one.
fn sinks<'a>(own: &'a mut dyn Sink, metrics: &'a mut Option<MetricsSink>) -> Vec<&'a mut dyn Sink> {
    let mut v: Vec<&'a mut dyn Sink> = vec![own];
    if let Some(m) = metrics {
        v.push(m);
    }
    v
}

pub async fn serve(args: &ServeArgs) -> Result<()> {
    let mut metrics = metrics(Some(args.listen), args.trace.filter(), CgroupNames::host())?;
    let input = Input::Kernel(Box::new(open_kernel(&args.trace)?));
    let tracker = input.tracker(args.cap.max_sockets);
    let mut none = NoOutput;
    let mut p = Pipeline::new(tracker, sinks(&mut none, &mut metrics));
    run(input, &args.trace, Some(Duration::from_secs(1)), &mut p).await?;
    report(&p);
    Ok(())
}

/// `serve` prints nothing but its metrics.
struct NoOutput;

impl Sink for NoOutput {}

pub async fn watch(args: &WatchArgs) -> Result<()> {
    let input = Input::open(&args.common)?;
    let mut metrics = metrics(
        args.metrics.serve,
        args.common.trace.filter(),
        input.cgroup_names(),
    )?;
    let (out, tty) = stdout();
    let mut sink = WatchSink {
        printer: WatchPrinter::new(
            out,
            args.output.format,
            formatter(input.clock()),
            input.cgroup_names(),
        ),
        line_flush: tty,
    };
    let tracker = input.tracker(args.common.cap.max_sockets);
    let mut p = Pipeline::new(tracker, sinks(&mut sink, &mut metrics));
    p.owner_pid = args.common.owner.pid;
    run(input, &args.common.trace, None, &mut p).await?;
    report(&p);
    Ok(())
}

pub async fn timeline(args: &TimelineArgs) -> Result<()> {
    let input = Input::open(&args.common)?;
    let (out, _) = stdout();
    let mut sink = TimelineSink::new(
        out,
        args.output.format,
        formatter(input.clock()),
        input.cgroup_names(),
    );
    let tracker = input.tracker(args.common.cap.max_sockets);
    let mut p = Pipeline::new(tracker, vec![&mut sink]);
    p.owner_pid = args.common.owner.pid;
    run(input, &args.common.trace, None, &mut p).await?;
    report(&p);
    Ok(())
}

pub async fn stats(args: &StatsArgs) -> Result<()> {
    let input = Input::open(&args.base.common)?;
    let mut metrics = metrics(
        args.base.metrics.serve,
        args.base.common.trace.filter(),
        input.cgroup_names(),
    )?;
    let (out, _) = stdout();
    let mut sink = StatsSink::new(
        out,
        args.base.output.format,
        formatter(input.clock()),
        args.by,
        input.cgroup_names(),
    );
    let tracker = input.tracker(args.base.common.cap.max_sockets);
    let mut p = Pipeline::new(tracker, sinks(&mut sink, &mut metrics));
    p.owner_pid = args.base.common.owner.pid;
    run(input, &args.base.common.trace, args.interval, &mut p).await?;
    report(&p);
    Ok(())
}

pub async fn record(args: &RecordArgs) -> Result<()> {
    let source = open_kernel(&args.trace)?;
    let file = create(&args.output)?;
    let writer = RecordWriter::new(BufWriter::with_capacity(1 << 16, file), WallClock::now())
        .with_context(|| format!("writing {}", args.output.display()))?;
    let mut sink = RecordSink { writer, events: 0 };
    let mut p = Pipeline::new(Tracker::default(), vec![&mut sink]);
    p.track = false;
    run(
        Input::Kernel(Box::new(source)),
        &args.trace,
        Some(Duration::from_secs(1)),
        &mut p,
    )
    .await
    .with_context(|| format!("writing {}", args.output.display()))?;
    report(&p);
    say(format_args!(
        "{} events written to {}",
        sink.events,
        args.output.display()
    ));
    Ok(())
}

/// `leaks`: returns whether any report listed a socket.
pub async fn leaks(args: &LeaksArgs) -> Result<bool> {
    let mut metrics = metrics(args.metrics.serve, args.trace.filter(), CgroupNames::host())?;
    let start_ns = monotonic_now_ns();
    let source = open_kernel(&args.trace)?;
    let (out, _) = stdout();
    let mut sink = LeaksSink::new(
        out,
        args.output.format,
        formatter(WallClock::now()),
        LeakQuery {
            state: args.state,
            threshold_ns: args.threshold.as_nanos() as u64,
            start_ns,
            filter: args.trace.filter(),
            pid: args.owner.pid,
        },
    )
    .with_names(CgroupNames::host());
    let input = Input::Kernel(Box::new(source));
    let tracker = input.tracker(args.cap.max_sockets);
    let mut p = Pipeline::new(tracker, sinks(&mut sink, &mut metrics));
    run(input, &args.trace, Some(args.interval), &mut p).await?;
    report(&p);
    Ok(sink.found_any)
}

pub async fn listen(args: &ListenArgs) -> Result<()> {
    if args.trace.no_requests {
        anyhow::bail!("listen follows request sockets: --no-requests leaves it nothing to show");
    }
    let source = open_kernel(&args.trace)?;
    if !source.requests {
        log::warn!(
            "the SYN queue columns stay 0: request sockets cannot be followed on this kernel"
        );
    }
    let (out, _) = stdout();
    let mut sink = ListenSink::new(
        out,
        args.output.format,
        formatter(WallClock::now()),
        args.trace.filter(),
        CgroupNames::host(),
    );
    let input = Input::Kernel(Box::new(source));
    let tracker = input.tracker(args.cap.max_sockets);
    let mut p = Pipeline::new(tracker, vec![&mut sink]);
    run(input, &args.trace, Some(args.interval), &mut p).await?;
    report(&p);
    Ok(())
}

/// `top`: the dashboard, live or over a recording, until `q`, Ctrl-C, SIGTERM or
/// `--duration`; then the usual summary on stderr.
pub async fn top(args: &TopArgs) -> Result<()> {
    term::check()?;
    let common = &args.common;
    let input = Input::open(common)?;
    let mut model = TopModel::new(common.trace.filter(), input.cgroup_names());
    model.owner_pid = common.owner.pid;
    let mut tracker = input.tracker(common.cap.max_sockets);
    // A frame reads sockets per group from these, not from every socket.
    tracker.count_groups();
    let times = formatter(input.clock());
    let wake = Arc::new(tokio::sync::Notify::new());
    let (terminal, guard, keys) = term::enter(wake.clone()).context("setting up the terminal")?;
    // While the screen is up nothing else may write on the terminal: it shows lost
    // events itself, and the summary follows at exit.
    let level = log::max_level();
    log::set_max_level(log::LevelFilter::Off);
    let mut sink = TopSink::new(model, terminal, Some(keys), times);
    if let Input::File { path, .. } = &input {
        sink.mode = format!("replay of {path}");
        sink.ui.replay = true;
        sink.control.stepping.set(args.step);
    }
    let link = Link {
        wake,
        control: sink.control.clone(),
    };
    let mut p = Pipeline::new(tracker, vec![&mut sink]);
    p.owner_pid = common.owner.pid;
    p.link = Some(link);
    let result = run(input, &common.trace, Some(args.interval), &mut p).await;
    drop(guard);
    log::set_max_level(level);
    report(&p);
    result
}

/// `floor` (hidden, for `cargo xtask bench`): programs that return at once on tcplens's
/// tracepoints, attached until SIGINT, SIGTERM or `--duration`.
pub async fn floor(args: &FloorArgs) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let floor = crate::source::kernel::Floor::attach()?;
    say(format_args!("floor programs attached; Ctrl-C to stop"));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        () = sleep_until(deadline) => {}
    }
    drop(floor);
    Ok(())
}

fn create(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kernel::{LossSource, SourceError};
    use crate::tracker::TrackerStats;

    /// A stand-in for the kernel's counters: ring drops and recursion misses.
    struct Fake(Lost);

    impl LossSource for Fake {
        fn lost(&self) -> Result<Lost, SourceError> {
            Ok(self.0)
        }
    }

    #[test]
    fn recursion_misses_count_as_lost() {
        let mut totals = Totals {
            events: 1234,
            timewait: 56,
            requests: 7,
            ..Totals::default()
        };
        let stats = TrackerStats::default();
        totals.read_lost(&Fake(Lost::default())).unwrap();
        assert_eq!(
            summary(&totals, &stats),
            "1234 events read (56 timewait, 7 request), 0 lost"
        );
        totals
            .read_lost(&Fake(Lost {
                ring_full: 0,
                recursion: 11,
            }))
            .unwrap();
        assert_eq!(totals.lost.total(), 11);
        assert_eq!(
            summary(&totals, &stats),
            "1234 events read (56 timewait, 7 request), 11 lost (ring buffer full 0, recursion 11)"
        );
    }

    #[test]
    fn the_summary_says_which_ends_were_not_seen() {
        let stats = TrackerStats {
            evicted: 2,
            mismatched: 0,
            unseen_reused: 3,
            unseen_gone: 1,
            requests_untracked: 5,
        };
        assert_eq!(
            summary(&Totals::default(), &stats),
            "0 events read (0 timewait, 0 request), 0 lost; 4 sockets ended unseen (3 addresses reused, 1 gone from sock_diag); 2 sockets evicted at the --max-sockets cap; 5 SYNs not followed at the --max-sockets cap"
        );
    }
}
