//! The kernel's tick, learned from the events themselves: every event carries the jiffies
//! and the monotonic time it fired at, so pairs of them give HZ and where jiffy 0 sits on
//! the monotonic clock. Nothing is read from the kernel's config (which many hosts and
//! containers do not have).

/// The tick rates Linux is built with (`CONFIG_HZ`).
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];
/// Below this much time between two samples, HZ is not judged yet.
const MIN_SPAN_NS: u64 = 100_000_000;
/// With no known rate matching by then, the measured one is taken as it is.
const TRUST_SPAN_NS: u64 = 10_000_000_000;

#[derive(Clone, Copy, Debug, Default)]
pub struct JiffyClock {
    /// The first (monotonic ns, jiffies) pair seen.
    first: Option<(u64, u64)>,
    /// Nanoseconds per jiffy, once known.
    tick_ns: Option<u64>,
    /// Monotonic ns of jiffy 0: the least `ts - jiffies * tick` seen, which is a tick edge
    /// plus the shortest delay observed.
    base: Option<i128>,
}

impl JiffyClock {
    /// A clock of a known HZ (recordings that stored it).
    pub fn with_hz(hz: u32) -> Self {
        let mut c = JiffyClock::default();
        if hz > 0 {
            c.tick_ns = Some(tick_of(u64::from(hz)));
        }
        c
    }

    pub fn hz(&self) -> Option<u32> {
        self.tick_ns
            .map(|t| u32::try_from((1_000_000_000 + t / 2) / t).unwrap_or(0))
    }

    pub fn tick_ns(&self) -> Option<u64> {
        self.tick_ns
    }

    /// Learns from one event's (monotonic ns, jiffies); `jiffies == 0` is "not given".
    pub fn learn(&mut self, ts_ns: u64, jiffies: u64) {
        if jiffies == 0 {
            return;
        }
        let Some((t0, j0)) = self.first else {
            self.first = Some((ts_ns, jiffies));
            return;
        };
        if self.tick_ns.is_none() {
            self.tick_ns = estimate(t0, j0, ts_ns, jiffies);
            if let Some(tick) = self.tick_ns {
                self.base = Some(base(t0, j0, tick));
            }
        }
        if let Some(tick) = self.tick_ns {
            let b = base(ts_ns, jiffies, tick);
            self.base = Some(self.base.map_or(b, |old| old.min(b)));
        }
    }

    /// Monotonic ns of the middle of jiffy `j`, once known.
    pub fn mono_ns(&self, j: u64) -> Option<u64> {
        let (tick, base) = (self.tick_ns?, self.base?);
        let ns = base + i128::from(j) * i128::from(tick) + i128::from(tick / 2);
        u64::try_from(ns).ok()
    }

    /// `secs` seconds in jiffies, once HZ is known.
    pub fn jiffies_in(&self, secs: u64) -> Option<u64> {
        Some(secs * u64::from(self.hz()?))
    }
}

fn tick_of(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

fn base(ts_ns: u64, jiffies: u64, tick: u64) -> i128 {
    i128::from(ts_ns) - i128::from(jiffies) * i128::from(tick)
}

/// The tick from two samples: the known rate the measurement fits (each end is off by up
/// to a jiffy), or the measured rate itself once the span is long.
fn estimate(t0: u64, j0: u64, t1: u64, j1: u64) -> Option<u64> {
    let (dt, dj) = (t1.checked_sub(t0)?, j1.checked_sub(j0)?);
    if dt < MIN_SPAN_NS || dj == 0 {
        return None;
    }
    let measured = dj as f64 * 1e9 / dt as f64;
    // One jiffy at each end: the measurement's own error, in Hz.
    let slack = 2e9 / dt as f64;
    let fits: Vec<u64> = KNOWN_HZ
        .into_iter()
        .filter(|&hz| (measured - hz as f64).abs() <= slack + hz as f64 * 0.005)
        .collect();
    match fits.as_slice() {
        [hz] => Some(tick_of(*hz)),
        _ if dt >= TRUST_SPAN_NS => Some(tick_of(measured.round().max(1.0) as u64)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Samples of a kernel with `hz` whose jiffy 0 was at monotonic `zero`, taken `delay`
    /// after a tick edge.
    fn sample(hz: u64, zero: u64, at: u64) -> (u64, u64) {
        let tick = S / hz;
        (at, (at - zero) / tick)
    }

    #[test]
    fn learns_each_known_rate_within_a_second() {
        for hz in KNOWN_HZ {
            let mut c = JiffyClock::default();
            let zero = 3 * S;
            for at in [
                10 * S + 1_234_567,
                10 * S + 300_000_000,
                10 * S + 900_000_000,
            ] {
                let (ts, j) = sample(hz, zero, at);
                c.learn(ts, j);
            }
            assert_eq!(c.hz(), Some(hz as u32), "HZ={hz}");
        }
    }

    #[test]
    fn too_short_a_span_says_nothing_yet() {
        let mut c = JiffyClock::default();
        c.learn(10 * S, 2500);
        c.learn(10 * S + 50_000_000, 2512);
        assert_eq!(c.hz(), None);
        assert_eq!(c.mono_ns(2500), None);
        c.learn(0, 0); // no jiffies given: ignored
        assert_eq!(c.hz(), None);
    }

    #[test]
    fn maps_jiffies_to_the_middle_of_their_tick() {
        let mut c = JiffyClock::default();
        // HZ=250, jiffy j starts at 1 s + 4 ms * j; events come 0.3 ms and 1.7 ms after it.
        c.learn(S + 4_000_000 * 100 + 1_700_000, 100);
        c.learn(S + 4_000_000 * 400 + 300_000, 400);
        assert_eq!(c.hz(), Some(250));
        // The least delay seen (0.3 ms) is taken as the tick edge.
        assert_eq!(
            c.mono_ns(1000),
            Some(S + 4_000_000 * 1000 + 300_000 + 2_000_000)
        );
        assert_eq!(c.jiffies_in(60), Some(15_000));
        assert_eq!(JiffyClock::with_hz(1000).jiffies_in(60), Some(60_000));
    }
}
