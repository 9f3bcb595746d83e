//! Outbox errors, classified for the ingest edge (status, `Retry-After`) and the forwarder.

use std::path::PathBuf;
use std::time::Duration;

/// How long a tenant is told to wait when the outbox cannot take more right now.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// Too many undelivered records: back-pressure while the forwarder catches up.
    #[error("outbox is full")]
    Full { pending: usize, max_pending: usize },
    /// The id's commit is in flight elsewhere. Not produced by this implementation (a second
    /// request waits for the first commit instead) but kept for callers that match on it.
    #[error("event commit in flight")]
    InFlight,
    /// A write or sync failed earlier; nothing is accepted until the process restarts.
    #[error("outbox is poisoned after a failed write or sync, restart required")]
    Poisoned,
    /// The outbox was closed (shutdown).
    #[error("outbox is closed")]
    Closed,
    #[error("outbox storage error")]
    Storage(#[source] fjall::Error),
    #[error("outbox i/o error")]
    Io(#[source] std::io::Error),
    #[error("corrupt outbox record in {partition}")]
    Corrupt {
        partition: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("corrupt outbox record in {partition}: {what}")]
    Malformed {
        partition: &'static str,
        what: &'static str,
    },
    #[error("record cannot be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("no pending record with sequence {seq}")]
    UnknownSeq { seq: u64 },
    #[error("outbox directory {dir} is in use by another process")]
    Locked { dir: PathBuf },
    /// The directory was written by a build with another on-disk format.
    #[error(
        "outbox directory {dir} has on-disk format {found}, this build reads format {expected}"
    )]
    Format {
        dir: PathBuf,
        found: String,
        expected: &'static str,
    },
    /// A period-tiered fee could not be rated against its running total (the amount overflows
    /// the decimal range); nothing of the call was written.
    #[error(transparent)]
    Rating(crate::pricing::PricingError),
}

impl OutboxError {
    /// Whether the same request may succeed later (possibly on another replica or after a
    /// restart): the edge answers 503 for these.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            OutboxError::Full { .. }
                | OutboxError::InFlight
                | OutboxError::Poisoned
                | OutboxError::Closed
                | OutboxError::Storage(_)
                | OutboxError::Io(_)
        )
    }

    /// The `Retry-After` to send with a retryable answer.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OutboxError::Full { .. } | OutboxError::InFlight => Some(RETRY_AFTER),
            _ => None,
        }
    }

    /// Stable snake_case code for the HTTP error table and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            OutboxError::Full { .. } => "outbox_full",
            OutboxError::InFlight => "outbox_in_flight",
            OutboxError::Poisoned => "outbox_poisoned",
            OutboxError::Closed => "outbox_closed",
            OutboxError::Storage(_) => "outbox_storage",
            OutboxError::Io(_) => "outbox_io",
            OutboxError::Corrupt { .. } | OutboxError::Malformed { .. } => "outbox_corrupt",
            OutboxError::Encode(_) => "outbox_encode",
            OutboxError::UnknownSeq { .. } => "outbox_unknown_seq",
            OutboxError::Locked { .. } => "outbox_locked",
            OutboxError::Format { .. } => "outbox_format",
            OutboxError::Rating(e) => e.code(),
        }
    }

    /// Whether this error means money may be at risk (an operator must look).
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(
            self,
            OutboxError::Poisoned
                | OutboxError::Storage(_)
                | OutboxError::Corrupt { .. }
                | OutboxError::Malformed { .. }
        )
    }
}

impl From<fjall::Error> for OutboxError {
    fn from(e: fjall::Error) -> Self {
        match e {
            fjall::Error::Poisoned => OutboxError::Poisoned,
            other => OutboxError::Storage(other),
        }
    }
}
