//! The dedupe index: which (tenant, event id) pairs were durably accepted, for how long.
//!
//! The index is the `dedupe` partition itself, not a heap map: a 7-day window at production
//! rates is hundreds of millions of ids, which must not live in RAM. Lookups are point reads
//! on the LSM tree (memtable, then bloom-filtered segments), done on the commit thread, so a
//! lookup and the write that claims the id are never interleaved with another group.
//!
//! Memory per remembered id: nothing on the heap of the proxy beyond fjall's bounded caches;
//! while an id is in the active memtable it costs its key (4 + tenant + event id bytes) + 8
//! bytes of value + ~40 bytes of skiplist overhead, twice (the time index); once flushed, about
//! 10 bits of bloom filter per key plus whatever of it sits in the (bounded) block cache. On
//! disk: about 2 × (key + 16) bytes per id before compression.
//!
//! Expiry: an entry older than the window no longer counts as seen (checked on lookup, so the
//! window is exact), and pruning deletes it later through the `dedupe_exp` time index (on open
//! and every minute). A re-accepted expired id gets a new entry; pruning the old time-index
//! entry only deletes the dedupe entry if its timestamp still matches.

use std::time::Duration;

use fjall::Batch;

use super::store::Store;
use super::OutboxError;
use crate::domain::{EventId, TenantId};

/// Most expired entries deleted in one pruning batch, so pruning never stalls appends long.
const PRUNE_CHUNK: usize = 10_000;

/// `u32 BE len(tenant) ++ tenant ++ event id`: unambiguous for any pair of strings.
pub(crate) fn key(tenant: &TenantId, event: &EventId) -> Vec<u8> {
    let (t, e) = (tenant.as_str().as_bytes(), event.as_str().as_bytes());
    let mut k = Vec::with_capacity(4 + t.len() + e.len());
    // Tenant ids are short configured names; saturate rather than wrap on absurd input.
    k.extend_from_slice(&u32::try_from(t.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(t);
    k.extend_from_slice(e);
    k
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

fn exp_key(at_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl Store {
    /// Whether `key` was accepted (durably: only committed batches are visible) within the
    /// window ending at `now_ms`.
    pub(crate) fn is_seen(
        &self,
        key: &[u8],
        now_ms: u64,
        window: Duration,
    ) -> Result<bool, OutboxError> {
        let Some(v) = self.dedupe.get(key)? else {
            return Ok(false);
        };
        let at = v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or(u64::MAX); // unreadable timestamp: err on the side of "seen"
        Ok(at.saturating_add(window_ms(window)) >= now_ms)
    }

    /// Adds the dedupe entry (and its time-index entry) of an accepted event to `batch`.
    pub(crate) fn stage_seen(&self, batch: &mut Batch, key: &[u8], at_ms: u64) {
        batch.insert(&self.dedupe, key.to_vec(), at_ms.to_be_bytes().to_vec());
        batch.insert(&self.dedupe_exp, exp_key(at_ms, key), Vec::new());
    }

    /// Deletes entries older than the window, in batches of [`PRUNE_CHUNK`], at most
    /// `max_chunks` of them (so a running outbox interleaves pruning with appends). Losing a
    /// pruning batch in a crash is harmless (it is redone), so it is written without a sync.
    /// Returns how many ids were forgotten and whether expired entries may remain.
    pub(crate) fn prune_dedupe(
        &self,
        now_ms: u64,
        window: Duration,
        max_chunks: usize,
    ) -> Result<(usize, bool), OutboxError> {
        let cutoff = now_ms.saturating_sub(window_ms(window));
        let mut total = 0;
        for _ in 0..max_chunks {
            let mut batch = self.batch();
            let mut n = 0;
            for kv in self.dedupe_exp.range(..cutoff.to_be_bytes().to_vec()) {
                let (k, _) = kv?;
                let Some((at, key)) = k.split_first_chunk::<8>() else {
                    batch.remove(&self.dedupe_exp, k.to_vec());
                    continue;
                };
                let at = u64::from_be_bytes(*at);
                let current = self.dedupe.get(key)?;
                if current.as_deref() == Some(&at.to_be_bytes()[..]) {
                    batch.remove(&self.dedupe, key.to_vec());
                    total += 1;
                }
                batch.remove(&self.dedupe_exp, k.to_vec());
                n += 1;
                if n >= PRUNE_CHUNK {
                    break;
                }
            }
            if n == 0 {
                return Ok((total, false));
            }
            batch.commit()?;
            if n < PRUNE_CHUNK {
                return Ok((total, false));
            }
        }
        Ok((total, true))
    }
}
