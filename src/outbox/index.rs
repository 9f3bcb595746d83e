//! The index thread: the fjall store follows the record log, never the other way round.
//!
//! The log (`log` module) is the commit point: a group's records, delivered marks and claimed
//! dedupe keys are one frame. The dedupe index that answers "seen before?" for days of ids is
//! the fjall `dedupe` partition, and it is derived from the frames:
//!
//! * A claimed key is in [`Indexing::recent`] from the moment its frame is written until it is
//!   in the partition; the commit looks there before the partition.
//! * A key goes into the partition only once its frame is durable (the sync thread's
//!   `synced_lsn` passed it). The other order could leave a key on disk whose frame a power
//!   loss took: the event lost, and the client's retry answered "duplicate". Membership of a
//!   completed coalesced batch is forgotten the same way (after the delivered marks it stands
//!   for are durable), so a crash can never leave its records pending without it.
//! * Keys go in sorted and in bulk, off the request path: the thread wakes every
//!   [`INDEX_EVERY`] and takes every frame synced meanwhile. It is not woken by each sync:
//!   with `always` under load there are hundreds of syncs a second, and a wake-up and a small
//!   fjall batch for each took a tenth of the core the request path runs on.
//! * Running totals of period-tiered prices (`pricing::period`) go the same way: a total is in
//!   [`Indexing::totals`] from the moment its frame is written, reaches the `totals` partition
//!   once the frame is durable, and leaves the map when the partition holds that same value.
//!   The commit reads the map first, then the partition.
//! * On open every key of every segment still on disk is put into the partition again
//!   (idempotent), so whatever the partition had not made durable comes back.
//! * A segment is deleted, oldest first, once it is sealed and synced, none of its records is
//!   pending any more, everything deferred in it has reached the partition, and the keyspace
//!   was synced after that (which also makes the dead letters taken from it durable).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fjall::PersistMode;
use uuid::Uuid;

use super::commit::poison;
use super::dedupe::{Key, KeyMap};
use super::log::{segment_of, LogShared, Lsn};
use super::store::Store;
use super::{OutboxError, Shared};

/// How often the thread moves what was synced meanwhile into fjall. Keys wait in memory
/// (in [`Indexing::recent`]) that long at most after their sync: at 250k events/s, ~12k.
const INDEX_EVERY: Duration = Duration::from_millis(50);

/// Work that may reach fjall only once the frame ending at `lsn` is durable.
pub(crate) struct Deferred {
    pub(crate) lsn: Lsn,
    pub(crate) keys: Vec<(Key, u64)>,
    pub(crate) forget_batches: Vec<Uuid>,
    /// Running totals as the frame left them, in the order written.
    pub(crate) totals: Vec<(Box<str>, rust_decimal::Decimal)>,
}

/// Shared between the commit (which adds) and the index thread (which drains).
#[derive(Default)]
pub(crate) struct Indexing {
    /// Claimed dedupe keys not yet in the partition, with their acceptance time (ms).
    pub(crate) recent: KeyMap<u64>,
    /// Running totals written to the log and not yet in the `totals` partition (the newest
    /// value of each key).
    pub(crate) totals: std::collections::HashMap<Box<str>, rust_decimal::Decimal>,
    pub(crate) deferred: VecDeque<Deferred>,
    /// Completed batches taken from `deferred` whose removal is being written.
    pub(crate) forgetting: Vec<Uuid>,
    /// Pending records per log segment (segments with none may be missing).
    pub(crate) live: BTreeMap<u64, usize>,
    /// Records written to each segment (copies forward included), pending or not.
    pub(crate) written: BTreeMap<u64, usize>,
    /// Every segment on disk, the active one included.
    pub(crate) segments: BTreeSet<u64>,
}

impl Indexing {
    pub(crate) fn add_live(&mut self, seg: u64, n: usize) {
        *self.live.entry(seg).or_default() += n;
        *self.written.entry(seg).or_default() += n;
    }

    pub(crate) fn remove_live(&mut self, seg: u64) {
        if let Some(n) = self.live.get_mut(&seg) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live.remove(&seg);
            }
        }
    }

    /// Whether a completed batch's membership is still to leave the store.
    pub(crate) fn forgetting(&self, id: &Uuid) -> bool {
        self.forgetting.contains(id) || self.deferred.iter().any(|d| d.forget_batches.contains(id))
    }

    /// When `key` was accepted, if its frame is written and it is not in the partition yet.
    pub(crate) fn recent(&self, key: &Key) -> Option<u64> {
        self.recent.get(key).copied()
    }
}

pub(crate) enum ToIndex {
    /// Index what is due (unless `crash`, a test's crash), then stop; answered once this
    /// thread let go of the store.
    Close { done: mpsc::Sender<()>, crash: bool },
}

pub(crate) struct Indexer {
    pub(crate) store: Arc<Store>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) log: Arc<LogShared>,
}

impl Indexer {
    pub(crate) fn run(self, rx: mpsc::Receiver<ToIndex>) {
        loop {
            let stop = match rx.recv_timeout(INDEX_EVERY) {
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Ok(ToIndex::Close { done, crash }) => Some((done, crash)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let crash = stop.as_ref().is_some_and(|(_, crash)| *crash);
            if !crash && !self.shared.poisoned.load(Ordering::Acquire) {
                if let Err(e) = self.step() {
                    poison(&self.shared, "index", &e);
                }
            }
            if let Some((done, _)) = stop {
                // The store (and with it the directory lock) must be let go of first.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Moves every deferred item whose frame is durable into fjall, then deletes the segments
    /// nothing needs any more.
    pub(crate) fn step(&self) -> Result<(), OutboxError> {
        let synced = self.shared.synced_lsn.load(Ordering::Acquire);
        let due: Vec<Deferred> = {
            let mut ix = self.shared.index.lock();
            let n = ix.deferred.iter().take_while(|d| d.lsn <= synced).count();
            let due: Vec<Deferred> = ix.deferred.drain(..n).collect();
            ix.forgetting = due
                .iter()
                .flat_map(|d| d.forget_batches.iter().copied())
                .collect();
            due
        };
        if !due.is_empty() {
            let mut keys: Vec<(Key, u64)> =
                due.iter().flat_map(|d| d.keys.iter().copied()).collect();
            // Sorted, the memtable inserts follow each other's paths (cache hits); a key claimed
            // twice (re-accepted after expiry) keeps its latest time.
            keys.sort_by_key(|(k, _)| *k);
            keys.dedup_by(|later, earlier| {
                if later.0 == earlier.0 {
                    earlier.1 = earlier.1.max(later.1);
                    true
                } else {
                    false
                }
            });
            let mut batch = self.store.batch();
            for (k, at) in &keys {
                self.store.stage_seen(&mut batch, k, *at);
            }
            // The newest value of each key among the frames taken.
            let mut totals: std::collections::HashMap<&str, rust_decimal::Decimal> =
                std::collections::HashMap::new();
            for d in &due {
                for (k, t) in &d.totals {
                    totals.insert(k, *t);
                }
            }
            for (k, t) in &totals {
                self.store.stage_total(&mut batch, k, *t);
            }
            for d in &due {
                for id in &d.forget_batches {
                    batch.remove(&self.store.batches, id.as_bytes().to_vec());
                }
            }
            batch.commit()?;
            let mut ix = self.shared.index.lock();
            ix.forgetting.clear();
            for (k, at) in &keys {
                if ix.recent.get(k) == Some(at) {
                    ix.recent.remove(k);
                }
            }
            for (k, t) in &totals {
                if ix.totals.get(*k) == Some(t) {
                    ix.totals.remove(*k);
                }
            }
        }
        self.reclaim(synced)
    }

    fn reclaim(&self, synced: Lsn) -> Result<(), OutboxError> {
        let doomed: Vec<u64> = {
            let ix = self.shared.index.lock();
            // Sealed and synced, and nothing deferred in it still waiting.
            let bound = ix.deferred.front().map_or(segment_of(synced), |d| {
                segment_of(d.lsn).min(segment_of(synced))
            });
            ix.segments
                .iter()
                .take_while(|s| **s < bound && !ix.live.contains_key(s))
                .copied()
                .collect()
        };
        if doomed.is_empty() {
            return Ok(());
        }
        // The keys (and dead letters) taken from these segments must be durable in fjall
        // before the segments go.
        self.store.keyspace.persist(PersistMode::SyncAll)?;
        self.log.delete_segments(&doomed).map_err(OutboxError::Io)?;
        let mut ix = self.shared.index.lock();
        for s in &doomed {
            ix.segments.remove(s);
            ix.written.remove(s);
        }
        tracing::debug!(segments = doomed.len(), "outbox log segments deleted");
        Ok(())
    }
}
