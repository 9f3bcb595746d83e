//! The outbox forwarder: drains durable records to Credyt, exactly once.
//!
//! Contract: it takes leased batches from the outbox, sends each record with bounded
//! concurrency, and marks a record delivered only after Credyt confirmed it (a 2xx; a replayed
//! `transaction_id` answers the original 201, which is success). Retryable failures (network,
//! 408, 409, 429, 5xx) give the record back and back off with jitter, honouring `Retry-After`;
//! while Credyt keeps failing the circuit breaker opens and only one probe goes out per
//! cooldown, so an outage costs a bounded trickle of requests, not a flood. Permanent failures
//! (other 4xx) go to the dead-letter store with the upstream answer. On start it simply
//! resumes: every undelivered record is still in the outbox.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::domain::Delivery;
use crate::outbox::{Outbox, Pending};

use super::breaker::{Breaker, Permit};
use super::forward::Backoff;
use super::{CredytClient, UpstreamError};

/// Tuning of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// Records in flight at once.
    pub concurrency: usize,
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub breaker_max_cooldown: Duration,
    pub backoff: Backoff,
}

impl Default for ForwarderSettings {
    fn default() -> Self {
        ForwarderSettings {
            concurrency: 64,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            breaker_max_cooldown: Duration::from_secs(30),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
        }
    }
}

enum Sent {
    Delivered(u64),
    Retry(u64, UpstreamError),
    Dead(u64, UpstreamError),
}

async fn send(client: &CredytClient, pending: &Pending) -> Sent {
    let result = match &pending.delivery {
        Delivery::Charge(debit) => client.charge(debit).await,
        Delivery::Usage(usage) => client.send_usage(&[usage]).await,
    };
    match result {
        Ok(()) => Sent::Delivered(pending.seq),
        Err(e) if e.is_retryable() => Sent::Retry(pending.seq, e),
        Err(e) => Sent::Dead(pending.seq, e),
    }
}

/// Runs until `stop` turns true, then returns after in-flight sends settled.
pub async fn run(
    outbox: Outbox,
    client: CredytClient,
    settings: ForwarderSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut breaker = Breaker::new(
        settings.breaker_threshold,
        settings.breaker_cooldown,
        settings.breaker_max_cooldown,
    );
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let limit = match breaker.permit(Instant::now()) {
            Permit::All => settings.concurrency,
            Permit::Probe => 1,
            Permit::WaitUntil(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        let batch = outbox.next_batch(limit);
        if batch.is_empty() {
            tokio::select! {
                _ = outbox.wait_pending() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let client_ref = &client;
        let mut in_flight: FuturesUnordered<_> =
            batch.iter().map(|p| send(client_ref, p)).collect();
        let mut delivered = Vec::new();
        let mut retry = Vec::new();
        let mut longest_retry_after: Option<Duration> = None;
        while let Some(sent) = in_flight.next().await {
            match sent {
                Sent::Delivered(seq) => delivered.push(seq),
                Sent::Retry(seq, e) => {
                    tracing::debug!(seq, class = e.class(), "delivery failed, will retry");
                    longest_retry_after = longest_retry_after.max(e.retry_after());
                    retry.push(seq);
                }
                Sent::Dead(seq, e) => {
                    tracing::error!(seq, class = e.class(), status = ?e.status(), "credyt refused a record permanently, dead-lettering it");
                    let (status, body) = match &e {
                        UpstreamError::Status { status, body, .. } => {
                            (Some(status.as_u16()), Some(body.clone()))
                        }
                        _ => (None, None),
                    };
                    if let Err(err) = outbox.dead_letter(seq, e.to_string(), status, body).await {
                        tracing::error!(seq, error = %err, "cannot dead-letter a record; it stays pending");
                        retry.push(seq);
                    }
                }
            }
        }
        drop(in_flight);
        if !delivered.is_empty() {
            if let Err(e) = outbox.mark_delivered(&delivered).await {
                // Harmless for money: the ids are deterministic, a resend is a no-op at Credyt.
                tracing::warn!(error = %e, "cannot record deliveries; they may be sent again");
                outbox.release(&delivered);
            }
        }
        if retry.is_empty() {
            breaker.on_success();
            failures_in_a_row = 0;
            continue;
        }
        outbox.release(&retry);
        if delivered.is_empty() {
            breaker.on_failure(Instant::now(), longest_retry_after);
            let wait = settings.backoff.delay(failures_in_a_row, longest_retry_after);
            failures_in_a_row = failures_in_a_row.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        } else {
            // Partial success: Credyt is up; retry the rest after the requested wait, if any.
            breaker.on_success();
            failures_in_a_row = 0;
            if let Some(wait) = longest_retry_after {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// A running forwarder task and the switch that stops it.
pub struct ForwarderHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ForwarderHandle {
    pub fn spawn(outbox: Outbox, client: CredytClient, settings: ForwarderSettings) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(outbox, client, settings, rx));
        ForwarderHandle { stop, task }
    }

    /// Stops taking new batches and waits (up to `grace`) for in-flight sends.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}
