//! Per-tenant rate limits (governor, GCRA), generic over a clock so tests control time.
//!
//! Contract: each tenant has its own limiter, so one tenant exhausting its quota never affects
//! another. A request for `n` events takes `n` cells; when the tenant is over its quota the
//! answer is [`RateLimited`], which says when to come back (`Retry-After`) and carries the
//! values of the `RateLimit` / `RateLimit-Policy` headers. Checking is a few atomic operations:
//! no lock, no I/O.

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
    /// True when the request alone is larger than the burst: it can never pass as one request.
    pub too_large: bool,
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

    /// Takes `n` cells (one per event) or says when to retry.
    pub fn check(&self, n: u32) -> Result<(), RateLimited> {
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                quota: self.quota,
                too_large: false,
            }),
            Err(_insufficient) => Err(RateLimited {
                retry_after: Duration::from_secs(1),
                quota: self.quota,
                too_large: true,
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
        let err = l.check(1).unwrap_err();
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
        let too_big = l.check(101).unwrap_err();
        assert!(too_big.too_large);
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
