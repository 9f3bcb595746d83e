//! Group commit: one thread turns every queued request into one fjall batch; the sync thread
//! (`syncer`) makes groups durable.
//!
//! The thread blocks for the first request, then drains whatever else queued up while it was
//! busy (up to `max_group` appends): under load, requests arrive while the previous group is
//! decided and written and are written together by the next. For each group, in order:
//!
//! 1. decide every request against the store and the group so far (dedupe lookups, `Full`),
//!    staging its writes into the group's batch;
//! 2. write the batch to the journal and flush it to the OS (`PersistMode::Buffer`);
//! 3. with [`SyncPolicy::Interval`], apply the group to the in-memory queue, wake the
//!    forwarder and answer at once; with [`SyncPolicy::Always`], hand the group to the sync
//!    thread, which applies and answers it after an `fdatasync` that began after the write
//!    (if the group holds anything whose loss would matter: appends, dead letters, replays,
//!    batch memberships; not delivered marks), and go on with the next group meanwhile.
//!
//! If 2 fails, every request of the group gets an error, nothing is applied, and the outbox is
//! poisoned; a failed sync does the same for the groups it covered. Groups are decided one
//! after the other, so an id in flight in one request is decided by the time a later request
//! looks it up; within a group, and across groups waiting for the same or a later sync, a
//! repeated id is answered `Duplicate` only once the group with the first occurrence is
//! durable (answers leave the sync thread in group order).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::store::{encode_dead, seq_key, store_batch_value, Store};
use super::syncer::ToSyncer;
use super::{
    dedupe, record, AcceptedEvent, AppendOutcome, DeadLetter, OutboxError, OutboxSettings, Shared,
    SyncPolicy,
};
use crate::domain::Delivery;

/// How often a pass over the dedupe index starts, pruning expired entries.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Pause between two steps of a pass ([`dedupe::PRUNE_CHUNK`] entries each): a pass over 10⁸
/// ids takes about 17 minutes and never takes more than a sliver of the commit thread.
const PRUNE_STEP_EVERY: Duration = Duration::from_millis(20);

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

/// Records staged for the in-memory queue once their group is committed.
type Added = Vec<(u64, Delivery)>;

pub(crate) enum Msg {
    Append {
        events: Vec<AcceptedEvent>,
        reply: Reply<Vec<AppendOutcome>>,
    },
    Delivered {
        seqs: Vec<u64>,
        reply: Reply<()>,
    },
    DeadLetter {
        seq: u64,
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
    Close {
        reply: Reply<()>,
    },
    #[cfg(test)]
    Crash {
        reply: Reply<()>,
    },
}

/// A request decided and staged into the group's batch, waiting for the commit.
pub(crate) enum Staged {
    Append {
        reply: Reply<Vec<AppendOutcome>>,
        outcomes: Vec<AppendOutcome>,
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

enum Stop {
    Close(Reply<()>),
    #[cfg(test)]
    Crash(Reply<()>),
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
}

impl Committer {
    pub(crate) fn new(
        store: Arc<Store>,
        shared: Arc<Shared>,
        settings: OutboxSettings,
        next_seq: u64,
        syncer: mpsc::Sender<ToSyncer>,
    ) -> Self {
        Self {
            store,
            shared,
            settings,
            next_seq,
            syncer,
            last_prune: Instant::now(),
            prune: None,
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let stop = loop {
            let first = match rx.recv_timeout(self.idle_timeout()) {
                Ok(msg) => msg,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.maintain();
                    continue;
                }
                // Every handle is gone without close(): flush what we have, as close would.
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            };
            let mut group = vec![first];
            let mut appends = usize::from(matches!(group[0], Msg::Append { .. }));
            while appends < self.settings.max_group.max(1) {
                match rx.try_recv() {
                    Ok(msg) => {
                        appends += usize::from(matches!(msg, Msg::Append { .. }));
                        let is_stop = matches!(msg, Msg::Close { .. });
                        #[cfg(test)]
                        let is_stop = is_stop || matches!(msg, Msg::Crash { .. });
                        group.push(msg);
                        if is_stop {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let stop = self.process(group);
            if stop.is_some() {
                break stop;
            }
            self.maintain();
        };
        // Requests still queued behind a stop are answered `Closed` when their reply senders
        // drop with the receiver.
        match stop {
            None => {
                let _ = self.final_sync();
            }
            Some(Stop::Close(reply)) => {
                let result = self.final_sync();
                let store = self.store;
                drop(store);
                let _ = reply.send(result);
            }
            #[cfg(test)]
            Some(Stop::Crash(reply)) => {
                let (done, wait) = mpsc::channel();
                if self.syncer.send(ToSyncer::Crash(done)).is_ok() {
                    let _ = wait.recv();
                }
                let store = self.store;
                drop(store);
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn idle_timeout(&self) -> Duration {
        match &self.prune {
            Some((_, last_step)) => PRUNE_STEP_EVERY.saturating_sub(last_step.elapsed()),
            None => PRUNE_EVERY.saturating_sub(self.last_prune.elapsed()),
        }
    }

    /// Dedupe pruning, between groups (syncs are the sync thread's).
    fn maintain(&mut self) {
        if self.poisoned() {
            return;
        }
        let due = match &self.prune {
            Some((_, last_step)) => last_step.elapsed() >= PRUNE_STEP_EVERY,
            None => self.last_prune.elapsed() >= PRUNE_EVERY,
        };
        if due {
            let mut cursor = self.prune.take().map(|(c, _)| c).unwrap_or_default();
            match self.store.prune_dedupe_step(
                &mut cursor,
                dedupe::now_ms(),
                self.settings.dedupe_window,
                dedupe::PRUNE_CHUNK,
            ) {
                Ok((n, done)) => {
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
        if result.is_ok() {
            tracing::info!("outbox closed");
        }
        result
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn poison(&self, stage: &'static str, err: &OutboxError) {
        poison(&self.shared, stage, err);
    }

    /// Decides, writes and answers one group. Returns a stop request if the group had one.
    fn process(&mut self, group: Vec<Msg>) -> Option<Stop> {
        let mut batch = self.store.batch();
        let mut staged = Vec::with_capacity(group.len());
        let mut claimed: HashSet<dedupe::Key> = HashSet::new();
        // Records of groups still at the sync thread count too: they are applied shortly. Both
        // read under the queue lock, under which the sync thread moves them into the queue.
        let mut pending = {
            let queue = self.shared.queue.lock();
            queue.len() + self.shared.in_flight.load(Ordering::Acquire)
        };
        let mut needs_sync = false;
        let mut appends = 0u64;
        let mut stop = None;
        let first_seq = self.next_seq;
        let now_ms = dedupe::now_ms();

        for msg in group {
            if self.poisoned() {
                fail_msg(msg, || OutboxError::Poisoned, &mut stop);
                continue;
            }
            match msg {
                Msg::Append { events, reply } => {
                    match self.stage_append(&mut batch, events, &mut claimed, pending, now_ms) {
                        Ok((outcomes, added)) => {
                            pending += added.len();
                            needs_sync |= !added.is_empty();
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
                        .filter(|s| queue.get(*s).is_some())
                        .collect();
                    drop(queue);
                    for &seq in &seqs {
                        batch.remove(&self.store.records, seq_key(seq).to_vec());
                    }
                    staged.push(Staged::Delivered { reply, seqs });
                }
                Msg::DeadLetter {
                    seq,
                    reason,
                    upstream_status,
                    upstream_body,
                    reply,
                } => {
                    let delivery = self.shared.queue.lock().get(seq).cloned();
                    let Some(delivery) = delivery else {
                        let _ = reply.send(Err(OutboxError::UnknownSeq { seq }));
                        continue;
                    };
                    let letter = DeadLetter {
                        seq,
                        delivery,
                        reason,
                        upstream_status,
                        upstream_body,
                        at: chrono::Utc::now(),
                    };
                    match encode_dead(&letter) {
                        Ok(bytes) => {
                            batch.remove(&self.store.records, seq_key(seq).to_vec());
                            batch.insert(&self.store.dead, seq_key(seq).to_vec(), bytes);
                            needs_sync = true;
                            staged.push(Staged::DeadLetter { reply, seq });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Msg::Replay { seqs, reply } => {
                    match self.store.stage_replay(&mut batch, seqs.as_deref()) {
                        Ok(added) => {
                            needs_sync |= !added.is_empty();
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
                        needs_sync = true;
                        staged.push(Staged::Done { reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Msg::CompleteBatch { id, reply } => match self.store.get_batch(id) {
                    Ok(members) => {
                        let members = members.unwrap_or_default();
                        for &seq in &members {
                            batch.remove(&self.store.records, seq_key(seq).to_vec());
                        }
                        batch.remove(&self.store.batches, id.as_bytes().to_vec());
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
                    needs_sync = true;
                    staged.push(Staged::Done { reply });
                }
                Msg::Close { reply } => stop = Some(Stop::Close(reply)),
                #[cfg(test)]
                Msg::Crash { reply } => stop = Some(Stop::Crash(reply)),
            }
        }

        if self.next_seq != first_seq {
            self.store.set_next_seq(&mut batch, self.next_seq);
        }
        if let Err(e) = self.write(batch) {
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
            return stop;
        }
        self.shared.groups.fetch_add(1, Ordering::Relaxed);
        self.shared.appends.fetch_add(appends, Ordering::Relaxed);
        match self.settings.sync {
            // In order through the sync thread, which answers after the covering fdatasync.
            SyncPolicy::Always => {
                let records = staged_records(&staged);
                self.shared.in_flight.fetch_add(records, Ordering::AcqRel);
                let group = ToSyncer::Group {
                    staged,
                    sync: needs_sync,
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
        stop
    }

    /// Decides one append call: outcomes, and the writes of its new events staged into `batch`.
    fn stage_append(
        &mut self,
        batch: &mut fjall::Batch,
        events: Vec<AcceptedEvent>,
        claimed: &mut HashSet<dedupe::Key>,
        pending: usize,
        now_ms: u64,
    ) -> Result<(Vec<AppendOutcome>, Added), OutboxError> {
        let window = self.settings.dedupe_window;
        let mut outcomes = Vec::with_capacity(events.len());
        let mut fresh: Vec<(dedupe::Key, AcceptedEvent)> = Vec::with_capacity(events.len());
        let mut fresh_keys: HashSet<dedupe::Key> = HashSet::with_capacity(events.len());
        for ev in events {
            let key = dedupe::key(&ev.tenant, &ev.event_id);
            // Claimed earlier in this group (this call or another): durable together with it.
            let dup = claimed.contains(&key)
                || !fresh_keys.insert(key)
                || self.store.is_seen(&key, now_ms, window)?;
            if dup {
                outcomes.push(AppendOutcome::Duplicate);
            } else {
                outcomes.push(AppendOutcome::Accepted);
                fresh.push((key, ev));
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
        // Encode everything before touching the batch, so a failure leaves it unchanged.
        let mut encoded = Vec::with_capacity(new_records);
        for (_, ev) in &fresh {
            for d in &ev.deliveries {
                encoded.push(record::encode(d)?);
            }
        }
        let mut added = Vec::with_capacity(new_records);
        let mut encoded = encoded.into_iter();
        for (key, ev) in fresh {
            for (delivery, bytes) in ev.deliveries.into_iter().zip(encoded.by_ref()) {
                let seq = self.next_seq;
                self.next_seq += 1;
                batch.insert(&self.store.records, seq_key(seq).to_vec(), bytes);
                added.push((seq, delivery));
            }
            self.store.stage_seen(batch, &key, now_ms);
            claimed.insert(key);
        }
        Ok((outcomes, added))
    }

    /// Writes the group's batch and flushes it to the OS (the sync is the sync thread's).
    fn write(&mut self, batch: fjall::Batch) -> Result<(), OutboxError> {
        if self.poisoned() {
            // Something failed while the group was decided: write none of it.
            return Err(OutboxError::Poisoned);
        }
        if batch.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self.shared.faults.take_write() {
            // A failure before any byte reached the journal: nothing to poison.
            return Err(OutboxError::Io(std::io::Error::other(
                "injected write failure",
            )));
        }
        if let Err(e) = batch.commit() {
            // fjall poisons itself when a journal flush fails; we do the same for any error
            // because we cannot know how much of the batch reached the file.
            let e = OutboxError::from(e);
            self.poison("write", &e);
            return Err(e);
        }
        self.shared.unsynced.store(true, Ordering::Release);
        Ok(())
    }
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
                for (seq, d) in added {
                    queue.insert(seq, d);
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
                if queue.remove(seq).is_some() {
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
                for (seq, d) in added {
                    queue.insert(seq, d);
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

fn fail_msg(msg: Msg, err: impl Fn() -> OutboxError, stop: &mut Option<Stop>) {
    let _ = match msg {
        Msg::Append { reply, .. } => reply.send(Err(err())).map_err(drop),
        Msg::Delivered { reply, .. }
        | Msg::DeadLetter { reply, .. }
        | Msg::PersistBatch { reply, .. }
        | Msg::CompleteBatch { reply, .. }
        | Msg::ForgetBatch { reply, .. } => reply.send(Err(err())).map_err(drop),
        Msg::Replay { reply, .. } => reply.send(Err(err())).map_err(drop),
        Msg::Close { reply } => {
            *stop = Some(Stop::Close(reply));
            Ok(())
        }
        #[cfg(test)]
        Msg::Crash { reply } => {
            *stop = Some(Stop::Crash(reply));
            Ok(())
        }
    };
}
