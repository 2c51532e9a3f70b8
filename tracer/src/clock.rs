//! Kernel monotonic nanoseconds to wall-clock time, and its text forms.
//!
//! Events carry `bpf_ktime_get_ns()` (CLOCK_MONOTONIC). The offset to CLOCK_REALTIME is taken
//! once at start-up, so printed times are when the kernel saw the transition, not when
//! userspace got round to printing it.

use std::fmt::Write as _;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use nix::time::{ClockId, clock_gettime};

/// Maps kernel monotonic time to Unix time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// Unix-epoch nanoseconds at monotonic zero.
    pub boot_offset_ns: i128,
}

fn ns(id: ClockId) -> i128 {
    // CLOCK_MONOTONIC and CLOCK_REALTIME cannot fail on Linux.
    clock_gettime(id).map_or(0, |t| {
        i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
    })
}

/// Now, in kernel monotonic nanoseconds (the clock of `Transition::ts_ns`).
pub fn monotonic_now_ns() -> u64 {
    u64::try_from(ns(ClockId::CLOCK_MONOTONIC)).unwrap_or(0)
}

impl WallClock {
    /// Samples both clocks; the realtime reads bracket the monotonic one and the tightest
    /// of a few tries is kept.
    pub fn now() -> Self {
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let r1 = ns(ClockId::CLOCK_REALTIME);
            let m = ns(ClockId::CLOCK_MONOTONIC);
            let r2 = ns(ClockId::CLOCK_REALTIME);
            let gap = r2 - r1;
            let offset = r1 + gap / 2 - m;
            if best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, offset));
            }
        }
        WallClock {
            boot_offset_ns: best.map_or(0, |(_, o)| o),
        }
    }

    pub fn unix_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.boot_offset_ns
    }

    pub fn timestamp(&self, mono_ns: u64) -> Timestamp {
        Timestamp::from_nanosecond(self.unix_ns(mono_ns)).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// Formats times, caching the part that changes once a second: printing stays cheap at
/// hundreds of thousands of events a second.
pub struct TimeFormatter {
    clock: WallClock,
    tz: TimeZone,
    rfc3339: (i64, String),
    local: (i64, String),
}

impl TimeFormatter {
    /// Wall times in `tz` for the text view (the system zone for users, UTC in tests).
    pub fn new(clock: WallClock, tz: TimeZone) -> Self {
        TimeFormatter {
            clock,
            tz,
            rfc3339: (i64::MIN, String::new()),
            local: (i64::MIN, String::new()),
        }
    }

    fn split(&self, mono_ns: u64) -> (i64, u32) {
        let unix = self.clock.unix_ns(mono_ns);
        let secs = unix.div_euclid(1_000_000_000);
        let sub = unix.rem_euclid(1_000_000_000);
        (i64::try_from(secs).unwrap_or(0), sub as u32)
    }

    /// RFC 3339 UTC with nanoseconds: `2026-11-21T22:10:02.123456789Z`.
    pub fn rfc3339(&mut self, mono_ns: u64, out: &mut String) {
        let (secs, sub) = self.split(mono_ns);
        if self.rfc3339.0 != secs {
            let dt = Timestamp::from_second(secs)
                .unwrap_or(Timestamp::UNIX_EPOCH)
                .to_zoned(TimeZone::UTC)
                .datetime();
            self.rfc3339 = (secs, dt.strftime("%Y-%m-%dT%H:%M:%S").to_string());
        }
        out.push_str(&self.rfc3339.1);
        let _ = write!(out, ".{sub:09}Z");
    }

    /// Local time of day with milliseconds: `22:10:02.123`.
    pub fn time_of_day(&mut self, mono_ns: u64, out: &mut String) {
        let (secs, sub) = self.split(mono_ns);
        if self.local.0 != secs {
            let dt = Timestamp::from_second(secs)
                .unwrap_or(Timestamp::UNIX_EPOCH)
                .to_zoned(self.tz.clone())
                .datetime();
            self.local = (secs, dt.strftime("%H:%M:%S").to_string());
        }
        out.push_str(&self.local.1);
        let _ = write!(out, ".{:03}", sub / 1_000_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_nanoseconds() {
        // 2026-11-21T22:10:02Z is 1795299002 s after the epoch.
        let clock = WallClock {
            boot_offset_ns: 1_795_299_002_000_000_000 - 431_000_000_000,
        };
        let mut f = TimeFormatter::new(clock, TimeZone::UTC);
        let mut s = String::new();
        f.rfc3339(431_123_456_789, &mut s);
        assert_eq!(s, "2026-11-21T22:10:02.123456789Z");
        s.clear();
        f.rfc3339(432_000_000_001, &mut s);
        assert_eq!(s, "2026-11-21T22:10:03.000000001Z");
        s.clear();
        f.time_of_day(432_999_999_999, &mut s);
        assert_eq!(s, "22:10:03.999");
    }

    #[test]
    fn wall_clock_tracks_realtime() {
        let clock = WallClock::now();
        let wall = clock.unix_ns(monotonic_now_ns());
        let real = ns(ClockId::CLOCK_REALTIME);
        assert!(
            (real - wall).abs() < 50_000_000,
            "off by {} ns",
            real - wall
        );
    }
}
