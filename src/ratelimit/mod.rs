//! Per-tenant rate limits (governor, GCRA), generic over a clock so tests control time.
//!
//! Contract: each tenant has its own limiter, so one tenant exhausting its quota never affects
//! another. A request for `n` events takes `n` cells; when the tenant is over its quota the
//! answer is [`Refusal::RateLimited`], which says when to come back (`Retry-After`) and carries
//! the values of the `RateLimit` / `RateLimit-Policy` headers. A request of more events than
//! the burst can never pass, however long the client waits: that is [`Refusal::ExceedsBurst`],
//! not retryable. Checking is a few atomic operations: no lock, no I/O.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A tenant's quota: sustained events per second and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantQuota {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// Over the limit: come back after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded, retry after {retry_after:?}")]
pub struct RateLimited {
    pub retry_after: Duration,
    pub quota: TenantQuota,
}

/// Why a limiter refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Over the quota now; the same request passes later.
    #[error(transparent)]
    RateLimited(RateLimited),
    /// The request alone takes more cells than the burst: it can never pass as one request.
    #[error("the request has {events} events, more than the burst of {burst}")]
    ExceedsBurst { events: u32, burst: NonZeroU32 },
}

impl RateLimited {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): quota `q` per window `w` s.
    pub fn policy_header(&self) -> String {
        format!(
            "\"tenant\";q={};w=1;burst={}",
            self.quota.per_second, self.quota.burst
        )
    }

    /// `RateLimit`: remaining `r` and seconds `t` until the quota allows again.
    pub fn ratelimit_header(&self) -> String {
        format!("\"tenant\";r=0;t={}", self.retry_after_secs())
    }
}

/// One tenant's limiter.
pub struct TenantLimiter<C: Clock + Clone = DefaultClock> {
    quota: TenantQuota,
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl TenantLimiter<DefaultClock> {
    pub fn new(quota: TenantQuota) -> Self {
        Self::with_clock(quota, DefaultClock::default())
    }
}

impl<C: Clock + Clone> TenantLimiter<C> {
    pub fn with_clock(quota: TenantQuota, clock: C) -> Self {
        let q = Quota::per_second(quota.per_second).allow_burst(quota.burst);
        TenantLimiter {
            quota,
            limiter: RateLimiter::direct_with_clock(q, clock.clone()),
            clock,
        }
    }

    pub fn quota(&self) -> TenantQuota {
        self.quota
    }

    /// Takes `n` cells (one per event), or says when to retry, or that it never will pass.
    pub fn check(&self, n: u32) -> Result<(), Refusal> {
        let cells = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_n(cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::RateLimited(RateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                quota: self.quota,
            })),
            Err(_insufficient) => Err(Refusal::ExceedsBurst {
                events: n,
                burst: self.quota.burst,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn quota(per_second: u32, burst: u32) -> TenantQuota {
        TenantQuota {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn burst_then_refill_with_fake_clock() {
        let clock = FakeRelativeClock::default();
        let l = TenantLimiter::with_clock(quota(10, 5), clock.clone());
        for _ in 0..5 {
            l.check(1).unwrap();
        }
        let Refusal::RateLimited(err) = l.check(1).unwrap_err() else {
            panic!("over the quota is rate limited");
        };
        assert!(err.retry_after <= Duration::from_millis(100));
        assert_eq!(err.retry_after_secs(), 1);
        assert_eq!(err.ratelimit_header(), "\"tenant\";r=0;t=1");
        clock.advance(Duration::from_millis(100));
        l.check(1).unwrap();
        assert!(l.check(1).is_err());
    }

    #[test]
    fn batches_take_one_cell_per_event() {
        let clock = FakeRelativeClock::default();
        let l = TenantLimiter::with_clock(quota(100, 100), clock);
        l.check(60).unwrap();
        assert!(l.check(60).is_err());
        assert!(l.check(40).is_ok());
        assert!(matches!(l.check(60), Err(Refusal::RateLimited(_))));
    }

    #[test]
    fn a_request_larger_than_the_burst_is_refused_for_good() {
        let clock = FakeRelativeClock::default();
        let l = TenantLimiter::with_clock(quota(100, 100), clock.clone());
        let refusal = l.check(101).unwrap_err();
        let burst = NonZeroU32::new(100).unwrap();
        assert_eq!(refusal, Refusal::ExceedsBurst { events: 101, burst });
        // However long the client waits, the same request never passes.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(
            l.check(101),
            Err(Refusal::ExceedsBurst { events: 101, burst })
        );
        // And the refusal took no cells: the full burst is still there.
        l.check(100).unwrap();
    }

    #[test]
    fn tenants_do_not_share_quota() {
        let a = TenantLimiter::new(quota(1, 1));
        let b = TenantLimiter::new(quota(1, 1));
        a.check(1).unwrap();
        assert!(a.check(1).is_err());
        b.check(1).unwrap();
    }
}
