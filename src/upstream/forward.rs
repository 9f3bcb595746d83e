//! Delivering records to Credyt: the retry policy shared by the request path (`ack =
//! "upstream"`) and the outbox forwarder.
//!
//! Contract: a delivery is retried only when the error is retryable (network, timeout, 408,
//! 409, 429, 5xx), with jittered exponential backoff that honours `Retry-After`, and always
//! with the same idempotency key (the record's `transaction_id` or event id), so a retry can
//! never charge twice. Charges of one customer go out concurrently, bounded.

use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use crate::domain::{Debit, Delivery, ForwardedUsage};

use super::{CredytClient, UpstreamError};

/// Jittered exponential backoff with bounds.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (0-based): full jitter over an exponential cap,
    /// but never less than what upstream asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let jittered = cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        retry_after.map_or(jittered, |ra| ra.max(jittered))
    }
}

/// Sends deliveries with a bounded number of attempts (the request path cannot wait forever).
#[derive(Clone)]
pub struct Forwarder {
    client: CredytClient,
    attempts: u32,
    backoff: Backoff,
    /// Longest `Retry-After` worth waiting for inside one request.
    max_wait: Duration,
    concurrency: usize,
}

impl Forwarder {
    pub fn new(client: CredytClient) -> Forwarder {
        Forwarder {
            client,
            attempts: 3,
            backoff: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(1),
            },
            max_wait: Duration::from_secs(2),
            concurrency: 16,
        }
    }

    pub fn client(&self) -> &CredytClient {
        &self.client
    }

    async fn once(&self, call: Call<'_>) -> Result<(), UpstreamError> {
        match call {
            Call::Charge(debit) => self.client.charge(debit).await,
            Call::Usage(usage) => self.client.send_usage(usage).await,
        }
    }

    async fn with_retries(&self, call: Call<'_>) -> Result<(), UpstreamError> {
        let mut attempt = 0;
        loop {
            match self.once(call).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && attempt + 1 < self.attempts => {
                    let wait = self.backoff.delay(attempt, e.retry_after());
                    if wait > self.max_wait {
                        return Err(e);
                    }
                    tracing::debug!(class = e.class(), attempt, "retrying credyt call");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Delivers all `deliveries` (charges one by one, `concurrency` at a time; the usage events
    /// of one request in one `POST /events`). Every call settles before the first failure, if
    /// any, is returned.
    pub async fn deliver_all(&self, deliveries: &[Delivery]) -> Result<(), UpstreamError> {
        let mut usage: Vec<&ForwardedUsage> = Vec::new();
        let mut charges: Vec<&Debit> = Vec::new();
        for d in deliveries {
            match d {
                Delivery::Usage(u) => usage.push(u),
                Delivery::Charge(c) => charges.push(c),
                // Only the relay's own outbox holds webhooks; they are never Credyt calls.
                Delivery::Webhook(_) => return Err(UpstreamError::NotCredyt),
            }
        }
        let mut first_error = None;
        if !usage.is_empty() {
            if let Err(e) = self.with_retries(Call::Usage(&usage)).await {
                first_error = Some(e);
            }
        }
        let mut in_flight = FuturesUnordered::new();
        let mut next = charges.into_iter();
        loop {
            while in_flight.len() < self.concurrency {
                match next.next() {
                    Some(c) => in_flight.push(self.with_retries(Call::Charge(c))),
                    None => break,
                }
            }
            match in_flight.next().await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => break,
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// One idempotent call to Credyt.
#[derive(Clone, Copy)]
enum Call<'a> {
    Charge(&'a Debit),
    Usage(&'a [&'a ForwardedUsage]),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_bounded_and_honours_retry_after() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..20 {
            let d = b.delay(attempt, None);
            assert!(d <= Duration::from_secs(2));
            assert!(
                d >= (Duration::from_millis(100) * (1 << attempt.min(4)))
                    .min(Duration::from_secs(2))
                    / 2
            );
        }
        assert!(b.delay(0, Some(Duration::from_secs(5))) >= Duration::from_secs(5));
    }
}
