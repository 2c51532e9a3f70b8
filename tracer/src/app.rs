//! The pipeline, wired: source → decode → tracker → sink, with the live loop that stops on
//! `--duration`, SIGINT or SIGTERM.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context as _, Result};
use jiff::tz::TimeZone;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{TraceArgs, WatchArgs};
use crate::clock::{TimeFormatter, WallClock};
use crate::decode::decode;
use crate::sink::watch::WatchPrinter;
use crate::source::kernel::{KernelOptions, KernelSource};
use crate::tracker::Tracker;

/// What a run saw, reported on stderr at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records read from the ring buffer.
    pub events: u64,
    /// Records the kernel dropped because the ring buffer was full.
    pub lost: u64,
    /// Records that did not decode (a bug if ever non-zero: the ABI is shared).
    pub bad: u64,
}

/// Per-record and per-batch work of a command.
pub trait Stage {
    /// Called once the program is attached, before the first record (headers).
    fn started(&mut self) -> io::Result<()>;
    fn record(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Called after each drained batch (flush point).
    fn batch_done(&mut self) -> io::Result<()>;
}

/// `watch`: decode, track, print.
pub struct Watch<W: Write> {
    tracker: Tracker,
    printer: WatchPrinter<W>,
    line_flush: bool,
    pub bad: u64,
}

impl<W: Write> Watch<W> {
    pub fn new(printer: WatchPrinter<W>, line_flush: bool) -> Self {
        Watch {
            tracker: Tracker::new(),
            printer,
            line_flush,
            bad: 0,
        }
    }
}

impl<W: Write> Stage for Watch<W> {
    fn started(&mut self) -> io::Result<()> {
        self.printer.header()?;
        self.printer.flush()
    }

    fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        match decode(bytes) {
            Ok(t) => {
                let o = self.tracker.observe(&t);
                self.printer.transition(&t, &o)?;
                if self.line_flush {
                    self.printer.flush()?;
                }
            }
            Err(e) => {
                self.bad += 1;
                log::warn!("undecodable event: {e}");
            }
        }
        Ok(())
    }

    fn batch_done(&mut self) -> io::Result<()> {
        self.printer.flush()
    }
}

/// Runs a stage on the live kernel stream until `--duration`, SIGINT or SIGTERM (or the
/// output closes), then drains what is left and reports the totals on stderr.
pub async fn run_live(trace: &TraceArgs, what: &str, stage: &mut impl Stage) -> Result<Totals> {
    let mut source = KernelSource::open(&KernelOptions {
        filter: trace.filter(),
        ring_size: trace.ring_size,
    })?;
    let KernelSource {
        events, logs, lost, ..
    } = &mut source;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = trace.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut totals = Totals::default();
    let mut reported_lost = 0;
    let mut failed: Option<io::Error> = None;

    eprintln!("tcplens: {what}; Ctrl-C to stop");
    if let Err(e) = stage.started() {
        failed = Some(e);
    }
    while failed.is_none() {
        tokio::select! {
            batch = events.next_batch(|b| {
                totals.events += 1;
                if failed.is_none()
                    && let Err(e) = stage.record(b)
                {
                    failed = Some(e);
                }
            }) => {
                batch?;
                if failed.is_none() && let Err(e) = stage.batch_done() {
                    failed = Some(e);
                }
                if failed.is_some() {
                    break;
                }
            }
            forwarded = logs.forward_logs() => forwarded?,
            _ = tick.tick() => {
                let lost = lost.get()?;
                if lost > reported_lost {
                    log::warn!("{lost} events lost so far (ring buffer full): a larger --ring-size may help");
                    reported_lost = lost;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep_until(deadline) => break,
        }
    }
    if failed.is_none() {
        events.drain_now(|b| {
            totals.events += 1;
            if failed.is_none()
                && let Err(e) = stage.record(b)
            {
                failed = Some(e);
            }
        });
        if failed.is_none()
            && let Err(e) = stage.batch_done()
        {
            failed = Some(e);
        }
    }
    totals.lost = lost.get()?;
    drop(source); // detaches the program
    match failed {
        // The reader went away (`tcplens watch | head`): a normal way to stop.
        Some(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Some(e) => return Err(e).context("writing the output"),
        None => {}
    }
    Ok(totals)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn report(totals: &Totals) {
    eprintln!(
        "tcplens: {} events read, {} lost in the kernel{}",
        totals.events,
        totals.lost,
        if totals.bad > 0 {
            format!(", {} undecodable", totals.bad)
        } else {
            String::new()
        }
    );
}

pub async fn watch(args: &WatchArgs) -> Result<()> {
    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let out = io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let times = TimeFormatter::new(WallClock::now(), TimeZone::system());
    let printer = WatchPrinter::new(out, args.format, times);
    let mut stage = Watch::new(printer, tty);
    let mut totals = run_live(&args.trace, "tracing TCP state transitions", &mut stage).await?;
    totals.bad = stage.bad;
    report(&totals);
    Ok(())
}
