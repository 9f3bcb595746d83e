//! A circuit breaker, so a down Credyt gets probes instead of a flood.
//!
//! Contract: closed, it lets every call through and counts consecutive failed calls; after
//! `threshold` of them it opens for `cooldown`, during which [`Breaker::permit`] refuses
//! calls. When the cooldown ends it is half-open: exactly one probe is allowed; a success closes
//! it, a failure opens it again with the cooldown doubled (up to `max_cooldown`). Time is passed
//! in, so the logic is tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// What the caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Send as much as the concurrency bound allows.
    All,
    /// Send exactly one probe.
    Probe,
    /// Send nothing before this instant.
    WaitUntil(Instant),
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
    failures: u32,
    cooldown: Duration,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, base_cooldown: Duration, max_cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            base_cooldown,
            max_cooldown,
            failures: 0,
            cooldown: base_cooldown,
            open_until: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(t) if now < t => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Until when it stays open (meaningful while [`BreakerState::Open`]).
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state(now) {
            BreakerState::Closed => Permit::All,
            BreakerState::Open => Permit::WaitUntil(self.open_until.unwrap_or(now)),
            BreakerState::HalfOpen if self.probing => Permit::WaitUntil(now + self.base_cooldown),
            BreakerState::HalfOpen => {
                self.probing = true;
                Permit::Probe
            }
        }
    }

    pub fn on_success(&mut self) {
        self.failures = 0;
        self.cooldown = self.base_cooldown;
        self.open_until = None;
        self.probing = false;
    }

    /// Records a retryable failure; `retry_after` (from upstream) lengthens the open period.
    pub fn on_failure(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.failures = self.failures.saturating_add(1);
        let was_probe = self.probing;
        self.probing = false;
        if was_probe || self.failures >= self.threshold {
            if was_probe {
                self.cooldown = (self.cooldown * 2).min(self.max_cooldown);
            }
            let wait = retry_after.map_or(self.cooldown, |r| r.max(self.cooldown));
            self.open_until = Some(now + wait.min(self.max_cooldown.max(wait)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_once_and_backs_off() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = Breaker::new(3, s, Duration::from_secs(8));
        assert_eq!(b.permit(t0), Permit::All);
        b.on_failure(t0, None);
        b.on_failure(t0, None);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(t0, None);
        assert_eq!(b.permit(t0), Permit::WaitUntil(t0 + s));
        // Cooldown over: exactly one probe.
        let t1 = t0 + s;
        assert_eq!(b.permit(t1), Permit::Probe);
        assert!(matches!(b.permit(t1), Permit::WaitUntil(_)));
        // The probe fails: open again for twice as long.
        b.on_failure(t1, None);
        assert_eq!(b.permit(t1), Permit::WaitUntil(t1 + 2 * s));
        let t2 = t1 + 2 * s;
        assert_eq!(b.permit(t2), Permit::Probe);
        b.on_success();
        assert_eq!(b.permit(t2), Permit::All);
    }

    #[test]
    fn cooldown_is_capped_and_honours_retry_after() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1), Duration::from_secs(4));
        b.on_failure(t0, Some(Duration::from_secs(3)));
        assert_eq!(b.permit(t0), Permit::WaitUntil(t0 + Duration::from_secs(3)));
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_secs(60);
            assert_eq!(b.permit(now), Permit::Probe);
            b.on_failure(now, None);
        }
        assert_eq!(
            b.permit(now),
            Permit::WaitUntil(now + Duration::from_secs(4))
        );
    }
}
