//! The outbox forwarder: drains durable records to Credyt, exactly once, as a continuous
//! pipeline.
//!
//! Contract:
//! - **A window that refills as calls complete.** Up to `limit` calls are in flight; each one
//!   that completes frees its slot for the next record at once, so a slow call costs one slot,
//!   never the pipeline, and encoding and bookkeeping overlap with waiting. The limit adapts
//!   (AIMD, see [`super::concurrency`]) within `[concurrency_min, concurrency_max]`.
//! - A record is marked delivered only after Credyt confirmed it (a 2xx; a replayed
//!   `transaction_id` answers the original 201, which is success). Delivered marks are written
//!   by a task of their own, batched, so they never hold the window up.
//! - **Retries per record.** A transient failure (network, timeout, 408, 429, 5xx) gives the
//!   record its own timer: jittered exponential backoff that honours its `Retry-After` (seconds
//!   or HTTP-date), while the other records keep flowing. A 429 lowers the concurrency; it does
//!   not stop the world. While Credyt keeps failing (transport errors and 5xx in a row) the
//!   circuit breaker opens and only one probe goes out per cooldown, so an outage costs a
//!   bounded trickle of requests. A record that keeps failing transiently for `max_age` after
//!   it was accepted (and was tried at least [`MIN_ATTEMPTS`] times by this process) becomes a
//!   dead letter `retries_exhausted`.
//! - **Permanent answers** (400, 404, 409, 422) dead-letter the record at once with the upstream
//!   answer (`refused`, or `conflict` for a 409: the `transaction_id` was used with another
//!   body, which retrying cannot fix).
//! - **A refused platform key** (401/403) is never a reason to give a record up: the record
//!   waits, delivery pauses while the key is checked (see [`super::credentials`]) and stays
//!   paused while Credyt refuses it; every record stays pending. A record refused again after
//!   the check it caused found the key valid is refused for its account, and retries like a
//!   transient failure.
//! - **Traces** (when on): each call is a client span carrying its `traceparent` and linked to
//!   the tenant request of every record it delivers (the link is read from the record, so it
//!   survives a restart; a coalesced charge links to every request it carries).
//! - On start it resumes: every undelivered record is still in the outbox. On stop it sends
//!   nothing new and returns once the calls in flight have settled.
//!
//! Coalescing (`coalesce_window`): the forwarder takes new records from the outbox at most once
//! per window, and sends the charges of one (account, customer, asset) as one charge whose
//! metadata lists the events. A batch's membership is made durable before its first send and
//! the batch is only ever re-sent with exactly that membership under the same id (UUIDv5 of its
//! members' transaction ids), also after a crash; a record in an open batch is never sent any
//! other way. A batch Credyt refuses for good is dissolved and its records go out one by one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::domain::{AccountId, CustomerId, Debit, Delivery, TRANSACTION_NAMESPACE};
use crate::outbox::{DeadCode, Outbox, Pending};

use super::breaker::{Breaker, BreakerState, Permit};
use super::concurrency::{Concurrency, Signal};
use super::credentials::{Credentials, KeyState, KeyStatus};
use super::forward::Backoff;
use super::{CredytClient, UpstreamError};

/// Records leased from the outbox at once at the least (they wait in `ready` for a slot).
const LEASE_MIN: usize = 32;

/// Attempts this process makes of a record before `max_age` can turn it into a dead letter
/// (a replayed dead letter, or a record found at start, gets a few tries of its own).
pub const MIN_ATTEMPTS: u32 = 3;

/// Tuning of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// Bounds of the calls in flight at once (a coalesced batch counts as one); equal bounds
    /// fix the concurrency.
    pub concurrency_min: usize,
    pub concurrency_max: usize,
    /// Consecutive failed calls (transport errors, 5xx) that open the breaker.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub breaker_max_cooldown: Duration,
    pub backoff: Backoff,
    /// How long after its acceptance a record may keep failing transiently.
    pub max_age: Duration,
    /// `Some(window)`: coalesce charges per (account, customer, asset) over the window.
    pub coalesce_window: Option<Duration>,
    /// Most records in one coalesced charge.
    pub max_batch_members: usize,
    /// Balance gating, told of each debit Credyt confirmed or refused for good (see
    /// [`crate::balance::Gate::settled`]).
    pub gate: Option<Arc<crate::balance::Gate>>,
}

impl Default for ForwarderSettings {
    fn default() -> Self {
        ForwarderSettings {
            concurrency_min: 16,
            concurrency_max: 1024,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            breaker_max_cooldown: Duration::from_secs(30),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            max_age: Duration::from_secs(72 * 3600),
            coalesce_window: None,
            max_batch_members: 100,
            gate: None,
        }
    }
}

impl ForwarderSettings {
    /// A fixed concurrency.
    pub fn fixed(concurrency: usize) -> Self {
        ForwarderSettings {
            concurrency_min: concurrency,
            concurrency_max: concurrency,
            ..ForwarderSettings::default()
        }
    }
}

/// What the forwarder is doing, for metrics (written by the forwarder, read by scrapes).
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// The concurrency limit in force.
    pub limit: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// Records waiting for their retry timer.
    pub waiting: AtomicUsize,
    /// Calls that delivered (a coalesced batch is one).
    pub delivered: AtomicU64,
    /// Transient failures, each followed by a retry of its record.
    pub retries: AtomicU64,
    /// Records dead-lettered, by [`DeadCode`]: refused, conflict, retries_exhausted.
    pub dead: [AtomicU64; 3],
    /// 0 closed, 1 open, 2 half-open.
    pub breaker: AtomicUsize,
}

impl ForwarderStats {
    fn count_dead(&self, code: DeadCode) {
        let i = match code {
            // A webhook reaching this forwarder is refused (see `UpstreamError::NotCredyt`).
            DeadCode::Refused | DeadCode::Unroutable => 0,
            DeadCode::Conflict => 1,
            DeadCode::RetriesExhausted => 2,
        };
        self.dead[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One send: a single record, or a coalesced batch of charges.
enum Unit {
    Single(Box<Pending>),
    Batch { id: Uuid, members: Vec<Pending> },
}

impl Unit {
    /// When the oldest record in it was accepted.
    fn accepted_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Unit::Single(p) => Some(p.delivery.accepted_at()),
            Unit::Batch { members, .. } => members.iter().map(|p| p.delivery.accepted_at()).min(),
        }
    }

    fn seqs(&self) -> Vec<u64> {
        match self {
            Unit::Single(p) => vec![p.seq],
            Unit::Batch { members, .. } => seqs(members),
        }
    }
}

/// One call to Credyt for `unit`.
async fn call(client: &CredytClient, unit: &Unit) -> Result<(), UpstreamError> {
    match unit {
        Unit::Single(p) => match &p.delivery {
            Delivery::Charge(debit) => client.charge(debit).await,
            Delivery::Usage(usage) => client.send_usage(&[usage]).await,
            Delivery::Webhook(_) => Err(UpstreamError::NotCredyt),
        },
        // A batch of one (see `Forwarder::persist`) is a plain charge under the record's own
        // transaction id.
        Unit::Batch { members, .. } if members.len() == 1 => match &members[0].delivery {
            Delivery::Charge(debit) => client.charge(debit).await,
            Delivery::Usage(usage) => client.send_usage(&[usage]).await,
            Delivery::Webhook(_) => Err(UpstreamError::NotCredyt),
        },
        Unit::Batch { id, members } => {
            let debits: Vec<&Debit> = members
                .iter()
                .filter_map(|p| match &p.delivery {
                    Delivery::Charge(d) => Some(d),
                    Delivery::Usage(_) | Delivery::Webhook(_) => None,
                })
                .collect();
            client.charge_coalesced(*id, &debits).await
        }
    }
}

/// Calls `f` with each charge `unit` carries.
fn for_each_debit(unit: &Unit, mut f: impl FnMut(&Debit)) {
    let members = match unit {
        Unit::Single(p) => std::slice::from_ref(p.as_ref()),
        Unit::Batch { members, .. } => members.as_slice(),
    };
    for p in members {
        if let Delivery::Charge(d) = &p.delivery {
            f(d);
        }
    }
}

/// A unit and what the pipeline knows about its delivery so far.
struct Job {
    unit: Unit,
    /// Attempts of this unit before the next call.
    attempts: u32,
    /// Set when a 401/403 of this unit made the forwarder check the key: the number of the
    /// check that answers it. A unit refused again once that check found the key valid is
    /// refused for its account, not for the key, and is not worth another check.
    key_check: Option<u64>,
}

impl Job {
    fn new(unit: Unit, attempts: u32) -> Job {
        Job {
            unit,
            attempts,
            key_check: None,
        }
    }
}

/// A settled call.
struct Done {
    job: Job,
    latency: Duration,
    result: Result<(), UpstreamError>,
}

type InFlight = Pin<Box<dyn Future<Output = Done> + Send>>;

fn send(client: CredytClient, job: Job) -> InFlight {
    Box::pin(async move {
        let started = Instant::now();
        let result = call(&client, &job.unit).await;
        Done {
            job,
            latency: started.elapsed(),
            result,
        }
    })
}

/// The id of a coalesced charge: a function of its members only.
pub fn batch_id(members: &[&Debit]) -> Uuid {
    let mut ids: Vec<Uuid> = members.iter().map(|d| d.transaction_id).collect();
    ids.sort_unstable();
    let mut name = Vec::with_capacity(ids.len() * 16 + 9);
    name.extend_from_slice(b"coalesced");
    for id in ids {
        name.extend_from_slice(id.as_bytes());
    }
    Uuid::new_v5(&TRANSACTION_NAMESPACE, &name)
}

fn seqs(members: &[Pending]) -> Vec<u64> {
    members.iter().map(|p| p.seq).collect()
}

struct Forwarder {
    outbox: Outbox,
    settings: ForwarderSettings,
    /// Persisted, not yet completed batches (membership is on disk too).
    open: HashMap<Uuid, Vec<u64>>,
    in_open: HashSet<u64>,
    /// Records already pending when this process started and not in a persisted batch: an
    /// earlier process (perhaps running without coalescing) may have sent them alone under
    /// their own transaction ids, so they are only ever sent alone (as batches of one).
    alone: HashSet<u64>,
    /// Open batches handed to the pipeline (in flight, waiting for a retry, or about to be
    /// sent): never leased again, dissolved or sent twice meanwhile.
    sending: HashSet<Uuid>,
}

impl Forwarder {
    /// Recovers batches persisted before a crash, to re-send them as they were.
    fn recover(&mut self) {
        match self.outbox.persisted_batches() {
            Ok(batches) => {
                for (id, members) in batches {
                    self.in_open.extend(members.iter().copied());
                    self.open.insert(id, members);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read coalesced batches; their records wait")
            }
        }
        if self.settings.coalesce_window.is_some() {
            let backlog = self.outbox.next_batch(usize::MAX);
            let seqs = seqs(&backlog);
            self.alone = seqs
                .iter()
                .copied()
                .filter(|s| !self.in_open.contains(s))
                .collect();
            self.outbox.release(&seqs);
        }
    }

    /// The units to send this round, at most `limit`.
    async fn next_units(&mut self, limit: usize) -> Vec<Unit> {
        let mut units = Vec::new();
        // Open batches first, exactly as persisted (those not already in the pipeline).
        let waiting: Vec<Uuid> = self
            .open
            .keys()
            .filter(|id| !self.sending.contains(id))
            .take(limit)
            .copied()
            .collect();
        for id in waiting {
            let Some(members) = self.open.get(&id).cloned() else {
                continue;
            };
            let leased = self.outbox.lease(&members);
            if leased.len() == members.len() {
                self.sending.insert(id);
                units.push(Unit::Batch {
                    id,
                    members: leased,
                });
            } else {
                // Some members are gone (delivered or dead-lettered out of band): the batch can
                // never be re-sent whole; dissolve it.
                self.dissolve(id, &leased).await;
                self.outbox.release(&seqs(&leased));
            }
        }
        if units.len() >= limit {
            return units;
        }
        let take = match self.settings.coalesce_window {
            Some(_) => (limit - units.len()) * self.settings.max_batch_members,
            None => limit - units.len(),
        };
        let batch = self.outbox.next_batch(take);
        let mut skipped = Vec::new();
        let mut groups: BTreeMap<(AccountId, CustomerId, std::sync::Arc<str>), Vec<Pending>> =
            BTreeMap::new();
        let mut alone = Vec::new();
        for p in batch {
            if self.in_open.contains(&p.seq) {
                // Belongs to an open batch whose other members are leased elsewhere: wait.
                skipped.push(p.seq);
                continue;
            }
            match (&p.delivery, self.settings.coalesce_window) {
                (Delivery::Charge(_), Some(_)) if self.alone.contains(&p.seq) => {
                    alone.push(p);
                }
                (Delivery::Charge(d), Some(_)) => {
                    let key = (d.account.clone(), d.customer.clone(), d.fee.asset.clone());
                    groups.entry(key).or_default().push(p);
                }
                _ => units.push(Unit::Single(Box::new(p))),
            }
        }
        self.outbox.release(&skipped);
        for p in alone {
            match self.persist(std::slice::from_ref(&p)).await {
                Some(id) => {
                    self.alone.remove(&p.seq);
                    self.sending.insert(id);
                    units.push(Unit::Batch {
                        id,
                        members: vec![p],
                    });
                }
                None => self.outbox.release(&[p.seq]),
            }
        }
        for (_, group) in groups {
            for chunk in chunk_owned(group, self.settings.max_batch_members) {
                // A record alone in its window is persisted as a batch of one as well: once
                // it went out under its own transaction id, a crash before its delivered mark
                // must not let the next process coalesce it into a batch under another id
                // (Credyt would charge it twice).
                match self.persist(&chunk).await {
                    Some(id) => {
                        self.sending.insert(id);
                        units.push(Unit::Batch { id, members: chunk })
                    }
                    None => self.outbox.release(&seqs(&chunk)),
                }
            }
        }
        units
    }

    /// Makes the membership of `chunk` durable before its first send; its id, or `None` (the
    /// records are not sent this round) when that write failed.
    async fn persist(&mut self, chunk: &[Pending]) -> Option<Uuid> {
        let debits: Vec<&Debit> = chunk
            .iter()
            .filter_map(|p| match &p.delivery {
                Delivery::Charge(d) => Some(d),
                Delivery::Usage(_) | Delivery::Webhook(_) => None,
            })
            .collect();
        let id = batch_id(&debits);
        let members = seqs(chunk);
        match self.outbox.persist_batch(id, &members).await {
            Ok(()) => {
                self.in_open.extend(members.iter().copied());
                self.open.insert(id, members);
                Some(id)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot persist a coalesced batch; sending later");
                None
            }
        }
    }

    /// Replaces an open batch by one persisted batch of one per record in `left` (its members
    /// still pending): from now on each goes out alone under its own transaction id, also
    /// after a crash. If a write fails, the records stay unbatched; none of them was sent
    /// alone yet, so grouping them again later is safe.
    async fn dissolve(&mut self, id: Uuid, left: &[Pending]) {
        if let Err(e) = self.outbox.forget_batch(id).await {
            tracing::warn!(error = %e, "cannot dissolve a coalesced batch; retrying later");
            return;
        }
        if let Some(members) = self.open.remove(&id) {
            for s in &members {
                self.in_open.remove(s);
            }
        }
        for p in left {
            self.persist(std::slice::from_ref(p)).await;
        }
    }

    async fn delivered(&mut self, unit: Unit, done: &mut Vec<u64>) {
        if let Unit::Batch { id, .. } = &unit {
            self.sending.remove(id);
        }
        match unit {
            Unit::Single(p) => done.push(p.seq),
            Unit::Batch { id, members } => match self.outbox.complete_batch(id).await {
                Ok(()) => {
                    self.open.remove(&id);
                    for p in &members {
                        self.in_open.remove(&p.seq);
                    }
                }
                Err(e) => {
                    // Harmless for money: re-sending the same batch id is a no-op at Credyt.
                    tracing::warn!(error = %e, "cannot record a delivered batch; it may be sent again");
                    self.outbox.release(&seqs(&members));
                }
            },
        }
    }

    /// Dead-letters the record of `unit` with `code`; a coalesced batch is dissolved instead
    /// and its records (pushed to `retry`) go out one by one.
    async fn dead(&mut self, unit: Unit, code: DeadCode, e: UpstreamError, retry: &mut Vec<u64>) {
        if let Unit::Batch { id, .. } = &unit {
            self.sending.remove(id);
        }
        let p = match unit {
            Unit::Batch { id, members } if members.len() > 1 => {
                tracing::warn!(class = e.class(), status = ?e.status(), members = members.len(), "credyt refused a coalesced charge; sending its records one by one");
                self.dissolve(id, &members).await;
                retry.extend(seqs(&members));
                return;
            }
            // A batch of one is its record: forget the batch (the refused charge moved no
            // money) and dead-letter the record.
            Unit::Batch { id, mut members } => {
                self.open.remove(&id);
                self.in_open.remove(&members[0].seq);
                if let Err(err) = self.outbox.forget_batch(id).await {
                    tracing::warn!(error = %err, "cannot forget a refused batch of one");
                }
                Box::new(members.remove(0))
            }
            Unit::Single(p) => p,
        };
        tracing::error!(seq = p.seq, code = code.as_str(), class = e.class(), status = ?e.status(), "dead-lettering a record");
        let (status, body) = match &e {
            UpstreamError::Status { status, body, .. } => {
                (Some(status.as_u16()), Some(body.clone()))
            }
            _ => (None, None),
        };
        match self
            .outbox
            .dead_letter(p.seq, code, e.to_string(), status, body)
            .await
        {
            Ok(()) => {
                if let (Some(gate), Delivery::Charge(debit)) = (&self.settings.gate, &p.delivery) {
                    gate.settled(debit, false);
                }
            }
            Err(err) => {
                tracing::error!(seq = p.seq, error = %err, "cannot dead-letter a record; it stays pending");
                retry.push(p.seq);
            }
        }
    }
}

fn chunk_owned(mut items: Vec<Pending>, size: usize) -> Vec<Vec<Pending>> {
    let mut out = Vec::new();
    while items.len() > size {
        let rest = items.split_off(size);
        out.push(items);
        items = rest;
    }
    if !items.is_empty() {
        out.push(items);
    }
    out
}

/// Records waiting for their retry timer, kept leased (no one else sends them meanwhile).
#[derive(Default)]
struct Retries {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    units: HashMap<u64, Job>,
    next_id: u64,
}

impl Retries {
    fn push(&mut self, at: Instant, job: Job) {
        let id = self.next_id;
        self.next_id += 1;
        self.due.push(Reverse((at, id)));
        self.units.insert(id, job);
    }

    fn pop_due(&mut self, now: Instant) -> Option<Job> {
        let Reverse((at, id)) = *self.due.peek()?;
        if at > now {
            return None;
        }
        self.due.pop();
        self.units.remove(&id)
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    fn len(&self) -> usize {
        self.units.len()
    }

    fn drain(&mut self) -> impl Iterator<Item = Unit> + '_ {
        self.due.clear();
        self.units.drain().map(|(_, job)| job.unit)
    }
}

/// How long the first delivered mark waits for others to share its write. A mark only frees
/// memory (the record stays leased meanwhile), so batching costs nothing but this much of it;
/// one write per delivery was a log frame and a wake-up of the commit thread per charge.
const MARK_BATCH_WAIT: Duration = Duration::from_millis(10);
/// Most delivered marks in one write.
const MARK_BATCH_MAX: usize = 8192;

/// Writes delivered marks in batches, off the pipeline; a failed write gives the records back
/// (a resend is a no-op at Credyt: the ids are deterministic).
async fn mark_delivered(outbox: Outbox, mut rx: mpsc::UnboundedReceiver<u64>) {
    let mut seqs = Vec::new();
    while let Some(first) = rx.recv().await {
        seqs.push(first);
        let deadline = tokio::time::Instant::now() + MARK_BATCH_WAIT;
        while seqs.len() < MARK_BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(seq)) => seqs.push(seq),
                // The pipeline is gone (write what is here, then end) or the wait is over.
                Ok(None) | Err(_) => break,
            }
        }
        if let Err(e) = outbox.mark_delivered(&seqs).await {
            tracing::warn!(error = %e, "cannot record deliveries; they may be sent again");
            outbox.release(&seqs);
        }
        seqs.clear();
    }
}

/// The pipeline's state.
struct Pipeline {
    f: Forwarder,
    client: CredytClient,
    credentials: Arc<Credentials>,
    key: watch::Receiver<KeyState>,
    /// Sends paused until the key check with this number has completed.
    paused_until_check: Option<u64>,
    stats: Arc<ForwarderStats>,
    concurrency: Concurrency,
    breaker: Breaker,
    in_flight: FuturesUnordered<InFlight>,
    retries: Retries,
    /// Units taken from the outbox, not sent yet.
    ready: VecDeque<Job>,
    /// With coalescing: not before this instant is the outbox read again.
    next_refill: Instant,
    delivered: mpsc::UnboundedSender<u64>,
}

impl Pipeline {
    /// Whether the key lets us send now.
    fn key_allows(&mut self) -> bool {
        let state = *self.key.borrow();
        if state.status == KeyStatus::Refused {
            return false;
        }
        match self.paused_until_check {
            Some(check) if state.checks < check => false,
            _ => {
                self.paused_until_check = None;
                true
            }
        }
    }

    /// The next unit to send: a due retry, then what was taken from the outbox, then more
    /// from the outbox.
    async fn next_job(&mut self, now: Instant) -> Option<Job> {
        if let Some(due) = self.retries.pop_due(now) {
            return Some(due);
        }
        if let Some(ready) = self.ready.pop_front() {
            return Some(ready);
        }
        if self.f.settings.coalesce_window.is_some() && now < self.next_refill {
            return None;
        }
        // Lease a few more than the free slots: one trip to the queue's lock per many records.
        let want = self
            .concurrency
            .limit()
            .saturating_sub(self.in_flight.len())
            .clamp(LEASE_MIN, 256);
        let units = self.f.next_units(want).await;
        if let Some(window) = self.f.settings.coalesce_window {
            self.next_refill = now + window;
        }
        self.ready.extend(units.into_iter().map(|u| {
            let attempts = match &u {
                Unit::Single(p) => p.attempts,
                Unit::Batch { .. } => 0,
            };
            Job::new(u, attempts)
        }));
        self.ready.pop_front()
    }

    /// Fills the window.
    async fn dispatch(&mut self) {
        if !self.key_allows() {
            return;
        }
        while self.in_flight.len() < self.concurrency.limit() {
            let now = Instant::now();
            if matches!(self.breaker.state(now), BreakerState::Open) {
                return;
            }
            let Some(job) = self.next_job(now).await else {
                return;
            };
            let probe = match self.breaker.permit(now) {
                Permit::All => false,
                Permit::Probe => true,
                Permit::WaitUntil(_) => {
                    self.ready.push_front(job);
                    return;
                }
            };
            self.in_flight.push(send(self.client.clone(), job));
            self.concurrency.on_dispatch(self.in_flight.len());
            if probe {
                return;
            }
        }
    }

    /// When the loop must look again even if nothing else happens.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(1);
        if let Some(at) = self.retries.next_due() {
            wake = wake.min(at);
        }
        if let (BreakerState::Open, Some(at)) = (self.breaker.state(now), self.breaker.open_until())
        {
            wake = wake.min(at);
        }
        if self.f.settings.coalesce_window.is_some() {
            wake = wake.min(self.next_refill);
        }
        wake.max(now + Duration::from_millis(1))
    }

    /// Whether new records in the outbox would be taken now.
    fn wants_new_work(&self) -> bool {
        self.ready.is_empty()
            && self.in_flight.len() < self.concurrency.limit()
            && self.f.settings.coalesce_window.is_none()
    }

    async fn settle(&mut self, done: Done) {
        let now = Instant::now();
        let Done {
            mut job,
            latency,
            result,
        } = done;
        let e = match result {
            Ok(()) => {
                self.concurrency.on_response(now, latency, Signal::Answered);
                self.breaker.on_success();
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if let Some(gate) = &self.f.settings.gate {
                    for_each_debit(&job.unit, |d| gate.settled(d, true));
                }
                match job.unit {
                    Unit::Single(p) => {
                        // The receiver lives as long as the pipeline.
                        let _ = self.delivered.send(p.seq);
                    }
                    batch => self.f.delivered(batch, &mut Vec::new()).await,
                }
                return;
            }
            Err(e) => e,
        };
        let signal = if e.is_backpressure() {
            Signal::Backpressure
        } else {
            Signal::Answered
        };
        self.concurrency.on_response(now, latency, signal);
        if e.is_outage() {
            self.breaker.on_failure(now, e.retry_after());
        } else {
            // Credyt answered: it is up.
            self.breaker.on_success();
        }
        if e.is_auth_refused() {
            let key = *self.key.borrow();
            let answered_valid = job
                .key_check
                .is_some_and(|check| key.checks >= check && key.status == KeyStatus::Valid);
            if !answered_valid {
                // Hold everything until the key is checked (or, refused, until it works);
                // this record goes first after.
                if job.key_check.is_none() {
                    tracing::warn!(status = ?e.status(), "credyt refused a charge's credentials; checking the platform key");
                }
                let check = key.checks + 1;
                job.key_check = Some(check);
                self.retries.push(now, job);
                if self.paused_until_check.is_none() {
                    self.paused_until_check = Some(check);
                    self.credentials.suspect();
                }
                return;
            }
            // The key works: Credyt refuses this account (e.g. not connected to the platform
            // yet). Retry like a transient failure, up to the maximum age.
        } else if !e.is_retryable() {
            let code = if e.status() == Some(reqwest::StatusCode::CONFLICT) {
                DeadCode::Conflict
            } else {
                DeadCode::Refused
            };
            self.give_up(job.unit, code, e).await;
            return;
        }
        self.retry_later(now, job, e).await;
    }

    /// Schedules the unit's next attempt, or dead-letters it once it is too old.
    async fn retry_later(&mut self, now: Instant, mut job: Job, e: UpstreamError) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        job.attempts = job.attempts.saturating_add(1);
        let attempts = job.attempts;
        let too_old = job.unit.accepted_at().is_some_and(|at| {
            Utc::now()
                .signed_duration_since(at)
                .to_std()
                .is_ok_and(|age| age >= self.f.settings.max_age)
        });
        if too_old && attempts >= MIN_ATTEMPTS {
            self.give_up(job.unit, DeadCode::RetriesExhausted, e).await;
            return;
        }
        tracing::debug!(class = e.class(), attempts, "delivery failed, will retry");
        let wait = self
            .f
            .settings
            .backoff
            .delay(attempts.saturating_sub(1), e.retry_after());
        self.retries.push(now + wait, job);
    }

    async fn give_up(&mut self, unit: Unit, code: DeadCode, e: UpstreamError) {
        if let Unit::Single(_) = unit {
            self.stats.count_dead(code);
        } else if let Unit::Batch { members, .. } = &unit {
            if members.len() == 1 {
                self.stats.count_dead(code);
            }
        }
        let mut retry = Vec::new();
        self.f.dead(unit, code, e, &mut retry).await;
        self.f.outbox.release(&retry);
    }

    fn publish(&self) {
        let s = &self.stats;
        s.limit.store(self.concurrency.limit(), Ordering::Relaxed);
        s.in_flight.store(self.in_flight.len(), Ordering::Relaxed);
        s.waiting.store(self.retries.len(), Ordering::Relaxed);
        let breaker = match self.breaker.state(Instant::now()) {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        s.breaker.store(breaker, Ordering::Relaxed);
    }

    async fn run(&mut self, stop: &mut watch::Receiver<bool>) {
        let outbox = self.f.outbox.clone();
        loop {
            let stopping = *stop.borrow();
            if stopping && self.in_flight.is_empty() {
                break;
            }
            if !stopping {
                self.dispatch().await;
            }
            self.publish();
            let wake = self.next_wake(Instant::now());
            let wants_new_work = !stopping && self.wants_new_work();
            tokio::select! {
                done = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if let Some(done) = done {
                        self.settle(done).await;
                    }
                }
                _ = outbox.wait_pending(), if wants_new_work => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = stop.changed(), if !stopping => {}
                _ = self.key.changed() => {}
            }
        }
        // Leases die with the process anyway; give them back for a forwarder started again on
        // this outbox in the same process.
        let mut left: Vec<u64> = self.retries.drain().flat_map(|u| u.seqs()).collect();
        left.extend(self.ready.drain(..).flat_map(|job| job.unit.seqs()));
        self.f.outbox.release(&left);
        self.publish();
    }
}

/// Runs until `stop` turns true, then returns after in-flight sends settled and their
/// delivered marks were written.
pub async fn run(
    outbox: Outbox,
    client: CredytClient,
    settings: ForwarderSettings,
    credentials: Arc<Credentials>,
    stats: Arc<ForwarderStats>,
    mut stop: watch::Receiver<bool>,
) {
    let now = Instant::now();
    let breaker = Breaker::new(
        settings.breaker_threshold,
        settings.breaker_cooldown,
        settings.breaker_max_cooldown,
    );
    let concurrency = Concurrency::new(settings.concurrency_min, settings.concurrency_max, 32, now);
    let mut f = Forwarder {
        outbox: outbox.clone(),
        settings,
        open: HashMap::new(),
        in_open: HashSet::new(),
        alone: HashSet::new(),
        sending: HashSet::new(),
    };
    f.recover();
    let (delivered, rx) = mpsc::unbounded_channel();
    let marker = tokio::spawn(mark_delivered(outbox, rx));
    let mut pipeline = Pipeline {
        f,
        client,
        key: credentials.subscribe(),
        credentials,
        paused_until_check: None,
        stats,
        concurrency,
        breaker,
        in_flight: FuturesUnordered::new(),
        retries: Retries::default(),
        ready: VecDeque::new(),
        next_refill: now,
        delivered,
    };
    pipeline.run(&mut stop).await;
    drop(pipeline);
    let _ = marker.await;
}

/// A running forwarder task and the switch that stops it.
pub struct ForwarderHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ForwarderStats>,
}

impl ForwarderHandle {
    /// Starts the forwarder; under `traces` (an application's trace dispatch), each call to
    /// Credyt is a client span linked to the tenant requests of its records.
    pub fn spawn(
        outbox: Outbox,
        client: CredytClient,
        settings: ForwarderSettings,
        credentials: Arc<Credentials>,
        traces: Option<tracing::Dispatch>,
    ) -> Self {
        use tracing::instrument::WithSubscriber;
        let (stop, rx) = watch::channel(false);
        let stats = Arc::new(ForwarderStats::default());
        let forwarder = run(
            outbox,
            client,
            settings,
            credentials,
            Arc::clone(&stats),
            rx,
        );
        let task = match traces {
            Some(dispatch) => tokio::spawn(forwarder.with_subscriber(dispatch)),
            None => tokio::spawn(forwarder),
        };
        ForwarderHandle { stop, task, stats }
    }

    pub fn stats(&self) -> &Arc<ForwarderStats> {
        &self.stats
    }

    /// Stops taking new records and waits (up to `grace`) for in-flight sends.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}
