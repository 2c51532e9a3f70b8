//! Sinks: where tracked transitions end up. Every sink reads from the one tracker: it gets
//! each transition with what the tracker knows of it, each socket life that ends, and the
//! tracker itself at interval and exit time.

pub mod leaks;
pub mod metrics;
pub mod record;
pub mod stats;
pub mod timeline;
pub mod watch;

use std::io;

use crate::app::Totals;
use crate::model::{KernelEvent, Transition};
use crate::tracker::{Observed, SocketLife, Tracker};

/// Output format shared by the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for people.
    Text,
    /// One JSON object per line, for jq and log shippers.
    Json,
}

pub trait Sink {
    /// Tracing has started (the program is attached, or the file is open).
    fn started(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Every event as decoded, before the tracker (the recorder keeps them raw).
    fn event(&mut self, _ev: &KernelEvent) -> io::Result<()> {
        Ok(())
    }
    /// A transition of the TCP view: as the kernel reported it, or derived from a timewait
    /// socket (`t.via`).
    fn transition(&mut self, _t: &Transition, _o: &Observed) -> io::Result<()> {
        Ok(())
    }
    /// A socket's life ended (closed, evicted, or still open at exit).
    fn life_ended(&mut self, _life: &SocketLife) -> io::Result<()> {
        Ok(())
    }
    /// After each batch of events (at least every 10 ms while events flow): the flush
    /// point.
    fn batch_done(&mut self, _totals: &Totals, _tracker: &Tracker) -> io::Result<()> {
        Ok(())
    }
    /// Every `--interval` (kernel monotonic `now_ns`).
    fn interval(&mut self, _now_ns: u64, _totals: &Totals, _tracker: &Tracker) -> io::Result<()> {
        Ok(())
    }
    /// At exit, after the still-open lives were handed to [`Sink::life_ended`].
    fn finish(&mut self, _now_ns: u64, _totals: &Totals, _tracker: &Tracker) -> io::Result<()> {
        Ok(())
    }
}

/// A namespace inode for JSON: `null` when unknown (recordings made before tcplens read
/// it).
pub fn netns(inode: u32) -> Option<u32> {
    (inode != 0).then_some(inode)
}

/// A cookie for JSON: `null` when unknown.
pub fn cookie(cookie: u64) -> Option<u64> {
    (cookie != 0).then_some(cookie)
}

/// A duration for people: `850ns`, `12.5us`, `1.500ms`, `2.250s`, `3m05s`, `1h02m`.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.3}ms", ns as f64 / 1e6),
        1_000_000_000..60_000_000_000 => format!("{:.3}s", ns as f64 / 1e9),
        60_000_000_000..3_600_000_000_000 => {
            let s = ns / 1_000_000_000;
            format!("{}m{:02}s", s / 60, s % 60)
        }
        _ => {
            let m = ns / 60_000_000_000;
            format!("{}h{:02}m", m / 60, m % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::human_ns;

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(12_500), "12.5us");
        assert_eq!(human_ns(1_500_000), "1.500ms");
        assert_eq!(human_ns(2_250_000_000), "2.250s");
        assert_eq!(human_ns(185_000_000_000), "3m05s");
        assert_eq!(human_ns(3_720_000_000_000), "1h02m");
    }
}
