//! Every event a tenant posts ends in exactly one outcome, with a stable reason code.
//!
//! `Accepted` carries the priced fees the tenant is told about (and that will be charged);
//! `Duplicate` means the event id was already accepted within the dedupe window (nothing new
//! is charged); `Rejected` carries a stable snake_case code and a message. Outcomes are counted
//! by kind (`credyt_proxy_events_total{outcome}`, see `telemetry::metrics`), a bounded set,
//! never by tenant input.

use serde::Serialize;

use crate::domain::Fee;

/// The result for one event of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted { fees: Vec<Fee> },
    Duplicate,
    Rejected(Rejection),
}

/// Why an event was refused: a stable code, the field it concerns, and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub code: &'static str,
    /// Path of the offending field, e.g. `events[3].occurred_at`.
    pub field: String,
    pub message: String,
}
