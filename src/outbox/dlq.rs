//! Offline dead-letter tools for `credyt-proxy dlq list|replay --data-dir DIR`.
//!
//! They take the directory lock, so they refuse to run while a proxy owns the directory
//! ([`OutboxError::Locked`]); use the running proxy's admin API then. A replay is written and
//! `fdatasync`ed before the function returns.

use std::path::Path;

use super::store::Store;
use super::{DeadLetter, Outbox, OutboxError, OutboxSettings, SyncPolicy};

/// All dead letters in `dir`, oldest sequence first.
pub fn dlq_list(dir: impl AsRef<Path>) -> Result<Vec<DeadLetter>, OutboxError> {
    Store::open(dir.as_ref())?.dead_letters()
}

/// Moves the given (or all) dead letters in `dir` back to pending; returns how many moved.
/// Unknown sequence numbers are skipped. Opens (recovers) the outbox like the proxy does and
/// replays through it, with `sync = "always"`.
pub fn dlq_replay(dir: impl AsRef<Path>, seqs: Option<&[u64]>) -> Result<usize, OutboxError> {
    let settings = OutboxSettings {
        sync: SyncPolicy::Always,
        // a few records, written once: no spare segment of zeros for them
        log_preallocate: false,
        ..OutboxSettings::new(dir.as_ref())
    };
    // A runtime of its own, on a thread of its own: callable from anywhere, inside another
    // runtime too.
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(OutboxError::Io)?;
            rt.block_on(async move {
                let outbox = Outbox::open(settings)?;
                let moved = outbox.replay(seqs).await;
                let closed = outbox.close().await;
                let moved = moved?;
                closed?;
                Ok(moved)
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(OutboxError::Io(std::io::Error::other(
                "the dead-letter replay thread panicked",
            )))
        })
    })
}
