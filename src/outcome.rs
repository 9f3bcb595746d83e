//! Every event a tenant posts ends in exactly one outcome, with a stable reason code.
//!
//! `Accepted` carries the priced fees the tenant is told about (and that will be charged);
//! `Duplicate` means the event id was already accepted within the dedupe window (nothing new
//! is charged); `Rejected` carries a stable snake_case code and a message. Outcomes are counted
//! by code, a bounded set, never by tenant input.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Counts of outcomes since start, by kind and rejection code.
#[derive(Default)]
pub struct OutcomeCounters {
    pub accepted: AtomicU64,
    pub duplicate: AtomicU64,
    pub rejected: AtomicU64,
    pub fees: AtomicU64,
}

impl OutcomeCounters {
    /// Counts events rejected together (an atomic `/events` request that failed validation).
    pub fn record_rejections(&self, n: usize) {
        self.rejected.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn record(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Accepted { fees } => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                self.fees.fetch_add(fees.len() as u64, Ordering::Relaxed);
            }
            Outcome::Duplicate => {
                self.duplicate.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Rejected(_) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
