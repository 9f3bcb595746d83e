//! The outbox forwarder: drains durable records to Credyt, exactly once.
//!
//! Contract: it takes leased batches from the outbox, sends each record with bounded
//! concurrency, and marks a record delivered only after Credyt confirmed it (a 2xx; a replayed
//! `transaction_id` answers the original 201, which is success). Retryable failures (network,
//! 408, 409, 429, 5xx) give the record back and back off with jitter, honouring `Retry-After`;
//! while Credyt keeps failing the circuit breaker opens and only one probe goes out per
//! cooldown, so an outage costs a bounded trickle of requests, not a flood. Permanent failures
//! (other 4xx) go to the dead-letter store with the upstream answer. On start it resumes: every
//! undelivered record is still in the outbox.
//!
//! Coalescing (`coalesce_window`): the forwarder lets records accumulate for the window, then
//! sends the charges of one (account, customer, asset) as one charge whose metadata lists the
//! events. A batch's membership is made durable before its first send and the batch is only
//! ever re-sent with exactly that membership under the same id (UUIDv5 of its members'
//! transaction ids), also after a crash; a record in an open batch is never sent any other way.
//! A batch Credyt refuses for good is dissolved and its records go out one by one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::{AccountId, CustomerId, Debit, Delivery, TRANSACTION_NAMESPACE};
use crate::outbox::{Outbox, Pending};

use super::breaker::{Breaker, Permit};
use super::forward::Backoff;
use super::{CredytClient, UpstreamError};

/// Tuning of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// Sends in flight at once (a coalesced batch counts as one).
    pub concurrency: usize,
    /// Consecutive failed rounds that open the breaker.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub breaker_max_cooldown: Duration,
    pub backoff: Backoff,
    /// `Some(window)`: coalesce charges per (account, customer, asset) over the window.
    pub coalesce_window: Option<Duration>,
    /// Most records in one coalesced charge.
    pub max_batch_members: usize,
}

impl Default for ForwarderSettings {
    fn default() -> Self {
        ForwarderSettings {
            concurrency: 64,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            breaker_max_cooldown: Duration::from_secs(30),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            coalesce_window: None,
            max_batch_members: 100,
        }
    }
}

/// One send: a single record, or a coalesced batch of charges.
enum Unit {
    Single(Box<Pending>),
    Batch { id: Uuid, members: Vec<Pending> },
}

enum Sent {
    Delivered(Unit),
    Retry(Unit, UpstreamError),
    Dead(Unit, UpstreamError),
}

async fn send(client: &CredytClient, unit: Unit) -> Sent {
    let result = match &unit {
        Unit::Single(p) => match &p.delivery {
            Delivery::Charge(debit) => client.charge(debit).await,
            Delivery::Usage(usage) => client.send_usage(&[usage]).await,
        },
        // A batch of one (see `Forwarder::persist`) is a plain charge under the record's own
        // transaction id.
        Unit::Batch { members, .. } if members.len() == 1 => match &members[0].delivery {
            Delivery::Charge(debit) => client.charge(debit).await,
            Delivery::Usage(usage) => client.send_usage(&[usage]).await,
        },
        Unit::Batch { id, members } => {
            let debits: Vec<&Debit> = members
                .iter()
                .filter_map(|p| match &p.delivery {
                    Delivery::Charge(d) => Some(d),
                    Delivery::Usage(_) => None,
                })
                .collect();
            client.charge_coalesced(*id, &debits).await
        }
    };
    match result {
        Ok(()) => Sent::Delivered(unit),
        Err(e) if e.is_retryable() => Sent::Retry(unit, e),
        Err(e) => Sent::Dead(unit, e),
    }
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
        // Open batches first, exactly as persisted.
        let open: Vec<(Uuid, Vec<u64>)> =
            self.open.iter().map(|(id, m)| (*id, m.clone())).collect();
        for (id, members) in open {
            if units.len() >= limit {
                break;
            }
            let leased = self.outbox.lease(&members);
            if leased.len() == members.len() {
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
                    Some(id) => units.push(Unit::Batch { id, members: chunk }),
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
                Delivery::Usage(_) => None,
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

    async fn dead(&mut self, unit: Unit, e: UpstreamError, retry: &mut Vec<u64>) {
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
        tracing::error!(seq = p.seq, class = e.class(), status = ?e.status(), "credyt refused a record permanently, dead-lettering it");
        let (status, body) = match &e {
            UpstreamError::Status { status, body, .. } => {
                (Some(status.as_u16()), Some(body.clone()))
            }
            _ => (None, None),
        };
        if let Err(err) = self
            .outbox
            .dead_letter(p.seq, e.to_string(), status, body)
            .await
        {
            tracing::error!(seq = p.seq, error = %err, "cannot dead-letter a record; it stays pending");
            retry.push(p.seq);
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

async fn pause(stop: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.changed() => {}
    }
}

/// Runs until `stop` turns true, then returns after in-flight sends settled.
pub async fn run(
    outbox: Outbox,
    client: CredytClient,
    settings: ForwarderSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut breaker = Breaker::new(
        settings.breaker_threshold,
        settings.breaker_cooldown,
        settings.breaker_max_cooldown,
    );
    let mut f = Forwarder {
        outbox: outbox.clone(),
        settings: settings.clone(),
        open: HashMap::new(),
        in_open: HashSet::new(),
        alone: HashSet::new(),
    };
    f.recover();
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let limit = match breaker.permit(Instant::now()) {
            Permit::All => settings.concurrency,
            Permit::Probe => 1,
            Permit::WaitUntil(t) => {
                pause(&mut stop, t.saturating_duration_since(Instant::now())).await;
                continue;
            }
        };
        if outbox.depth() == 0 {
            tokio::select! {
                _ = outbox.wait_pending() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        if let Some(window) = settings.coalesce_window {
            // Let a window's worth of fees accumulate so they go out together.
            pause(&mut stop, window).await;
        }
        let units = f.next_units(limit).await;
        if units.is_empty() {
            pause(&mut stop, Duration::from_millis(50)).await;
            continue;
        }
        let client_ref = &client;
        let mut in_flight: FuturesUnordered<_> =
            units.into_iter().map(|u| send(client_ref, u)).collect();
        let mut results = Vec::new();
        while let Some(sent) = in_flight.next().await {
            results.push(sent);
        }
        drop(in_flight);
        let (mut done, mut retry) = (Vec::new(), Vec::new());
        let mut any_delivered = false;
        let mut longest_retry_after: Option<Duration> = None;
        for sent in results {
            match sent {
                Sent::Delivered(unit) => {
                    any_delivered = true;
                    f.delivered(unit, &mut done).await;
                }
                Sent::Retry(unit, e) => {
                    tracing::debug!(class = e.class(), "delivery failed, will retry");
                    longest_retry_after = longest_retry_after.max(e.retry_after());
                    match unit {
                        Unit::Single(p) => retry.push(p.seq),
                        Unit::Batch { members, .. } => retry.extend(seqs(&members)),
                    }
                }
                Sent::Dead(unit, e) => {
                    any_delivered = true; // Credyt answered: it is up.
                    f.dead(unit, e, &mut retry).await;
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = outbox.mark_delivered(&done).await {
                // Harmless for money: the ids are deterministic, a resend is a no-op at Credyt.
                tracing::warn!(error = %e, "cannot record deliveries; they may be sent again");
                outbox.release(&done);
            }
        }
        if retry.is_empty() {
            breaker.on_success();
            failures_in_a_row = 0;
            continue;
        }
        outbox.release(&retry);
        if any_delivered {
            // Credyt is up; retry the rest after the requested wait, if any.
            breaker.on_success();
            failures_in_a_row = 0;
            if let Some(wait) = longest_retry_after {
                pause(&mut stop, wait).await;
            }
        } else {
            breaker.on_failure(Instant::now(), longest_retry_after);
            let wait = settings
                .backoff
                .delay(failures_in_a_row, longest_retry_after);
            failures_in_a_row = failures_in_a_row.saturating_add(1);
            pause(&mut stop, wait).await;
        }
    }
}

/// A running forwarder task and the switch that stops it.
pub struct ForwarderHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ForwarderHandle {
    pub fn spawn(outbox: Outbox, client: CredytClient, settings: ForwarderSettings) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(outbox, client, settings, rx));
        ForwarderHandle { stop, task }
    }

    /// Stops taking new batches and waits (up to `grace`) for in-flight sends.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}
