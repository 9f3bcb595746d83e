//! The durable outbox: every priced delivery is on disk before the tenant hears "accepted".
//!
//! # Contract
//!
//! * [`Outbox::open`] recovers before it returns: the pending queue is rebuilt from the record
//!   log and the dedupe index (an fjall partition) gets every key the log still holds. Nothing
//!   is accepted before that, so readiness may be released as soon as `open` returned.
//! * [`Outbox::append`]: one call is one atomic write. The records of all its new events and
//!   their dedupe keys go into the same frame of the record log (the `log` module);
//!   concurrent calls are merged into one frame (group commit, see the `commit` module), and
//!   every frame written while a sync runs shares the next one (the `syncer` module: syncs run
//!   on their own thread, so writing and syncing overlap). The dedupe partition follows the
//!   log once it is durable (the `index` module); until then the keys are looked up in memory. The call returns `Ok` only once that batch is durable per
//!   [`SyncPolicy`]. An event id is `Duplicate` only if its commit is durable; an id whose
//!   commit is in flight is answered with the result of that commit, because groups are
//!   decided strictly one after the other (under one lock) and answers leave in that order.
//! * Period-tiered fees (`pricing::period`) are rated by the commit, for the new events only
//!   and in the order groups are decided, against running totals that the same frame moves
//!   ([`Appended::rated`]); the totals follow the log into fjall like the dedupe keys, and are
//!   recovered at open from the partition plus the log ([`Outbox::running_total`] reads them).
//! * A failed write or sync answers the whole group with an error and claims nothing. A failed
//!   sync (or any storage error after bytes may have reached the file) poisons the outbox: every
//!   later write fails with [`OutboxError::Poisoned`] until the process restarts. No fsync is
//!   ever retried on the same file ("fsyncgate").
//! * The work of a call (commit, dedupe, hand-off to the pending queue) runs in plain blocking
//!   code between two awaits, never across one: a caller that is dropped (client disconnect)
//!   cannot leave a half-done append behind, and one dropped before its write still has it
//!   written and answered (see the `commit` module).
//! * Delivered marks are written without their own sync: losing them in a crash only redelivers
//!   a record whose Credyt transaction id is deterministic, which Credyt answers idempotently.
//!
//! What each [`SyncPolicy`] guarantees is spelled out on the type.

mod commit;
mod dedupe;
mod dlq;
mod error;
mod index;
mod log;
mod queue;
mod record;
mod store;
mod syncer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

use crate::domain::{Delivery, EventId, TenantId};
use crate::pricing::period::{PeriodRated, TotalClaim};
use crate::telemetry::metrics::OutboxMetrics;

use commit::{Commit, Committer, Control, Msg};
use queue::{Leased, Queue};
use store::Store;
use syncer::Syncer;

pub use dlq::{dlq_list, dlq_replay};
pub use error::OutboxError;

/// When an append is acknowledged, relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Answer after `fdatasync` of the group's log write returned. Survives power loss and
    /// kernel crashes.
    Always,
    /// Answer after the group's write reached the OS page cache (survives the process being
    /// killed, even with SIGKILL, but not power loss); `fdatasync` runs every interval, so a
    /// power loss can lose up to one interval of acknowledged events.
    Interval(Duration),
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy::Interval(Duration::from_millis(500))
    }
}

/// How the outbox is opened.
#[derive(Clone, Debug)]
pub struct OutboxSettings {
    /// Data directory; holds `LOCK`, the record log under `log/` and the fjall keyspace under
    /// `store/`.
    pub dir: PathBuf,
    pub sync: SyncPolicy,
    /// Bound on undelivered (pending or leased) records; an append that would exceed it gets
    /// [`OutboxError::Full`]. Pending records are held in memory for the forwarder (about
    /// 1 KiB each for a charge), so this also bounds the queue's memory.
    pub max_pending: usize,
    /// How long accepted event ids are remembered for dedupe.
    pub dedupe_window: Duration,
    /// Most append calls merged into one commit group.
    pub max_group: usize,
    /// Size at which a segment of the record log is sealed and a new one begun (at most 1 GiB).
    pub log_segment_bytes: u64,
    /// Prepare each log segment in full before it is used, so syncs write data only (see
    /// the `log` module). Costs one segment of disk for the spare, and writing every byte
    /// twice: the proxy turns it on with `sync = "always"` only, where answers wait for syncs.
    pub log_preallocate: bool,
    /// Where appends' waits, syncs and commit groups are observed (none: not observed).
    pub metrics: Option<OutboxMetrics>,
}

impl OutboxSettings {
    /// Defaults: `interval` sync every 500 ms, 100 000 pending records, 7-day dedupe window,
    /// groups of up to 512 appends, 32 MiB log segments, preallocated.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            sync: SyncPolicy::default(),
            max_pending: 100_000,
            dedupe_window: Duration::from_secs(7 * 24 * 3600),
            max_group: 512,
            log_segment_bytes: log::SEGMENT_BYTES,
            log_preallocate: true,
            metrics: None,
        }
    }
}

/// One accepted usage event and the deliveries pricing made of it. An event priced to nothing
/// (all fees zero) has none: its id is still recorded, so a resend is a duplicate.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedEvent {
    pub tenant: TenantId,
    pub event_id: EventId,
    pub deliveries: Vec<Delivery>,
    /// Fees of period-tiered prices, rated against their running totals by the commit if the
    /// event is new (see `pricing::period`); empty for every other price.
    pub totals: Vec<TotalClaim>,
}

/// What an append call decided: one outcome per event, and for each event the period-tiered
/// fees the commit rated (empty unless the event was accepted and has such prices).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub outcomes: Vec<AppendOutcome>,
    pub rated: Vec<Vec<PeriodRated>>,
}

/// What happened to one event of an append call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly recorded, durably, with all its deliveries.
    Accepted,
    /// Already recorded (durably) within the dedupe window; nothing was written again.
    Duplicate,
}

/// A leased pending delivery handed to the forwarder.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub delivery: Delivery,
    /// How many times this record was leased before this lease, since the process started
    /// (kept in memory only: it resets on restart).
    pub attempts: u32,
}

/// Why a delivery became a dead letter: a stable code for metrics, alerts and operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadCode {
    /// Credyt refused it for good (400, 404, 422: retrying the same request cannot succeed).
    #[default]
    Refused,
    /// Credyt answered 409: the `transaction_id` was used before with a different body.
    Conflict,
    /// It kept failing transiently past the forwarder's maximum age (a relayed webhook: past
    /// the last attempt of the retry schedule).
    RetriesExhausted,
    /// A relayed webhook no tenant (with a webhook endpoint) owns.
    Unroutable,
}

impl DeadCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadCode::Refused => "refused",
            DeadCode::Conflict => "conflict",
            DeadCode::RetriesExhausted => "retries_exhausted",
            DeadCode::Unroutable => "unroutable",
        }
    }
}

/// A delivery the forwarder gave up on, with why, kept until an operator replays it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub delivery: Delivery,
    /// Dead letters written before codes existed read as `refused` (the only kind there was).
    #[serde(default)]
    pub code: DeadCode,
    pub reason: String,
    pub upstream_status: Option<u16>,
    pub upstream_body: Option<String>,
    pub at: DateTime<Utc>,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Undelivered records (pending or leased), as [`Outbox::depth`].
    pub depth: usize,
    pub dead_letters: usize,
    /// `fdatasync` calls made since open (group syncs plus interval syncs).
    pub syncs: u64,
    /// Commit groups written since open.
    pub groups: u64,
    /// Append calls that were part of a written group.
    pub appends: u64,
    /// Duration of the last `fdatasync`.
    pub last_sync_latency: Option<Duration>,
    pub poisoned: bool,
    /// Heap bytes of the dedupe filter (see the `dedupe` module); 0 until the first pruning
    /// pass after open has built it.
    pub dedupe_filter_bytes: usize,
    /// Segments of the record log on disk, the active one included.
    pub log_segments: usize,
    /// Accepted event ids whose log frame is written but not yet in the dedupe index.
    pub unindexed_ids: usize,
}

/// State shared by the handles, the writers and the sync thread.
pub(crate) struct Shared {
    pub(crate) queue: Mutex<Queue>,
    pub(crate) notify: Notify,
    pub(crate) poisoned: AtomicBool,
    pub(crate) dead_count: AtomicUsize,
    pub(crate) syncs: AtomicU64,
    pub(crate) groups: AtomicU64,
    pub(crate) appends: AtomicU64,
    /// Nanoseconds of the last sync, `u64::MAX` before the first.
    pub(crate) last_sync_nanos: AtomicU64,
    /// Whether anything was written since the last sync began (set by the writer,
    /// cleared by the sync thread).
    pub(crate) unsynced: AtomicBool,
    /// Records of written groups not yet applied to the queue (at the sync thread).
    pub(crate) in_flight: AtomicUsize,
    /// Heap bytes of the dedupe filter, as the commit last saw it.
    pub(crate) dedupe_filter_bytes: AtomicUsize,
    /// Whether fjall was written something that must be durable since the last sync.
    pub(crate) fjall_unsynced: AtomicBool,
    /// Where the last frame written to the log ends, and up to where the log is synced.
    pub(crate) written_lsn: AtomicU64,
    pub(crate) synced_lsn: AtomicU64,
    /// Dedupe keys not yet indexed, deferred fjall work, live records per log segment.
    pub(crate) index: Mutex<index::Indexing>,
    /// Histograms of appends' waits, syncs and commit groups.
    pub(crate) metrics: Option<OutboxMetrics>,
    #[cfg(test)]
    pub(crate) faults: tests::Faults,
}

impl Shared {
    pub(crate) fn wake(&self) {
        // notify_waiters wakes every forwarder task waiting now; notify_one stores a permit for
        // one that checks its queue and then waits, so the wake-up cannot fall in between.
        self.notify.notify_waiters();
        self.notify.notify_one();
    }
}

struct Inner {
    /// Where calls queue their messages and write them (see the `commit` module).
    commit: Arc<Commit>,
    /// The `outbox-commit` thread: close (and, in tests, crash).
    control: mpsc::Sender<Control>,
    shared: Arc<Shared>,
    /// Keeps the keyspace (and the directory lock) alive for reads such as `dead_letters`.
    store: Arc<Store>,
    dedupe_window: Duration,
}

/// Decodes leased records, outside the queue lock. A record that does not decode (we wrote
/// it, so only a bug can cause that) is logged and stays leased: never sent, never lost (it
/// is still in the log, and the next open refuses it as malformed).
fn decode_leased(leased: Vec<Leased>) -> Vec<Pending> {
    leased
        .into_iter()
        .filter_map(|l| match record::decode(&l.record) {
            Ok(delivery) => Some(Pending {
                seq: l.seq,
                delivery,
                attempts: l.attempts,
            }),
            Err(e) => {
                tracing::error!(seq = l.seq, error = %e, "pending record does not decode, held");
                None
            }
        })
        .collect()
}

/// Writes what is queued in the commit when dropped (see [`Outbox::call`]).
struct WriteOnDrop<'a>(&'a Commit);

impl Drop for WriteOnDrop<'_> {
    fn drop(&mut self) {
        self.0.combine();
    }
}

/// The durable outbox. Cheap to clone; all clones share one store and one commit.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (or creates) the outbox in `settings.dir` and recovers it: the pending queue and
    /// the dedupe index are rebuilt from disk before this returns (expired dedupe entries are
    /// pruned later, step by step, by the `outbox-commit` thread). Blocking: call it at startup
    /// or from `spawn_blocking`.
    pub fn open(settings: OutboxSettings) -> Result<Outbox, OutboxError> {
        let store = Arc::new(Store::open(&settings.dir)?);
        // Log positions keep a segment's offsets in 32 bits.
        let segment_bytes = settings.log_segment_bytes.clamp(1, 1 << 30);
        let recovered = store.recover(&settings.dir, segment_bytes, settings.log_preallocate)?;
        let queue = Queue::from_records(recovered.pending);
        let log = recovered.log;
        let log_shared = Arc::clone(log.shared());
        let start_lsn = log.position();
        tracing::info!(
            dir = %settings.dir.display(),
            pending = queue.len(),
            dead_letters = recovered.dead_count,
            next_seq = recovered.next_seq,
            "outbox recovered"
        );
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            notify: Notify::new(),
            poisoned: AtomicBool::new(false),
            dead_count: AtomicUsize::new(recovered.dead_count),
            syncs: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            last_sync_nanos: AtomicU64::new(u64::MAX),
            unsynced: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            dedupe_filter_bytes: AtomicUsize::new(0),
            fjall_unsynced: AtomicBool::new(false),
            written_lsn: AtomicU64::new(start_lsn),
            synced_lsn: AtomicU64::new(start_lsn),
            index: Mutex::new(recovered.indexing),
            metrics: settings.metrics.clone(),
            #[cfg(test)]
            faults: tests::Faults::default(),
        });
        let (index_tx, index_rx) = mpsc::channel();
        let indexer = index::Indexer {
            store: Arc::clone(&store),
            shared: Arc::clone(&shared),
            log: Arc::clone(&log_shared),
        };
        std::thread::Builder::new()
            .name("outbox-index".into())
            .spawn(move || indexer.run(index_rx))
            .map_err(OutboxError::Io)?;
        let (sync_tx, sync_rx) = mpsc::channel();
        let syncer = Syncer::new(
            Arc::clone(&shared),
            settings.sync,
            &store::store_dir(&settings.dir),
            log_shared,
        );
        std::thread::Builder::new()
            .name("outbox-sync".into())
            .spawn(move || syncer.run(sync_rx))
            .map_err(OutboxError::Io)?;
        let dedupe_window = settings.dedupe_window;
        let (control, rx) = mpsc::channel();
        let commit = Arc::new(Commit::new(Committer::new(
            Arc::clone(&store),
            Arc::clone(&shared),
            settings,
            recovered.next_seq,
            sync_tx,
            log,
            index_tx,
        )));
        let thread_commit = Arc::clone(&commit);
        std::thread::Builder::new()
            .name("outbox-commit".into())
            .spawn(move || thread_commit.run(rx))
            .map_err(OutboxError::Io)?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                commit,
                control,
                shared,
                store,
                dedupe_window,
            }),
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, OutboxError>>) -> Msg,
    ) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        let commit = &self.inner.commit;
        commit.submit(make(reply));
        {
            // Let the other tasks ready on this thread queue their messages too, then write
            // them all as one group. The guard writes when dropped, so a caller dropped during
            // the yield (client gone) still has its message written and answered.
            let _write = WriteOnDrop(commit);
            tokio::task::yield_now().await;
        }
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    fn check_poisoned(&self) -> Result<(), OutboxError> {
        if self.inner.shared.poisoned.load(Ordering::Acquire) {
            return Err(OutboxError::Poisoned);
        }
        Ok(())
    }

    /// Durably records the events' deliveries and dedupe entries, in one atomic write shared
    /// with concurrent callers. Returns one outcome per event, in order.
    pub async fn append(
        &self,
        events: Vec<AcceptedEvent>,
    ) -> Result<Vec<AppendOutcome>, OutboxError> {
        self.check_poisoned()?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.append_rated(events).await?.outcomes)
    }

    /// As [`Outbox::append`], also answering the period-tiered fees the commit rated against
    /// their running totals (see `pricing::period`).
    pub async fn append_rated(&self, events: Vec<AcceptedEvent>) -> Result<Appended, OutboxError> {
        self.check_poisoned()?;
        if events.is_empty() {
            return Ok(Appended::default());
        }
        let Some(metrics) = &self.inner.shared.metrics else {
            return self.call(|reply| Msg::Append { events, reply }).await;
        };
        let started = std::time::Instant::now();
        let result = self.call(|reply| Msg::Append { events, reply }).await;
        metrics.observe_commit_wait(started.elapsed());
        result
    }

    /// Whether the event was accepted (durably) within the dedupe window: what an append of it
    /// would answer `Duplicate`, except for an append in flight. A read of the dedupe index
    /// (memory, or a point lookup in its partition), for the rare caller that must know before
    /// appending (balance gating, about to refuse an event that may be a resend).
    pub fn is_recorded(&self, tenant: &TenantId, event: &EventId) -> Result<bool, OutboxError> {
        let key = dedupe::key(tenant, event);
        let now_ms = dedupe::now_ms();
        let window = self.inner.dedupe_window;
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if let Some(at) = self.inner.shared.index.lock().recent(&key) {
            return Ok(at.saturating_add(window_ms) >= now_ms);
        }
        self.inner.store.is_seen(&key, now_ms, window)
    }

    /// Every undelivered delivery (pending or leased), decoded: for a stage that must know what
    /// is owed at start (balance gating holds the pending debits). Copies the queue's records
    /// under its lock and decodes them outside it.
    pub fn pending_deliveries(&self) -> Vec<Delivery> {
        let records = self.inner.shared.queue.lock().records();
        records
            .iter()
            .filter_map(|r| record::decode(r).ok())
            .collect()
    }

    /// The running total recorded under `key` (see `pricing::period`): what the next accepted
    /// event would be rated against. Reads the store on a miss in memory: blocking (but a
    /// point read; `POST /v1/quote` calls it).
    pub fn running_total(&self, key: &str) -> Result<rust_decimal::Decimal, OutboxError> {
        if let Some(total) = self.inner.shared.index.lock().totals.get(key) {
            return Ok(*total);
        }
        self.inner.store.total(key)
    }

    /// Leases up to `max` pending deliveries that are not currently leased, oldest first.
    pub fn next_batch(&self, max: usize) -> Vec<Pending> {
        let leased = self.inner.shared.queue.lock().lease(max);
        decode_leased(leased)
    }

    /// Resolves when there may be new pending work (spurious wake-ups are possible).
    pub async fn wait_pending(&self) {
        self.inner.shared.notify.notified().await;
    }

    /// Removes delivered records. Written without a sync of their own (see the module docs).
    pub async fn mark_delivered(&self, seqs: &[u64]) -> Result<(), OutboxError> {
        self.check_poisoned()?;
        if seqs.is_empty() {
            return Ok(());
        }
        // Keep them leased until the removal is written so nobody leases them again.
        self.inner.shared.queue.lock().hold(seqs);
        let seqs = seqs.to_vec();
        self.call(|reply| Msg::Delivered { seqs, reply }).await
    }

    /// Gives leased records back to the queue to be retried.
    pub fn release(&self, seqs: &[u64]) {
        let released = self.inner.shared.queue.lock().release(seqs);
        if released > 0 {
            self.inner.shared.wake();
        }
    }

    /// Atomically moves a pending record to the dead-letter store, with why it failed.
    pub async fn dead_letter(
        &self,
        seq: u64,
        code: DeadCode,
        reason: String,
        upstream_status: Option<u16>,
        upstream_body: Option<String>,
    ) -> Result<(), OutboxError> {
        self.check_poisoned()?;
        self.inner.shared.queue.lock().hold(&[seq]);
        self.call(|reply| Msg::DeadLetter {
            seq,
            code,
            reason,
            upstream_status,
            upstream_body,
            reply,
        })
        .await
    }

    /// All dead letters, oldest sequence first. Reads the store (blocking, but rare: admin use).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        self.inner.store.dead_letters()
    }

    /// Up to `limit` dead letters with a sequence number above `after` (all when `None`),
    /// oldest first, and whether more follow. Reads the store: blocking (call it from
    /// `spawn_blocking`).
    pub fn dead_letters_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), OutboxError> {
        self.inner.store.dead_letters_page(after, limit)
    }

    /// Moves dead letters (the given ones, or all) back to pending; returns how many moved.
    /// Unknown sequence numbers are skipped. Replayed records may exceed `max_pending`.
    pub async fn replay(&self, seqs: Option<&[u64]>) -> Result<usize, OutboxError> {
        self.check_poisoned()?;
        let seqs = seqs.map(<[u64]>::to_vec);
        self.call(|reply| Msg::Replay { seqs, reply }).await
    }

    /// Leases exactly the given records (those pending and not leased; others are skipped):
    /// for re-sending a coalesced batch with its persisted membership after a restart.
    pub fn lease(&self, seqs: &[u64]) -> Vec<Pending> {
        let leased = self.inner.shared.queue.lock().lease_seqs(seqs);
        decode_leased(leased)
    }

    /// Durably records (per the sync policy) which records a coalesced send is made of, before
    /// the first send: a retry after a crash must send the same membership under the same id.
    pub async fn persist_batch(&self, batch_id: Uuid, seqs: &[u64]) -> Result<(), OutboxError> {
        self.check_poisoned()?;
        let seqs = seqs.to_vec();
        self.call(|reply| Msg::PersistBatch {
            id: batch_id,
            seqs,
            reply,
        })
        .await
    }

    /// Batches persisted and not completed: to be re-sent as they are (see [`Outbox::lease`]).
    pub fn persisted_batches(&self) -> Result<Vec<(Uuid, Vec<u64>)>, OutboxError> {
        let mut batches = self.inner.store.batches()?;
        // Completed batches leave the store only once their delivered marks are durable.
        let ix = self.inner.shared.index.lock();
        batches.retain(|(id, _)| !ix.forgetting(id));
        Ok(batches)
    }

    /// Upstream accepted the batch: forgets its membership and removes its records, in one
    /// write (unsynced, like [`Outbox::mark_delivered`]). Unknown batch ids are a no-op.
    pub async fn complete_batch(&self, batch_id: Uuid) -> Result<(), OutboxError> {
        self.check_poisoned()?;
        self.call(|reply| Msg::CompleteBatch {
            id: batch_id,
            reply,
        })
        .await
    }

    /// Upstream refused a batch for good: forgets its membership (durably) and keeps its records
    /// pending, so they are sent (and, if refused, dead-lettered) one by one under their own ids.
    pub async fn forget_batch(&self, batch_id: Uuid) -> Result<(), OutboxError> {
        self.check_poisoned()?;
        self.call(|reply| Msg::ForgetBatch {
            id: batch_id,
            reply,
        })
        .await
    }

    /// When the oldest undelivered record was accepted (`None` when there is none): how far
    /// behind Credyt the proxy is.
    pub fn oldest_accepted_at(&self) -> Option<DateTime<Utc>> {
        let oldest = self.inner.shared.queue.lock().oldest();
        oldest.and_then(|encoded| record::decode(&encoded).ok().map(|d| d.accepted_at()))
    }

    /// Undelivered (pending or leased) records; dead letters are not counted.
    pub fn depth(&self) -> usize {
        self.inner.shared.queue.lock().len()
    }

    pub fn stats(&self) -> OutboxStats {
        let s = &self.inner.shared;
        let nanos = s.last_sync_nanos.load(Ordering::Relaxed);
        let (log_segments, unindexed_ids) = {
            let ix = s.index.lock();
            (ix.segments.len(), ix.recent.len())
        };
        OutboxStats {
            log_segments,
            unindexed_ids,
            depth: self.depth(),
            dead_letters: s.dead_count.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            groups: s.groups.load(Ordering::Relaxed),
            appends: s.appends.load(Ordering::Relaxed),
            last_sync_latency: (nanos != u64::MAX).then(|| Duration::from_nanos(nanos)),
            poisoned: s.poisoned.load(Ordering::Relaxed),
            dedupe_filter_bytes: s.dedupe_filter_bytes.load(Ordering::Relaxed),
        }
    }

    /// Writes what is queued, syncs once more, stops the `outbox-commit` thread and, if this
    /// was the last handle, closes the store and releases the directory lock. Other clones get
    /// [`OutboxError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        let result = match self.inner.control.send(Control::Close(reply)) {
            Ok(()) => rx.await.unwrap_or(Err(OutboxError::Closed)),
            Err(_) => Err(OutboxError::Closed),
        };
        // Dropping the last handle drops the keyspace, which joins fjall's threads: blocking.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        result
    }

    /// Test-only crash: the outbox stops without its final sync and the store is
    /// dropped as a killed process would leave it (every acknowledged write already reached
    /// the OS; nothing else is flushed).
    #[cfg(test)]
    pub(crate) async fn crash(self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.control.send(Control::Crash(reply)).is_ok() {
            let _ = rx.await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }
}
