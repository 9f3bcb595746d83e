//! Offline dead-letter tools for `credyt-proxy dlq list|replay --data-dir DIR`.
//!
//! They take the directory lock, so they refuse to run while a proxy owns the directory
//! ([`OutboxError::Locked`]); use the running proxy's admin API then. A replay is written and
//! `fdatasync`ed before the function returns.

use std::path::Path;

use super::store::Store;
use super::{DeadLetter, OutboxError};

/// All dead letters in `dir`, oldest sequence first.
pub fn dlq_list(dir: impl AsRef<Path>) -> Result<Vec<DeadLetter>, OutboxError> {
    Store::open(dir.as_ref())?.dead_letters()
}

/// Moves the given (or all) dead letters in `dir` back to pending; returns how many moved.
/// Unknown sequence numbers are skipped.
pub fn dlq_replay(dir: impl AsRef<Path>, seqs: Option<&[u64]>) -> Result<usize, OutboxError> {
    let store = Store::open(dir.as_ref())?;
    let mut batch = store.batch();
    let moved = store.stage_replay(&mut batch, seqs)?;
    if moved.is_empty() {
        return Ok(0);
    }
    batch.commit()?;
    store.sync()?;
    Ok(moved.len())
}
