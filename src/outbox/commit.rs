//! Group commit without a hand-off: the callers write their groups themselves ("flat
//! combining"); the sync thread (`syncer`) makes groups durable.
//!
//! A call queues its message in [`Commit`] and, after letting every other task that is ready on
//! its thread queue theirs (one `yield`), tries to take the commit lock. Whoever holds it
//! writes everything queued, group after group (up to `max_group` messages each), and answers;
//! a caller that finds the lock taken just waits for its answer, which the holder gives. Under
//! load, the requests one event-loop turn of a worker parsed are written as one group, with no
//! thread hop and no wake-up of another thread (both were most of an append's cost). For each
//! group, in order:
//!
//! 1. decide every request against the store and the group so far (dedupe lookups: the group,
//!    the keys not indexed yet, then the partition; `Full`), rating the period-tiered fees of
//!    its new events against the running totals as the group so far left them, staging its
//!    changes into the group's log frame (records, delivered marks, dedupe keys, running
//!    totals) and fjall batch (dead letters,
//!    batch memberships; see the `store` module for what goes where and in which order);
//! 2. write the frame to the log and then the batch to fjall, both to the OS only;
//! 3. with [`SyncPolicy::Interval`], apply the group to the in-memory queue, wake the
//!    forwarder and answer at once; with [`SyncPolicy::Always`], hand the group to the sync
//!    thread, which applies and answers it after an `fdatasync` that began after the write
//!    (if the group holds anything whose loss would matter: appends, dead letters, replays,
//!    batch memberships; not delivered marks), and go on with the next group meanwhile.
//!
//! If 2 fails, every request of the group gets an error, nothing is applied, and the outbox is
//! poisoned; a failed sync does the same for the groups it covered. Groups are decided one
//! after the other (under the commit lock), so an id in flight in one request is decided by the
//! time a later request looks it up; within a group, and across groups waiting for the same or
//! a later sync, a repeated id is answered `Duplicate` only once the group with the first
//! occurrence is durable (answers leave the sync thread in group order).
//!
//! The writing runs in plain (blocking) code between two awaits: a caller dropped before it
//! (client disconnect) leaves its message queued, and the next writer writes it; once started, a
//! group is written and answered whole. The `outbox-commit` thread only prunes the dedupe index
//! and copies records out of old log segments between groups, writes what a dropped caller left
//! queued, and closes.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::index::{Deferred, ToIndex};
use super::log::Log;
use super::queue::Encoded;
use super::store::{encode_dead, seq_key, store_batch_value, Store};
use super::syncer::ToSyncer;
use super::{
    dedupe, record, AcceptedEvent, AppendOutcome, Appended, DeadLetter, OutboxError,
    OutboxSettings, Shared, SyncPolicy,
};
use crate::domain::Delivery;
use crate::pricing::period::PeriodRated;
use rust_decimal::Decimal;

/// Running totals staged by a call or a group: in the order written (the frame's order; the
/// last of a key wins) and the latest by key.
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) order: Vec<(Box<str>, Decimal)>,
    latest: std::collections::HashMap<Box<str>, Decimal>,
}

impl Totals {
    fn set(&mut self, key: &str, total: Decimal) {
        self.order.push((key.into(), total));
        self.latest.insert(key.into(), total);
    }

    fn get(&self, key: &str) -> Option<Decimal> {
        self.latest.get(key).copied()
    }

    fn extend(&mut self, other: Totals) {
        for (k, t) in &other.order {
            self.latest.insert(k.clone(), *t);
        }
        self.order.extend(other.order);
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How often the commit checks whether a pass over the dedupe index is due (see
/// `SeenFilter::pass_due`).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A log segment this many segments behind the active one has its pending records copied
/// forward (see [`Committer::copy_forward`]).
const COPY_AFTER: u64 = 4;
/// ... and once fewer than 1 in this many of the records written to it are still pending.
const COPY_WHEN_LIVE_BELOW: usize = 8;
/// Most records copied at once.
const COPY_CHUNK: usize = 1_000;
/// How often the `outbox-commit` thread looks for such a segment.
const COPY_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Pause between two steps of a pass ([`dedupe::PRUNE_CHUNK`] entries each): a pass over 10⁸
/// ids takes about 17 minutes and never takes more than a sliver of the commit thread.
const PRUNE_STEP_EVERY: Duration = Duration::from_millis(20);

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

/// Records staged for the in-memory queue once their group is committed (as encoded), with
/// their log segment.
type Added = Vec<(u64, Encoded, u64)>;

pub(crate) enum Msg {
    Append {
        events: Vec<AcceptedEvent>,
        reply: Reply<Appended>,
    },
    Delivered {
        seqs: Vec<u64>,
        reply: Reply<()>,
    },
    DeadLetter {
        seq: u64,
        code: super::DeadCode,
        reason: String,
        upstream_status: Option<u16>,
        upstream_body: Option<String>,
        reply: Reply<()>,
    },
    Replay {
        seqs: Option<Vec<u64>>,
        reply: Reply<usize>,
    },
    PersistBatch {
        id: Uuid,
        seqs: Vec<u64>,
        reply: Reply<()>,
    },
    CompleteBatch {
        id: Uuid,
        reply: Reply<()>,
    },
    ForgetBatch {
        id: Uuid,
        reply: Reply<()>,
    },
}

/// What the `outbox-commit` thread is told.
pub(crate) enum Control {
    /// Write what is queued, sync once more, answer and stop.
    Close(Reply<()>),
    /// Test-only crash: stop without the final sync.
    #[cfg(test)]
    Crash(Reply<()>),
}

/// A request decided and staged into the group's batch, waiting for the commit.
pub(crate) enum Staged {
    Append {
        reply: Reply<Appended>,
        outcomes: Appended,
        added: Added,
    },
    Delivered {
        reply: Reply<()>,
        seqs: Vec<u64>,
    },
    DeadLetter {
        reply: Reply<()>,
        seq: u64,
    },
    Replay {
        reply: Reply<usize>,
        added: Added,
    },
    Done {
        reply: Reply<()>,
    },
}

impl Staged {
    pub(crate) fn fail(self, err: impl Fn() -> OutboxError) {
        // A caller that went away no longer needs the answer.
        let _ = match self {
            Staged::Append { reply, .. } => reply.send(Err(err())).map_err(drop),
            Staged::Delivered { reply, .. }
            | Staged::DeadLetter { reply, .. }
            | Staged::Done { reply } => reply.send(Err(err())).map_err(drop),
            Staged::Replay { reply, .. } => reply.send(Err(err())).map_err(drop),
        };
    }
}

/// The queue of messages and the state of the writer; see the module docs.
pub(crate) struct Commit {
    queue: Mutex<Vec<Msg>>,
    state: Mutex<Committer>,
}

impl Commit {
    pub(crate) fn new(committer: Committer) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            state: Mutex::new(committer),
        }
    }

    pub(crate) fn submit(&self, msg: Msg) {
        self.queue.lock().push(msg);
    }

    /// Writes what is queued unless another thread is writing (which then writes it).
    pub(crate) fn combine(&self) {
        self.lead(self.state.try_lock());
    }

    /// With the commit lock (if given): writes group after group until the queue is empty,
    /// releases the lock, and takes it again if a message came in meanwhile whose caller may
    /// have found the lock still taken (so no message stays queued without a writer).
    fn lead<'a>(&'a self, mut guard: Option<MutexGuard<'a, Committer>>) {
        while let Some(mut state) = guard.take() {
            self.drain(&mut state);
            drop(state);
            if self.queue.lock().is_empty() {
                return;
            }
            guard = self.state.try_lock();
        }
    }

    /// Writes what is queued, group after group (up to `max_group` messages each), until the
    /// queue is empty. Called with the commit lock held.
    fn drain(&self, state: &mut Committer) {
        loop {
            let group = {
                let mut queue = self.queue.lock();
                let n = queue.len().min(state.settings.max_group.max(1));
                queue.drain(..n).collect::<Vec<_>>()
            };
            if group.is_empty() {
                return;
            }
            state.process(group);
        }
    }

    /// The `outbox-commit` thread: prunes between groups, writes what callers dropped before
    /// writing left queued, and closes (also when every handle is gone without a close).
    pub(crate) fn run(self: Arc<Self>, rx: mpsc::Receiver<Control>) {
        loop {
            let timeout = self.state.lock().idle_timeout();
            match rx.recv_timeout(timeout) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let mut state = self.state.lock();
                    state.maintain();
                    self.lead(Some(state));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.close();
                    return;
                }
                Ok(Control::Close(reply)) => {
                    let result = self.close();
                    // The store goes with the last handle: this thread's must be gone first.
                    drop(self);
                    let _ = reply.send(result);
                    return;
                }
                #[cfg(test)]
                Ok(Control::Crash(reply)) => {
                    let mut state = self.state.lock();
                    state.closed = true;
                    let (done, wait) = mpsc::channel();
                    if state.syncer.send(ToSyncer::Crash(done)).is_ok() {
                        let _ = wait.recv();
                    }
                    state.stop_index(true);
                    self.lead(Some(state));
                    drop(self);
                    let _ = reply.send(Ok(()));
                    return;
                }
            }
        }
    }

    /// Writes what is queued, refuses what comes later, and has the sync thread answer the
    /// groups in flight, sync and stop.
    fn close(&self) -> Result<(), OutboxError> {
        let mut state = self.state.lock();
        self.drain(&mut state);
        state.closed = true;
        let result = state.final_sync();
        // Anything queued meanwhile (its caller found the lock taken) is answered `Closed`.
        self.lead(Some(state));
        result
    }
}

pub(crate) struct Committer {
    store: Arc<Store>,
    shared: Arc<Shared>,
    settings: OutboxSettings,
    next_seq: u64,
    /// The sync thread (see the `syncer` module): groups to make durable, close and crash.
    syncer: mpsc::Sender<ToSyncer>,
    /// When the last pruning pass ended (a new one starts [`PRUNE_EVERY`] later).
    last_prune: Instant,
    /// The pass in progress, and when its last step ran.
    prune: Option<(dedupe::PruneCursor, Instant)>,
    /// Which dedupe keys are certainly not stored (see the `dedupe` module).
    seen: dedupe::SeenFilter,
    /// Closed (or crashed): every later message is answered [`OutboxError::Closed`].
    closed: bool,
    /// The record log: where groups are written (see the `log` module).
    log: Log,
    /// The index thread (see the `index` module): close.
    index: mpsc::Sender<ToIndex>,
}

impl Committer {
    pub(crate) fn new(
        store: Arc<Store>,
        shared: Arc<Shared>,
        settings: OutboxSettings,
        next_seq: u64,
        syncer: mpsc::Sender<ToSyncer>,
        log: Log,
        index: mpsc::Sender<ToIndex>,
    ) -> Self {
        Self {
            store,
            shared,
            settings,
            next_seq,
            syncer,
            last_prune: Instant::now(),
            // The first pass starts at once: it builds the dedupe filter.
            prune: Some((
                dedupe::PruneCursor::default(),
                Instant::now()
                    .checked_sub(PRUNE_STEP_EVERY)
                    .unwrap_or_else(Instant::now),
            )),
            seen: dedupe::SeenFilter::default(),
            closed: false,
            log,
            index,
        }
    }

    fn idle_timeout(&self) -> Duration {
        let prune = match &self.prune {
            Some((_, last_step)) => PRUNE_STEP_EVERY.saturating_sub(last_step.elapsed()),
            None => PRUNE_EVERY.saturating_sub(self.last_prune.elapsed()),
        };
        prune.min(COPY_CHECK_EVERY)
    }

    /// Dedupe pruning and copying records out of old log segments, between groups (syncs are
    /// the sync thread's).
    fn maintain(&mut self) {
        if self.poisoned() {
            return;
        }
        self.copy_forward();
        let now_ms = dedupe::now_ms();
        let due = match &self.prune {
            Some((_, last_step)) => last_step.elapsed() >= PRUNE_STEP_EVERY,
            None if self.last_prune.elapsed() >= PRUNE_EVERY => {
                // Looked at again in PRUNE_EVERY whether a pass is due or not.
                self.last_prune = Instant::now();
                self.seen.pass_due(now_ms, self.settings.dedupe_window)
            }
            None => false,
        };
        if due {
            let mut cursor = self.prune.take().map(|(c, _)| c).unwrap_or_default();
            // A new pass reads the partition; keys written but not indexed yet are not there
            // (see the `index` module). Taken before the pass begins: a key the index thread
            // moves into the partition meanwhile, behind the pass's cursor, is still counted.
            let recent: Vec<(dedupe::Key, u64)> = if cursor.at_start() {
                let ix = self.shared.index.lock();
                ix.recent.iter().map(|(k, at)| (*k, *at)).collect()
            } else {
                Vec::new()
            };
            cursor.also_holds(recent.iter().map(|(_, at)| *at));
            match self.store.prune_dedupe_step(
                &mut cursor,
                now_ms,
                self.settings.dedupe_window,
                dedupe::PRUNE_CHUNK,
                &mut self.seen,
            ) {
                Ok((n, done)) => {
                    for (key, _) in &recent {
                        self.seen.insert(key);
                    }
                    self.shared
                        .dedupe_filter_bytes
                        .store(self.seen.bytes(), Ordering::Relaxed);
                    if n > 0 {
                        tracing::debug!(pruned = n, "outbox dedupe entries expired");
                    }
                    if done {
                        self.last_prune = Instant::now();
                    } else {
                        self.prune = Some((cursor, Instant::now()));
                    }
                }
                Err(e) => self.poison("prune", &e),
            }
        }
    }

    /// Hands the close to the sync thread, which answers the groups still in flight, syncs
    /// what was written and stops.
    fn final_sync(&mut self) -> Result<(), OutboxError> {
        let (done, wait) = mpsc::channel();
        self.syncer
            .send(ToSyncer::Close(done))
            .map_err(|_| OutboxError::Closed)?;
        let result = wait.recv().map_err(|_| OutboxError::Closed)?;
        // What the final sync made durable goes to the index before the store closes.
        self.stop_index(false);
        if result.is_ok() {
            tracing::info!("outbox closed");
        }
        result
    }

    /// Stops the index thread (indexing what is due first, unless `crash`) and waits until it
    /// let go of the store.
    fn stop_index(&self, crash: bool) {
        let (done, wait) = mpsc::channel();
        if self.index.send(ToIndex::Close { done, crash }).is_ok() {
            let _ = wait.recv();
        }
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn poison(&self, stage: &'static str, err: &OutboxError) {
        poison(&self.shared, stage, err);
    }

    /// Decides, writes and answers one group.
    fn process(&mut self, group: Vec<Msg>) {
        if self.closed {
            for msg in group {
                fail_msg(msg, || OutboxError::Closed);
            }
            return;
        }
        self.log.frame().clear();
        let mut batch = self.store.batch();
        let mut g = GroupState::default();
        let mut staged = Vec::with_capacity(group.len());
        // The dedupe keys of the group's new events; they are written last, in key order.
        let mut claimed = dedupe::KeySet::default();
        // Running totals the group's calls moved, in order (see `pricing::period`).
        let mut totals = Totals::default();
        // Records of groups still at the sync thread count too: they are applied shortly. Both
        // read under the queue lock, under which the sync thread moves them into the queue.
        let mut pending = {
            let queue = self.shared.queue.lock();
            queue.len() + self.shared.in_flight.load(Ordering::Acquire)
        };
        let mut appends = 0u64;
        let now_ms = dedupe::now_ms();
        let seg = self.log.segment();
        // The dedupe keys of every append of the group, up front, so the filter's blocks for
        // all of them are loaded at once (see `SeenFilter::warm`).
        let keys: Vec<Vec<dedupe::Key>> = group
            .iter()
            .map(|msg| match msg {
                Msg::Append { events, .. } => events
                    .iter()
                    .map(|ev| dedupe::key(&ev.tenant, &ev.event_id))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        self.seen.warm(keys.iter().flatten());

        for (msg, keys) in group.into_iter().zip(keys) {
            if self.poisoned() {
                fail_msg(msg, || OutboxError::Poisoned);
                continue;
            }
            match msg {
                Msg::Append { events, reply } => {
                    match self.stage_append(
                        events,
                        keys,
                        &mut claimed,
                        &mut totals,
                        pending,
                        now_ms,
                    ) {
                        Ok((outcomes, added)) => {
                            pending += added.len();
                            g.needs_sync |= outcomes.outcomes.contains(&AppendOutcome::Accepted);
                            g.added += added.len();
                            appends += 1;
                            staged.push(Staged::Append {
                                reply,
                                outcomes,
                                added,
                            });
                        }
                        Err(e) => {
                            if e.is_fatal() {
                                self.poison("append", &e);
                            }
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Msg::Delivered { seqs, reply } => {
                    let queue = self.shared.queue.lock();
                    let seqs: Vec<u64> = seqs
                        .into_iter()
                        .filter(|s| match queue.segment(*s) {
                            Some(seg) => {
                                g.removed_from.push(seg);
                                true
                            }
                            None => false,
                        })
                        .collect();
                    drop(queue);
                    for &seq in &seqs {
                        self.log.frame().remove(seq);
                    }
                    staged.push(Staged::Delivered { reply, seqs });
                }
                Msg::DeadLetter {
                    seq,
                    code,
                    reason,
                    upstream_status,
                    upstream_body,
                    reply,
                } => {
                    let found = {
                        let queue = self.shared.queue.lock();
                        queue.get(seq).cloned().zip(queue.segment(seq))
                    };
                    let Some((encoded, from)) = found else {
                        let _ = reply.send(Err(OutboxError::UnknownSeq { seq }));
                        continue;
                    };
                    let delivery = match record::decode(&encoded) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    let letter = DeadLetter {
                        seq,
                        delivery,
                        code,
                        reason,
                        upstream_status,
                        upstream_body,
                        at: chrono::Utc::now(),
                    };
                    match encode_dead(&letter) {
                        Ok(bytes) => {
                            // Only into `dead`: the log keeps the record, and a record that is
                            // also a dead letter is one (see the `store` module).
                            batch.insert(&self.store.dead, seq_key(seq).to_vec(), bytes);
                            g.removed_from.push(from);
                            g.needs_sync = true;
                            g.fjall_durable = true;
                            staged.push(Staged::DeadLetter { reply, seq });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Msg::Replay { seqs, reply } => {
                    match self.store.stage_replay(&mut batch, seqs.as_deref()) {
                        Ok(moved) => {
                            let mut added = Vec::with_capacity(moved.len());
                            for (seq, bytes) in moved {
                                self.log.frame().add(seq, &bytes);
                                added.push((seq, Encoded::from(bytes), seg));
                            }
                            g.needs_sync |= !added.is_empty();
                            g.replayed |= !added.is_empty();
                            g.added += added.len();
                            staged.push(Staged::Replay { reply, added });
                        }
                        Err(e) => {
                            if e.is_fatal() {
                                self.poison("replay", &e);
                            }
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Msg::PersistBatch { id, seqs, reply } => match store_batch_value(&seqs) {
                    Ok(bytes) => {
                        batch.insert(&self.store.batches, id.as_bytes().to_vec(), bytes);
                        g.needs_sync = true;
                        g.fjall_durable = true;
                        staged.push(Staged::Done { reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::CompleteBatch { id, reply } => match self.store.get_batch(id) {
                    Ok(members) => {
                        let members = members.unwrap_or_default();
                        {
                            let queue = self.shared.queue.lock();
                            g.removed_from
                                .extend(members.iter().filter_map(|s| queue.segment(*s)));
                        }
                        for &seq in &members {
                            self.log.frame().remove(seq);
                        }
                        // The membership goes once these marks are durable (index thread).
                        g.forget_batches.push(id);
                        staged.push(Staged::Delivered {
                            reply,
                            seqs: members,
                        });
                    }
                    Err(e) => {
                        if e.is_fatal() {
                            self.poison("complete_batch", &e);
                        }
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::ForgetBatch { id, reply } => {
                    batch.remove(&self.store.batches, id.as_bytes().to_vec());
                    g.needs_sync = true;
                    g.fjall_durable = true;
                    staged.push(Staged::Done { reply });
                }
            }
        }

        // The dedupe keys are uniform hashes; in key order the index thread's inserts (and
        // the recovery's) follow each other's paths through the memtable.
        let mut keys: Vec<dedupe::Key> = claimed.into_iter().collect();
        keys.sort_unstable();
        for key in &keys {
            self.log.frame().key(key, now_ms);
        }
        let written = match self.write(batch, &g) {
            Ok(lsn) => lsn,
            Err(e) => {
                // Nothing of the group is applied in memory; seqs are not reused (harmless gap).
                let injected = matches!(e, OutboxError::Io(_)) && !self.poisoned();
                for s in staged {
                    s.fail(|| {
                        if injected {
                            OutboxError::Io(std::io::Error::other("outbox write failed"))
                        } else {
                            OutboxError::Poisoned
                        }
                    });
                }
                return;
            }
        };
        {
            let mut ix = self.shared.index.lock();
            for key in &keys {
                ix.recent.insert(*key, now_ms);
            }
            for (key, total) in &totals.latest {
                ix.totals.insert(key.clone(), *total);
            }
            if !keys.is_empty() || !g.forget_batches.is_empty() || !totals.is_empty() {
                ix.deferred.push_back(Deferred {
                    lsn: written,
                    keys: keys.into_iter().map(|k| (k, now_ms)).collect(),
                    forget_batches: std::mem::take(&mut g.forget_batches),
                    totals: totals.order,
                });
            }
            if g.added > 0 {
                ix.add_live(seg, g.added);
            }
            for from in g.removed_from.drain(..) {
                ix.remove_live(from);
            }
            ix.segments.insert(self.log.segment());
        }
        self.shared.groups.fetch_add(1, Ordering::Relaxed);
        self.shared.appends.fetch_add(appends, Ordering::Relaxed);
        if let (Some(metrics), true) = (&self.shared.metrics, appends > 0) {
            metrics.observe_group(appends);
        }
        match self.settings.sync {
            // In order through the sync thread, which answers after the covering fdatasync.
            SyncPolicy::Always => {
                let records = staged_records(&staged);
                self.shared.in_flight.fetch_add(records, Ordering::AcqRel);
                let group = ToSyncer::Group {
                    staged,
                    sync: g.needs_sync,
                };
                if let Err(mpsc::SendError(ToSyncer::Group { staged, .. })) =
                    self.syncer.send(group)
                {
                    self.shared.in_flight.fetch_sub(records, Ordering::AcqRel);
                    for s in staged {
                        s.fail(|| OutboxError::Closed);
                    }
                }
            }
            SyncPolicy::Interval(_) => apply(&self.shared, staged, 0),
        }
    }

    /// Decides one append call: outcomes, and the records of its new events staged into the
    /// log's frame. Their dedupe keys go into `claimed`, which the caller writes for the group.
    /// `keys` are the events' dedupe keys, in order.
    ///
    /// Period-tiered fees of the new events are rated here, in decision order, against the
    /// running totals as the group so far left them (`group_totals`, to which the call's own
    /// are appended only if the call is staged whole); see `pricing::period`.
    fn stage_append(
        &mut self,
        events: Vec<AcceptedEvent>,
        keys: Vec<dedupe::Key>,
        claimed: &mut dedupe::KeySet,
        group_totals: &mut Totals,
        pending: usize,
        now_ms: u64,
    ) -> Result<(Appended, Added), OutboxError> {
        let n_events = events.len();
        let any_totals = events.iter().any(|ev| !ev.totals.is_empty());
        let mut fresh_at: Vec<usize> = Vec::new();
        let window = self.settings.dedupe_window;
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        // Keys written but not yet in the partition (see the `index` module).
        let recent: Vec<Option<u64>> = {
            let ix = self.shared.index.lock();
            if ix.recent.is_empty() {
                Vec::new()
            } else {
                keys.iter().map(|k| ix.recent(k)).collect()
            }
        };
        let mut outcomes = Vec::with_capacity(events.len());
        let mut fresh: Vec<(dedupe::Key, AcceptedEvent)> = Vec::with_capacity(events.len());
        let mut fresh_keys =
            dedupe::KeySet::with_capacity_and_hasher(events.len(), Default::default());
        for (i, (ev, key)) in events.into_iter().zip(keys).enumerate() {
            // Claimed earlier in this group (this call or another): durable together with it.
            let dup = claimed.contains(&key)
                || !fresh_keys.insert(key)
                || match recent.get(i).copied().flatten() {
                    Some(at) => at.saturating_add(window_ms) >= now_ms,
                    None => {
                        self.seen.may_contain(&key) && self.store.is_seen(&key, now_ms, window)?
                    }
                };
            if dup {
                outcomes.push(AppendOutcome::Duplicate);
            } else {
                outcomes.push(AppendOutcome::Accepted);
                if any_totals {
                    fresh_at.push(i);
                }
                fresh.push((key, ev));
            }
        }
        // Rated only once the event is known to be new: a duplicate adds nothing.
        let mut rated: Vec<Vec<PeriodRated>> = Vec::new();
        let mut call_totals = Totals::default();
        if any_totals {
            rated.resize_with(n_events, Vec::new);
            for ((_, ev), &i) in fresh.iter_mut().zip(&fresh_at) {
                let mut zero: Vec<usize> = Vec::new();
                for claim in &ev.totals {
                    let before = self.running_total(&claim.key, &call_totals, group_totals)?;
                    let r = claim.part.rate(before).map_err(OutboxError::Rating)?;
                    let after = claim.part.after(before).map_err(OutboxError::Rating)?;
                    if let Some(Delivery::Charge(debit)) = ev.deliveries.get_mut(claim.delivery) {
                        debit.fee.amount = r.amount;
                        debit.fee.unit_price = r.unit_price;
                        debit.fee.volume_rate = r.volume_rate;
                        if r.amount.is_zero() {
                            // Credyt refuses charges of 0; the total still moves.
                            zero.push(claim.delivery);
                        }
                    }
                    call_totals.set(&claim.key, after);
                    if let Some(slot) = rated.get_mut(i) {
                        slot.push(r);
                    }
                }
                if !zero.is_empty() {
                    let mut at = 0usize;
                    ev.deliveries.retain(|_| {
                        let keep = !zero.contains(&at);
                        at += 1;
                        keep
                    });
                }
            }
        }
        let new_records: usize = fresh.iter().map(|(_, ev)| ev.deliveries.len()).sum();
        let max_pending = self.settings.max_pending;
        if new_records > 0 && pending.saturating_add(new_records) > max_pending {
            return Err(OutboxError::Full {
                pending,
                max_pending,
            });
        }
        // Records are encoded straight into the frame; if one fails, the call's part of the
        // frame is undone and nothing of it is claimed.
        let mark = self.log.frame().mark();
        let mut at = Vec::with_capacity(new_records);
        let mut seq = self.next_seq;
        for (_, ev) in &fresh {
            for d in &ev.deliveries {
                match self
                    .log
                    .frame()
                    .add_with(seq, |buf| record::encode_into(d, buf))
                {
                    Ok(range) => at.push(range),
                    Err(e) => {
                        self.log.frame().rollback(mark);
                        return Err(e);
                    }
                }
                seq += 1;
            }
        }
        for (key, total) in &call_totals.order {
            self.log.frame().total(key, *total);
        }
        // The queue keeps the encoded bytes, copied out of the frame (see the `queue` module).
        let seg = self.log.segment();
        let frame = self.log.frame();
        let added: Added = at
            .into_iter()
            .zip(self.next_seq..)
            .map(|(range, seq)| (seq, Encoded::from(frame.record(range)), seg))
            .collect();
        self.next_seq = seq;
        for (key, _) in fresh {
            self.seen.insert(&key);
            claimed.insert(key);
        }
        group_totals.extend(call_totals);
        Ok((Appended { outcomes, rated }, added))
    }

    /// The running total under `key` as the commit stands: this call's staged totals, the
    /// group's, those written and not yet indexed, then the partition (zero when none).
    fn running_total(
        &self,
        key: &str,
        call: &Totals,
        group: &Totals,
    ) -> Result<Decimal, OutboxError> {
        if let Some(total) = call.get(key).or_else(|| group.get(key)) {
            return Ok(total);
        }
        if let Some(total) = self.shared.index.lock().totals.get(key) {
            return Ok(*total);
        }
        self.store.total(key)
    }

    /// Writes the group: its frame to the log (to the OS; the sync is the sync thread's), then
    /// its fjall batch. Returns where the frame ended (or where the log stands, if the group
    /// wrote no frame).
    fn write(&mut self, batch: fjall::Batch, g: &GroupState) -> Result<u64, OutboxError> {
        if self.poisoned() {
            // Something failed while the group was decided: write none of it.
            self.log.frame().clear();
            return Err(OutboxError::Poisoned);
        }
        #[cfg(test)]
        if self.shared.faults.take_write() {
            // A failure before any byte reached the log: nothing to poison.
            self.log.frame().clear();
            return Err(OutboxError::Io(std::io::Error::other(
                "injected write failure",
            )));
        }
        let mut end = self.log.position();
        if !self.log.frame().is_empty() {
            // We cannot know how much of the frame reached the file: poison on any error.
            match self.log.write(self.next_seq) {
                Ok(lsn) => end = lsn,
                Err(e) => {
                    let e = OutboxError::Io(e);
                    self.poison("write", &e);
                    return Err(e);
                }
            }
            self.shared.written_lsn.store(end, Ordering::Release);
            self.shared.unsynced.store(true, Ordering::Release);
            if g.replayed {
                // A replay leaves `dead` below; its records must be durable in the log first.
                if let Err(e) = self.log.shared().sync() {
                    let e = OutboxError::Io(e);
                    self.poison("sync", &e);
                    return Err(e);
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = batch.commit() {
                // fjall poisons itself when a journal flush fails; we do the same for any
                // error because we cannot know how much of the batch reached the file.
                let e = OutboxError::from(e);
                self.poison("write", &e);
                return Err(e);
            }
            if g.fjall_durable {
                self.shared.fjall_unsynced.store(true, Ordering::Release);
                self.shared.unsynced.store(true, Ordering::Release);
            }
        }
        Ok(end)
    }

    /// Copies the pending records of an old log segment into the active one, so that a few
    /// records retried for long do not keep every later segment on disk. Only for segments
    /// [`COPY_AFTER`] or more behind the active one, and mostly delivered (a backlog, as in
    /// an outage, stays where it is: copying it would only write it again); at most
    /// [`COPY_CHUNK`] records per call, so the commit lock is never held long.
    fn copy_forward(&mut self) {
        let active = self.log.segment();
        let oldest = {
            let ix = self.shared.index.lock();
            ix.live.iter().next().map(|(seg, live)| {
                let written = ix.written.get(seg).copied().unwrap_or(0);
                (*seg, *live, written)
            })
        };
        let Some((old, _, _)) = oldest.filter(|(seg, live, written)| {
            seg + COPY_AFTER <= active && live.saturating_mul(COPY_WHEN_LIVE_BELOW) <= *written
        }) else {
            return;
        };
        let records = self.shared.queue.lock().in_segment(old, COPY_CHUNK);
        if records.is_empty() {
            // Counted but not in the queue: nothing there to keep.
            self.shared.index.lock().live.remove(&old);
            return;
        }
        self.log.frame().clear();
        for (seq, bytes) in &records {
            self.log.frame().add(*seq, bytes);
        }
        let g = GroupState::default();
        if let Err(e) = self.write(self.store.batch(), &g) {
            tracing::error!(error = %e, "outbox log copy failed");
            return;
        }
        {
            let mut queue = self.shared.queue.lock();
            for (seq, _) in &records {
                queue.move_to(*seq, active);
            }
        }
        let mut ix = self.shared.index.lock();
        for _ in &records {
            ix.remove_live(old);
        }
        ix.add_live(active, records.len());
        ix.segments.insert(self.log.segment());
        tracing::info!(
            segment = old,
            records = records.len(),
            "outbox records copied forward out of an old log segment"
        );
    }
}

/// What a group changes besides its frame and batch.
#[derive(Default)]
struct GroupState {
    /// Anything whose loss would matter (for `always`: sync before answering).
    needs_sync: bool,
    /// Written to fjall and needing its journal synced (dead letters, batch memberships).
    fjall_durable: bool,
    /// Dead letters moved back: the frame is synced before they leave `dead`.
    replayed: bool,
    /// Records added, all in the active segment.
    added: usize,
    /// The segments of the records the group removes (delivered or dead-lettered).
    removed_from: Vec<u64>,
    /// Completed batches, forgotten once the group is durable.
    forget_batches: Vec<Uuid>,
}

/// Applies a committed (and, per the policy, durable) group to the in-memory queue, wakes the
/// forwarder and answers. `in_flight` records of the group were counted in
/// [`Shared::in_flight`]; they stop counting there once they are in the queue, before anyone is
/// answered (so an answered caller's next append never sees them twice).
pub(crate) fn apply(shared: &Shared, staged: Vec<Staged>, in_flight: usize) {
    let mut woke = false;
    let mut queue = shared.queue.lock();
    let mut replies: Vec<Box<dyn FnOnce()>> = Vec::with_capacity(staged.len());
    for s in staged {
        match s {
            Staged::Append {
                reply,
                outcomes,
                added,
            } => {
                woke |= !added.is_empty();
                for (seq, d, seg) in added {
                    queue.insert(seq, d, seg);
                }
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(outcomes));
                }));
            }
            Staged::Delivered { reply, seqs } => {
                for seq in seqs {
                    queue.remove(seq);
                }
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(()));
                }));
            }
            Staged::DeadLetter { reply, seq } => {
                if queue.remove(seq) {
                    shared.dead_count.fetch_add(1, Ordering::Relaxed);
                }
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(()));
                }));
            }
            Staged::Done { reply } => {
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(()));
                }));
            }
            Staged::Replay { reply, added } => {
                let n = added.len();
                woke |= n > 0;
                for (seq, d, seg) in added {
                    queue.insert(seq, d, seg);
                }
                let _ = shared
                    .dead_count
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                        Some(c.saturating_sub(n))
                    });
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(n));
                }));
            }
        }
    }
    // Under the queue lock, as the commit thread reads both: a record counts exactly once.
    if in_flight > 0 {
        shared.in_flight.fetch_sub(in_flight, Ordering::AcqRel);
    }
    // Answer outside the queue lock: a woken caller may call next_batch at once.
    drop(queue);
    if woke {
        shared.wake();
    }
    for r in replies {
        r();
    }
}

/// Records a group adds to the queue when applied.
pub(crate) fn staged_records(staged: &[Staged]) -> usize {
    staged
        .iter()
        .map(|s| match s {
            Staged::Append { added, .. } | Staged::Replay { added, .. } => added.len(),
            _ => 0,
        })
        .sum()
}

/// Marks the outbox poisoned: every later write fails until the process restarts.
pub(crate) fn poison(shared: &Shared, stage: &'static str, err: &OutboxError) {
    shared.poisoned.store(true, Ordering::Release);
    tracing::error!(
        stage,
        error = %err,
        cause = ?std::error::Error::source(err),
        "outbox write failed, refusing writes until restart"
    );
}

fn fail_msg(msg: Msg, err: impl Fn() -> OutboxError) {
    // A caller that went away no longer needs the answer.
    let _ = match msg {
        Msg::Append { reply, .. } => reply.send(Err(err())).map_err(drop),
        Msg::Delivered { reply, .. }
        | Msg::DeadLetter { reply, .. }
        | Msg::PersistBatch { reply, .. }
        | Msg::CompleteBatch { reply, .. }
        | Msg::ForgetBatch { reply, .. } => reply.send(Err(err())).map_err(drop),
        Msg::Replay { reply, .. } => reply.send(Err(err())).map_err(drop),
    };
}
