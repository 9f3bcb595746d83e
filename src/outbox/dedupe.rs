//! The dedupe index: which (tenant, event id) pairs were durably accepted, for how long.
//!
//! The index is the `dedupe` partition itself, not a heap map: a 7-day window at production
//! rates is hundreds of millions of ids, which must not live in RAM. Lookups are point reads
//! on the LSM tree (memtable, then bloom-filtered segments), done on the commit thread, so a
//! lookup and the write that claims the id are never interleaved with another group.
//!
//! Keys are the first 16 bytes of SHA-256 over `u32 BE len(tenant) ++ tenant ++ event id`:
//! fixed size whatever the ids' lengths, and uniformly spread, so the memtable's comparisons
//! stop at the first bytes instead of walking a tenant prefix every id shares (the profile of
//! the request path showed those comparisons as the largest cost of a lookup). Two distinct
//! pairs collide with probability about n² / 2¹²⁹: below 10⁻²⁰ for a billion remembered ids.
//!
//! Memory per remembered id: nothing on the heap of the proxy beyond fjall's bounded caches;
//! while an id is in the active memtable it costs 16 bytes of key + 8 bytes of value + ~40
//! bytes of skiplist overhead; once flushed, about 10 bits of bloom filter per key plus
//! whatever of it sits in the (bounded) block cache. On disk: about 24 bytes per id before
//! compression.
//!
//! Expiry: an entry older than the window no longer counts as seen (checked on lookup, so the
//! window is exact). Pruning (which only bounds the disk) walks the partition with a cursor,
//! a bounded chunk at a time between commit groups, deleting entries older than the window; a
//! re-accepted expired id overwrites its entry with the new time.

use std::ops::Bound;
use std::time::Duration;

use fjall::Batch;
use sha2::{Digest, Sha256};

use super::store::Store;
use super::OutboxError;
use crate::domain::{EventId, TenantId};

/// Most entries looked at in one pruning step, so pruning never stalls appends long.
pub(crate) const PRUNE_CHUNK: usize = 2_000;

/// A dedupe key (see the module docs).
pub(crate) type Key = [u8; 16];

pub(crate) fn key(tenant: &TenantId, event: &EventId) -> Key {
    let (t, e) = (tenant.as_str().as_bytes(), event.as_str().as_bytes());
    let mut h = Sha256::new();
    // Tenant ids are short configured names; saturate rather than wrap on absurd input.
    h.update(u32::try_from(t.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(t);
    h.update(e);
    let digest: [u8; 32] = h.finalize().into();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

fn accepted_at(value: &[u8]) -> u64 {
    // An unreadable timestamp errs on the side of "seen" (and is never pruned).
    value.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX)
}

/// Where a pruning pass stands: the last key looked at, `None` before the first step.
#[derive(Default)]
pub(crate) struct PruneCursor {
    after: Option<Key>,
}

impl Store {
    /// Whether `key` was accepted (durably: only committed batches are visible) within the
    /// window ending at `now_ms`.
    pub(crate) fn is_seen(
        &self,
        key: &Key,
        now_ms: u64,
        window: Duration,
    ) -> Result<bool, OutboxError> {
        let Some(v) = self.dedupe.get(key)? else {
            return Ok(false);
        };
        Ok(accepted_at(&v).saturating_add(window_ms(window)) >= now_ms)
    }

    /// Adds the dedupe entry of an accepted event to `batch`.
    pub(crate) fn stage_seen(&self, batch: &mut Batch, key: &Key, at_ms: u64) {
        batch.insert(&self.dedupe, key.to_vec(), at_ms.to_be_bytes().to_vec());
    }

    /// One pruning step: looks at up to `chunk` entries after the cursor and deletes those
    /// older than the window. Losing a pruning batch in a crash is harmless (it is redone), so
    /// it is written without a sync. Returns how many ids were forgotten and whether the pass
    /// reached the end of the partition (the cursor is then reset for the next pass).
    pub(crate) fn prune_dedupe_step(
        &self,
        cursor: &mut PruneCursor,
        now_ms: u64,
        window: Duration,
        chunk: usize,
    ) -> Result<(usize, bool), OutboxError> {
        let cutoff = now_ms.saturating_sub(window_ms(window));
        let mut batch = self.batch();
        let mut forgotten = 0;
        let mut seen = 0;
        let from = match cursor.after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Unbounded,
        };
        let range = self.dedupe.range::<Vec<u8>, _>((from, Bound::Unbounded));
        let mut last = None;
        for kv in range.take(chunk) {
            let (k, v) = kv?;
            seen += 1;
            if accepted_at(&v) < cutoff {
                batch.remove(&self.dedupe, k.to_vec());
                forgotten += 1;
            }
            last = Key::try_from(k.as_ref()).ok();
        }
        if forgotten > 0 {
            batch.commit()?;
        }
        let done = seen < chunk || last.is_none();
        cursor.after = if done { None } else { last };
        Ok((forgotten, done))
    }

    /// A whole pruning pass (tests and tools; the running outbox prunes step by step).
    #[cfg(test)]
    pub(crate) fn prune_dedupe(&self, now_ms: u64, window: Duration) -> Result<usize, OutboxError> {
        let mut cursor = PruneCursor::default();
        let mut total = 0;
        loop {
            let (n, done) = self.prune_dedupe_step(&mut cursor, now_ms, window, PRUNE_CHUNK)?;
            total += n;
            if done {
                return Ok(total);
            }
        }
    }
}
