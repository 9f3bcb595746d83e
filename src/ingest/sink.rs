//! Where accepted, priced events go, and when the tenant gets its answer (`ack` mode).
//!
//! Contract: [`Sink::submit`] takes the accepted events of one request (each with its
//! deliveries: charges or forwarded usage) and returns, per event, whether it was new or a
//! duplicate of an event accepted before. It returns `Ok` only once the events are safe per
//! the ack mode; an event id is remembered as seen only after that point, so a failure never
//! turns a retry into a "duplicate".
//!
//! - `ack = "upstream"`: the deliveries are sent to Credyt now (bounded retries) and the
//!   answer waits for Credyt's confirmation. Seen ids are kept in memory for the dedupe window;
//!   across a restart Credyt's idempotency on `transaction_id` still prevents any double charge.
//! - `ack = "durable"`: the events and their deliveries are appended to the outbox in one atomic,
//!   group-committed write (which also claims their ids); the answer waits for that write to be
//!   durable per the sync policy. The forwarder delivers them later, exactly once.

use std::sync::Arc;

use moka::sync::Cache;

use crate::config::IngestSettings;
use crate::domain::{Delivery, EventId, TenantId};
use crate::outbox::{AppendOutcome, Outbox, OutboxError};
use crate::outcome::Rejection;
use crate::pricing::period::PeriodRated;
use crate::upstream::forward::Forwarder;

use super::problem::ApiError;

pub use crate::outbox::AcceptedEvent;

/// Whether a submitted event was new; if so, its period-tiered fees as the outbox rated them
/// against their running totals (empty for every other price).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Accepted(Vec<PeriodRated>),
    Duplicate,
}

/// The ack strategy behind the ingest endpoints.
#[derive(Clone)]
pub enum Sink {
    Upstream(Arc<UpstreamSink>),
    Durable(Outbox),
}

impl Sink {
    pub fn upstream(forwarder: Forwarder, settings: &IngestSettings) -> Sink {
        Sink::Upstream(Arc::new(UpstreamSink {
            forwarder,
            seen: Cache::builder()
                .max_capacity(10_000_000)
                .time_to_live(settings.dedupe_window)
                .build(),
        }))
    }

    /// Whether the event was accepted before (within the dedupe window, as far as this sink
    /// knows it): what submitting it again would answer `Duplicate`. Balance gating asks this
    /// of an event it is about to refuse, so a resend of an accepted event is never refused.
    pub fn was_accepted(&self, tenant: &TenantId, event: &EventId) -> Result<bool, ApiError> {
        match self {
            Sink::Upstream(s) => Ok(s.seen.contains_key(&(tenant.clone(), event.clone()))),
            Sink::Durable(outbox) => outbox.is_recorded(tenant, event).map_err(ApiError::Outbox),
        }
    }

    pub async fn submit(&self, events: Vec<AcceptedEvent>) -> Result<Vec<Submitted>, ApiError> {
        match self {
            Sink::Upstream(s) => s.submit(events).await,
            Sink::Durable(outbox) => {
                let appended = outbox.append_rated(events).await.map_err(|e| match e {
                    // A period-tiered fee that overflows at its running total: nothing of the
                    // request was written.
                    OutboxError::Rating(p) => ApiError::Validation(vec![Rejection {
                        code: p.code(),
                        field: "events".into(),
                        message: p.to_string(),
                    }]),
                    other => ApiError::Outbox(other),
                })?;
                let mut rated = appended.rated.into_iter();
                Ok(appended
                    .outcomes
                    .into_iter()
                    .map(|o| {
                        let r = rated.next().unwrap_or_default();
                        match o {
                            AppendOutcome::Accepted => Submitted::Accepted(r),
                            AppendOutcome::Duplicate => Submitted::Duplicate,
                        }
                    })
                    .collect())
            }
        }
    }
}

/// `ack = "upstream"`: answer after Credyt confirmed.
pub struct UpstreamSink {
    forwarder: Forwarder,
    seen: Cache<(TenantId, EventId), ()>,
}

impl UpstreamSink {
    async fn submit(&self, events: Vec<AcceptedEvent>) -> Result<Vec<Submitted>, ApiError> {
        let mut result = Vec::with_capacity(events.len());
        let mut fresh = Vec::new();
        for e in &events {
            let key = (e.tenant.clone(), e.event_id.clone());
            if self.seen.contains_key(&key) {
                result.push(Submitted::Duplicate);
            } else {
                result.push(Submitted::Accepted(Vec::new()));
                fresh.push(key);
            }
        }
        let deliveries: Vec<Delivery> = events
            .into_iter()
            .zip(&result)
            .filter(|(_, s)| matches!(s, Submitted::Accepted(_)))
            .flat_map(|(e, _)| e.deliveries)
            .collect();
        self.forwarder
            .deliver_all(&deliveries)
            .await
            .map_err(ApiError::Upstream)?;
        for key in fresh {
            self.seen.insert(key, ());
        }
        Ok(result)
    }
}
