//! Adaptive concurrency for the forwarder: how many calls to Credyt may be in flight at once.
//!
//! Contract: the limit stays within `[min, max]` (a fixed setting is `min == max`). Time is
//! cut into windows of about one round trip (the median latency of the last window, within
//! 10 ms..1 s). At the end of a window:
//! - **back-pressure** seen (a 429, a 503, a timeout or a transport error) → the limit is
//!   multiplied by 0.75: Credyt is telling us to slow down, or is not keeping up;
//! - otherwise, **latency rising** (the window's median more than twice the baseline, the
//!   lowest recent median) → the limit is multiplied by 0.9: calls are queueing somewhere,
//!   here or at Credyt, and more of them would only wait longer;
//! - otherwise, if the window was **saturated** (every slot was in use at some point, so more
//!   slots could have been used) → the limit grows: doubling per window until the first
//!   decrease (slow start, so 50 ms of latency reaches a thousand slots in well under a second),
//!   then by a sixteenth per window (additive-increase in steps that scale with the limit).
//!
//! The median, not the mean, judges latency: a few calls that take seconds (one slow customer)
//! hold a few slots, they say nothing about congestion. This is the idea of TCP's AIMD and of
//! Vector's adaptive request concurrency, with slow start. Pure and time-injected: the tests
//! drive it without sleeping.

use std::time::{Duration, Instant};

/// How one call ended, as far as the limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Credyt answered (success or a refusal): the latency counts.
    Answered,
    /// 429, 503, a timeout or a broken connection: slow down.
    Backpressure,
}

const MIN_WINDOW: Duration = Duration::from_millis(10);
const MAX_WINDOW: Duration = Duration::from_secs(1);
/// The least rise of the median over the baseline that counts as queueing.
const INFLATION_FLOOR: Duration = Duration::from_millis(2);
/// Latency samples kept per window (enough for a stable median, bounded memory).
const MAX_SAMPLES: usize = 512;

/// The AIMD controller.
#[derive(Debug)]
pub struct Concurrency {
    min: usize,
    max: usize,
    limit: usize,
    slow_start: bool,
    window_start: Instant,
    window: Duration,
    samples: Vec<Duration>,
    backpressure: bool,
    saturated: bool,
    baseline: Option<Duration>,
}

impl Concurrency {
    /// Starts at `initial` (clamped to the bounds).
    pub fn new(min: usize, max: usize, initial: usize, now: Instant) -> Concurrency {
        let min = min.max(1);
        let max = max.max(min);
        Concurrency {
            min,
            max,
            limit: initial.clamp(min, max),
            slow_start: true,
            window_start: now,
            window: MIN_WINDOW * 5,
            samples: Vec::with_capacity(64),
            backpressure: false,
            saturated: false,
            baseline: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn is_fixed(&self) -> bool {
        self.min == self.max
    }

    /// A call was started and `in_flight` calls are now out.
    pub fn on_dispatch(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.saturated = true;
        }
    }

    /// A call ended after `latency`; the limit may change (at the end of a window).
    pub fn on_response(&mut self, now: Instant, latency: Duration, signal: Signal) {
        match signal {
            Signal::Answered => {
                if self.samples.len() < MAX_SAMPLES {
                    self.samples.push(latency);
                }
            }
            Signal::Backpressure => self.backpressure = true,
        }
        if now.saturating_duration_since(self.window_start) >= self.window {
            self.end_window(now);
        }
    }

    fn end_window(&mut self, now: Instant) {
        let median = median(&mut self.samples);
        if let Some(m) = median {
            // The baseline follows the lowest median, and creeps up 1/32 per window so a
            // lasting change of Credyt's latency becomes the new normal.
            self.baseline = Some(match self.baseline {
                Some(b) => m.min(b + b / 32),
                None => m,
            });
            self.window = m.clamp(MIN_WINDOW, MAX_WINDOW);
        }
        // Doubled, and by more than scheduling noise (at sub-millisecond latencies a doubling
        // alone says little).
        let inflated = match (median, self.baseline) {
            (Some(m), Some(b)) => m > b * 2 && m > b + INFLATION_FLOOR,
            _ => false,
        };
        if self.backpressure {
            self.decrease(3, 4);
        } else if inflated {
            self.decrease(9, 10);
        } else if self.saturated {
            let step = if self.slow_start {
                self.limit
            } else {
                (self.limit / 16).max(1)
            };
            self.limit = self.limit.saturating_add(step).min(self.max);
        }
        self.samples.clear();
        self.backpressure = false;
        self.saturated = false;
        self.window_start = now;
    }

    fn decrease(&mut self, num: usize, den: usize) {
        self.slow_start = false;
        self.limit = (self.limit * num / den).max(self.min);
    }
}

fn median(samples: &mut [Duration]) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mid = samples.len() / 2;
    let (_, m, _) = samples.select_nth_unstable(mid);
    Some(*m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(50);

    /// Plays `windows` windows of `per_window` calls each with the given latency and signal,
    /// every window saturated; returns the limit after each window.
    fn play(
        c: &mut Concurrency,
        now: &mut Instant,
        windows: usize,
        latency: Duration,
        signal: Signal,
    ) -> Vec<usize> {
        let mut limits = Vec::new();
        for _ in 0..windows {
            c.on_dispatch(c.limit());
            for _ in 0..20 {
                c.on_response(*now, latency, Signal::Answered);
            }
            *now += latency.max(MIN_WINDOW);
            c.on_response(*now, latency, signal);
            limits.push(c.limit());
        }
        limits
    }

    #[test]
    fn rises_quickly_under_a_fast_flat_upstream_and_stops_at_max() {
        let mut now = Instant::now();
        let mut c = Concurrency::new(8, 1024, 32, now);
        let limits = play(&mut c, &mut now, 12, RTT, Signal::Answered);
        // Slow start: 32 -> 1024 in a handful of windows (a quarter of a second at 50 ms).
        assert!(limits[..6].contains(&1024), "{limits:?}");
        assert_eq!(c.limit(), 1024);
    }

    #[test]
    fn falls_under_429s_to_min_and_rises_again_additively() {
        let mut now = Instant::now();
        let mut c = Concurrency::new(8, 1024, 512, now);
        let limits = play(&mut c, &mut now, 30, RTT, Signal::Backpressure);
        assert!(limits.windows(2).all(|w| w[1] <= w[0]), "{limits:?}");
        assert_eq!(c.limit(), 8);
        // Back-pressure gone: growth resumes, but additively (no slow start after a decrease).
        let limits = play(&mut c, &mut now, 4, RTT, Signal::Answered);
        assert_eq!(limits, vec![9, 10, 11, 12]);
    }

    #[test]
    fn rising_latency_lowers_the_limit_and_a_few_slow_calls_do_not() {
        let mut now = Instant::now();
        let mut c = Concurrency::new(8, 1024, 256, now);
        play(&mut c, &mut now, 3, RTT, Signal::Answered);
        let before = c.limit();
        // Every call now takes 4x as long: queueing.
        play(&mut c, &mut now, 3, RTT * 4, Signal::Answered);
        assert!(c.limit() < before, "{} !< {before}", c.limit());

        // A fresh controller: 1 call in 21 takes 5 s (one slow customer), the rest 50 ms.
        let mut c = Concurrency::new(8, 1024, 64, now);
        for _ in 0..10 {
            c.on_dispatch(c.limit());
            for _ in 0..20 {
                c.on_response(now, RTT, Signal::Answered);
            }
            now += RTT;
            c.on_response(now, Duration::from_secs(5), Signal::Answered);
        }
        assert_eq!(c.limit(), 1024);
    }

    /// Near zero latency a doubling is noise unless it is also a rise of a few milliseconds:
    /// queueing behind a busy core (which more slots only make worse) is.
    #[test]
    fn at_sub_millisecond_latency_only_a_real_rise_lowers_the_limit() {
        let mut now = Instant::now();
        let fast = Duration::from_micros(300);
        let mut c = Concurrency::new(8, 1024, 64, now);
        // Past the first (longer) window, with the baseline at 0.3 ms.
        play(&mut c, &mut now, 8, fast, Signal::Answered);
        let before = c.limit();
        play(
            &mut c,
            &mut now,
            2,
            Duration::from_millis(1),
            Signal::Answered,
        );
        assert!(c.limit() >= before, "{} < {before}", c.limit());
        let before = c.limit();
        play(
            &mut c,
            &mut now,
            2,
            Duration::from_millis(6),
            Signal::Answered,
        );
        assert!(c.limit() < before, "{} !< {before}", c.limit());
    }

    #[test]
    fn an_unsaturated_window_does_not_grow_and_fixed_never_moves() {
        let mut now = Instant::now();
        let mut c = Concurrency::new(8, 1024, 32, now);
        for _ in 0..10 {
            c.on_dispatch(3);
            now += RTT;
            c.on_response(now, RTT, Signal::Answered);
        }
        assert_eq!(c.limit(), 32);

        let mut c = Concurrency::new(64, 64, 64, now);
        assert!(c.is_fixed());
        play(&mut c, &mut now, 5, RTT, Signal::Answered);
        play(&mut c, &mut now, 5, RTT, Signal::Backpressure);
        assert_eq!(c.limit(), 64);
    }
}
