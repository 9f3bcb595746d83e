//! Balance gating: usage an end user's prepaid wallet cannot pay for is refused before it is
//! accepted, in the same hop that prices it.
//!
//! # Contract
//!
//! - A tenant with `gate = { mode = "balance" }` in the tenants file ([`GatePolicy`]) has each
//!   priced event judged before the durable append: the event is allowed only if, for every
//!   asset it is charged in, `available − required ≥ min_available`, where `required` is the
//!   sum of its fees in that asset and `available` is Credyt's available balance of the end
//!   user's `default:<ASSET>` wallet account, less every debit of that customer and asset the
//!   proxy accepted and Credyt has not confirmed yet (outbox records waiting, in a retry or a
//!   coalescing window, or in flight), less the reservations of requests being judged at the
//!   same moment.
//! - **Atomic per (account, customer).** Judging an event and reserving its debits happen
//!   under one lock of that customer's entry, so concurrent requests can never both spend the
//!   last credit. A reservation is keyed by the debit's `transaction_id`: an event whose
//!   debits are all already held (a resend while the first is pending) reserves nothing again.
//! - **Reservations end exactly once** ([`Reservation`]): an accepted event's debits stay
//!   held until the forwarder reports that Credyt confirmed them ([`Gate::settled`], which
//!   also takes the amount off the cached balance, since that balance was read before the
//!   charge) or refused them for good (a dead letter, which moved no money). A duplicate
//!   releases its hold; a failed append, a refused request or a dropped request releases all.
//!   With `ack = "upstream"` the answer comes after Credyt confirmed, so the hold is settled
//!   as charged at once.
//! - **Every race errs on the side of refusing.** A charge Credyt confirms while its balance
//!   is being read is taken off that read too (it may already be in it); a record whose
//!   delivered mark was lost in a crash is held again at start until Credyt confirms it
//!   again. None of these can let an end user overdraw through one proxy.
//! - **The cached balance** ([`Gate`]'s entries): read with `GET /customers/{id}/wallet` on a
//!   miss, used for `balance.ttl`, read once for all concurrent requests of one customer
//!   (single flight; a reader dropped mid-read hands the read to the next waiter). A failed
//!   read is remembered for `balance.unknown_ttl`, and meanwhile `on_unknown` decides: `deny`
//!   refuses the request with 503 `balance_unavailable`, `allow` accepts without judging (its
//!   debits are still held). A customer Credyt does not know has nothing available.
//! - **Freshness**: a relayed webhook naming the customer and a wallet adjustment made through
//!   the gateway mark the cached balance stale ([`Gate::invalidate`]): the next request reads it.
//!   A read in flight when that happens lands stale, so it cannot hide the change.
//! - No I/O besides that read; nothing here runs for a tenant without `gate` (the pipeline
//!   does not call in), and [`Gate::settled`] costs one atomic load while no customer is
//!   tracked.
//! - Entries of customers with nothing held and no recent use are dropped by [`Gate::sweep`].
//!
//! What gating cannot see: debits accepted by *another* replica (each replica holds only its
//! own) and charges made around the proxy. With `r` replicas sharing a wallet, one end user
//! can overdraw by at most what the other `r − 1` replicas accept within one balance
//! read's lifetime (`balance.ttl`) plus their confirmation lag; docs/api.md states it for
//! operators.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rust_decimal::Decimal;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::BalanceSettings;
use crate::domain::{AccountId, CustomerId, Debit};
use crate::telemetry::metrics::{BalanceLookup, BalanceMetrics};
use crate::upstream::{CredytClient, UpstreamError};

/// The wallet account name charges debit (Credyt's default; the proxy's charges name none).
const DEFAULT_ACCOUNT: &str = "default";

/// Entries are spread over this many locks.
const SHARDS: usize = 64;

/// A tenant's gating, from its tenants-file entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatePolicy {
    /// The least an event may leave available (per asset). May be negative: an overdraft
    /// allowance.
    pub min_available: Decimal,
    pub on_unknown: OnUnknown,
}

/// What a gated request gets while Credyt's balance cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknown {
    /// 503 `balance_unavailable`: nothing accepted.
    Deny,
    /// Accepted without judging (the debits are still held, for when the balance is known).
    Allow,
}

impl OnUnknown {
    fn as_str(self) -> &'static str {
        match self {
            OnUnknown::Deny => "deny",
            OnUnknown::Allow => "allow",
        }
    }
}

/// Why gating could not judge.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("the end user's balance could not be read from credyt")]
    Unknown(#[source] Arc<UpstreamError>),
}

/// One debit an event would make.
#[derive(Debug, Clone)]
pub struct Charge {
    pub transaction_id: Uuid,
    pub asset: Arc<str>,
    pub amount: Decimal,
}

impl Charge {
    pub fn of(debit: &Debit) -> Charge {
        Charge {
            transaction_id: debit.transaction_id,
            asset: debit.fee.asset.clone(),
            amount: debit.fee.amount,
        }
    }
}

/// The asset an event fell short in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub asset: Arc<str>,
    /// What was available for it (after everything held before it).
    pub available: Decimal,
    /// What it needed in that asset.
    pub required: Decimal,
    pub min_available: Decimal,
    /// Credyt's balance alone would have covered it: only the debits the proxy holds (a
    /// reservation conflict) do not.
    pub reserved: bool,
}

/// One event's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; its debits are held by the judgement's reservation (or already were).
    Allowed,
    Refused(Shortfall),
}

/// The verdicts of one request's events (in order) and the hold on the allowed ones.
#[derive(Debug)]
pub struct Judgement {
    pub verdicts: Vec<Verdict>,
    pub reservation: Reservation,
}

/// Per asset, for [`Gate::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub asset: Arc<str>,
    /// What is available now for that asset: Credyt's balance less what the proxy holds.
    pub available: Decimal,
    pub required: Decimal,
    pub allowed: bool,
}

type Key = (AccountId, CustomerId);

/// Credyt's balances of one customer, as read.
#[derive(Debug)]
struct Snapshot {
    read_at: Instant,
    /// Marked by [`Gate::invalidate`]: read again before the next judgement.
    stale: bool,
    /// The available balance of each `default` wallet account, by asset.
    available: Assets,
}

/// Small per-asset amounts (a customer has a handful of assets at most).
#[derive(Debug, Default, Clone)]
struct Assets(Vec<(Arc<str>, Decimal)>);

impl Assets {
    fn get(&self, asset: &str) -> Decimal {
        self.0
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(asset))
            .map_or(Decimal::ZERO, |(_, v)| *v)
    }

    fn add(&mut self, asset: &Arc<str>, delta: Decimal) {
        match self
            .0
            .iter_mut()
            .find(|(a, _)| a.eq_ignore_ascii_case(asset))
        {
            Some((_, v)) => *v += delta,
            None => self.0.push((asset.clone(), delta)),
        }
    }
}

/// One customer's state.
#[derive(Debug)]
struct Entry {
    credyt: Option<Snapshot>,
    /// A read in flight: its waiters are woken when it lands (or is abandoned).
    reading: Option<Arc<Notify>>,
    /// While a read is in flight: charges Credyt confirmed meanwhile (the read may or may
    /// not include them: it lands with them taken off).
    charged_while_reading: Assets,
    invalidated_while_reading: bool,
    /// The last read failed: until then, the balance is unknown.
    unknown: Option<(Instant, Arc<UpstreamError>)>,
    /// Debits held: accepted (or being accepted) and not confirmed by Credyt yet.
    held: HashMap<Uuid, (Arc<str>, Decimal), foldhash::fast::RandomState>,
    held_sum: Assets,
    used: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            credyt: None,
            reading: None,
            charged_while_reading: Assets::default(),
            invalidated_while_reading: false,
            unknown: None,
            held: HashMap::default(),
            held_sum: Assets::default(),
            used: now,
        }
    }

    /// Credyt's balance less what is held.
    fn available(&self, asset: &str) -> Decimal {
        let credyt = self
            .credyt
            .as_ref()
            .map_or(Decimal::ZERO, |s| s.available.get(asset));
        credyt - self.held_sum.get(asset)
    }

    fn hold(&mut self, charge: &Charge) -> bool {
        if self.held.contains_key(&charge.transaction_id) {
            return false;
        }
        self.held
            .insert(charge.transaction_id, (charge.asset.clone(), charge.amount));
        self.held_sum.add(&charge.asset, charge.amount);
        true
    }

    fn release(&mut self, transaction_id: &Uuid) -> Option<(Arc<str>, Decimal)> {
        let (asset, amount) = self.held.remove(transaction_id)?;
        self.held_sum.add(&asset, -amount);
        Some((asset, amount))
    }

    /// A held debit's amount turned out to be `amount` (zero: it was dropped).
    fn rehold(&mut self, transaction_id: &Uuid, amount: Decimal) {
        let Some(held) = self.held.get_mut(transaction_id) else {
            return;
        };
        let (asset, old) = (held.0.clone(), held.1);
        if amount.is_zero() {
            self.release(transaction_id);
            return;
        }
        held.1 = amount;
        self.held_sum.add(&asset, amount - old);
    }

    /// Credyt confirmed a charge: it is in Credyt's balance now, not in the one read before.
    fn charged(&mut self, asset: &Arc<str>, amount: Decimal) {
        if let Some(s) = &mut self.credyt {
            s.available.add(asset, -amount);
        }
        if self.reading.is_some() {
            self.charged_while_reading.add(asset, amount);
        }
    }
}

/// What a lookup found.
enum Step {
    Known(BalanceLookup),
    Unknown(Arc<UpstreamError>),
    Wait(std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>),
    Read(Arc<Notify>),
}

/// The gate: every gated customer's cached balance and held debits (module docs).
pub struct Gate {
    client: CredytClient,
    settings: BalanceSettings,
    shards: Box<[Mutex<HashMap<Key, Entry>>]>,
    hasher: foldhash::fast::RandomState,
    /// Entries over all shards (the forwarder's reports skip every lock while none exist).
    entries: AtomicUsize,
    metrics: BalanceMetrics,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("entries", &self.entries.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(client: CredytClient, settings: BalanceSettings, metrics: BalanceMetrics) -> Gate {
        Gate {
            client,
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            entries: AtomicUsize::new(0),
            metrics,
        }
    }

    pub fn metrics(&self) -> &BalanceMetrics {
        &self.metrics
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Entry>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Runs `f` on the customer's entry, created if missing.
    fn with_entry<T>(&self, key: &Key, f: impl FnOnce(&mut Entry) -> T) -> T {
        let now = Instant::now();
        let mut shard = self.shard(key).lock();
        let entry = shard.entry(key.clone()).or_insert_with(|| {
            self.entries.fetch_add(1, Ordering::Relaxed);
            Entry::new(now)
        });
        entry.used = now;
        f(entry)
    }

    /// Makes sure the customer's balance is known and fresh (reading it if needed, once for
    /// all concurrent callers); the error of a failed read otherwise.
    async fn fresh(&self, key: &Key) -> Result<BalanceLookup, Arc<UpstreamError>> {
        let mut waited = false;
        loop {
            let now = Instant::now();
            let step = self.with_entry(key, |e| {
                if let Some(s) = &e.credyt {
                    if !s.stale && now.duration_since(s.read_at) < self.settings.ttl {
                        return Step::Known(if waited {
                            BalanceLookup::Miss
                        } else {
                            BalanceLookup::Hit
                        });
                    }
                }
                if let Some((until, err)) = &e.unknown {
                    if now < *until {
                        return Step::Unknown(err.clone());
                    }
                }
                match &e.reading {
                    Some(n) => Step::Wait(Box::pin(Arc::clone(n).notified_owned())),
                    None => {
                        let n = Arc::new(Notify::new());
                        e.reading = Some(Arc::clone(&n));
                        e.charged_while_reading = Assets::default();
                        e.invalidated_while_reading = false;
                        Step::Read(n)
                    }
                }
            });
            match step {
                Step::Known(lookup) => return Ok(lookup),
                Step::Unknown(err) => return Err(err),
                Step::Wait(notified) => {
                    waited = true;
                    notified.await;
                }
                Step::Read(notify) => {
                    let read = Read {
                        gate: self,
                        key,
                        notify,
                        landed: false,
                    };
                    let result = self.client.wallet(&key.0, &key.1).await;
                    read.land(result);
                    waited = true;
                }
            }
        }
    }

    /// Judges a request's events (each as the debits it would make) for `policy`, holding
    /// the debits of the allowed ones. `Err` only when the balance is unknown and the policy
    /// says `deny`.
    pub async fn judge(
        self: &Arc<Self>,
        policy: &GatePolicy,
        account: &AccountId,
        customer: &CustomerId,
        events: &[Vec<Charge>],
    ) -> Result<Judgement, GateError> {
        let key = (account.clone(), customer.clone());
        let known = match self.fresh(&key).await {
            Ok(lookup) => {
                self.metrics.lookup(lookup);
                true
            }
            Err(err) => {
                self.metrics.lookup(BalanceLookup::Error);
                self.metrics.unknown(policy.on_unknown.as_str());
                match policy.on_unknown {
                    OnUnknown::Deny => return Err(GateError::Unknown(err)),
                    OnUnknown::Allow => false,
                }
            }
        };
        let mut reservation = Reservation {
            gate: Some(Arc::clone(self)),
            key: key.clone(),
            events: Vec::with_capacity(events.len()),
            rated_fees: Vec::new(),
        };
        let mut verdicts = Vec::with_capacity(events.len());
        self.with_entry(&key, |e| {
            for charges in events {
                let new: Vec<&Charge> = charges
                    .iter()
                    .filter(|c| !c.amount.is_zero() && !e.held.contains_key(&c.transaction_id))
                    .collect();
                let mut required = Assets::default();
                for c in &new {
                    required.add(&c.asset, c.amount);
                }
                let shortfall = known
                    .then(|| {
                        required.0.iter().find_map(|(asset, need)| {
                            let available = e.available(asset);
                            let credyt = e
                                .credyt
                                .as_ref()
                                .map_or(Decimal::ZERO, |c| c.available.get(asset));
                            (available - need < policy.min_available).then(|| Shortfall {
                                asset: asset.clone(),
                                available,
                                required: *need,
                                min_available: policy.min_available,
                                reserved: credyt - need >= policy.min_available,
                            })
                        })
                    })
                    .flatten();
                match shortfall {
                    Some(s) => {
                        reservation.events.push(Vec::new());
                        verdicts.push(Verdict::Refused(s));
                    }
                    None => {
                        let held = new
                            .into_iter()
                            .filter(|c| e.hold(c))
                            .map(|c| c.transaction_id)
                            .collect();
                        reservation.events.push(held);
                        verdicts.push(Verdict::Allowed);
                    }
                }
            }
        });
        Ok(Judgement {
            verdicts,
            reservation,
        })
    }

    /// What an event needing `required` (per asset) would get now, holding nothing.
    pub async fn check(
        &self,
        policy: &GatePolicy,
        account: &AccountId,
        customer: &CustomerId,
        required: &[(Arc<str>, Decimal)],
    ) -> Result<Vec<CheckLine>, GateError> {
        let key = (account.clone(), customer.clone());
        match self.fresh(&key).await {
            Ok(lookup) => self.metrics.lookup(lookup),
            Err(err) => {
                self.metrics.lookup(BalanceLookup::Error);
                return Err(GateError::Unknown(err));
            }
        }
        let mut needs = Assets::default();
        for (asset, amount) in required {
            needs.add(asset, *amount);
        }
        Ok(self.with_entry(&key, |e| {
            needs
                .0
                .iter()
                .map(|(asset, need)| {
                    let available = e.available(asset);
                    CheckLine {
                        asset: asset.clone(),
                        available,
                        required: *need,
                        allowed: available - need >= policy.min_available,
                    }
                })
                .collect()
        }))
    }

    /// Holds a debit accepted earlier (an outbox record found pending at start).
    pub fn track(&self, debit: &Debit) {
        let key = (debit.account.clone(), debit.customer.clone());
        self.with_entry(&key, |e| e.hold(&Charge::of(debit)));
    }

    /// The forwarder's report on a debit: `charged` (Credyt confirmed it) or not (a dead
    /// letter: refused for good, no money moved). Ends its hold; a charge is also taken off
    /// the cached balance.
    pub fn settled(&self, debit: &Debit, charged: bool) {
        if self.entries.load(Ordering::Relaxed) == 0 {
            return;
        }
        let key = (debit.account.clone(), debit.customer.clone());
        let mut shard = self.shard(&key).lock();
        if let Some(e) = shard.get_mut(&key) {
            e.release(&debit.transaction_id);
            if charged {
                e.charged(&debit.fee.asset, debit.fee.amount);
            }
        }
    }

    /// The customer's balance changed outside the proxy's view (a webhook named it, a wallet
    /// adjustment went through the gateway): read it again before the next judgement.
    pub fn invalidate(&self, account: &AccountId, customer: &CustomerId) {
        if self.entries.load(Ordering::Relaxed) == 0 {
            return;
        }
        let key = (account.clone(), customer.clone());
        let mut shard = self.shard(&key).lock();
        if let Some(e) = shard.get_mut(&key) {
            if let Some(s) = &mut e.credyt {
                s.stale = true;
            }
            e.unknown = None;
            if e.reading.is_some() {
                e.invalidated_while_reading = true;
            }
        }
    }

    /// Drops the entries of customers with nothing held, no read in flight and no use for
    /// twice the balance's time to live (their cached balance has expired anyway).
    pub fn sweep(&self) {
        let now = Instant::now();
        let idle = self.settings.ttl.saturating_mul(2);
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, e| {
                !e.held.is_empty() || e.reading.is_some() || now.duration_since(e.used) < idle
            });
            let removed = before - shard.len();
            if removed > 0 {
                self.entries.fetch_sub(removed, Ordering::Relaxed);
            }
        }
    }

    /// Sweeps every `balance.ttl` (at least every second) while the gate lives.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gate = Arc::downgrade(self);
        let every = self.settings.ttl.max(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match gate.upgrade() {
                    Some(g) => g.sweep(),
                    None => return,
                }
            }
        })
    }

    /// Debits held now for the customer, by asset (tests and diagnostics).
    pub fn held(&self, account: &AccountId, customer: &CustomerId, asset: &str) -> Decimal {
        let key = (account.clone(), customer.clone());
        self.shard(&key)
            .lock()
            .get(&key)
            .map_or(Decimal::ZERO, |e| e.held_sum.get(asset))
    }
}

/// A read of Credyt's balance in flight; lands its result, or, dropped unlanded (the reader's
/// request went away), lets the next waiter read.
struct Read<'a> {
    gate: &'a Gate,
    key: &'a Key,
    notify: Arc<Notify>,
    landed: bool,
}

impl Read<'_> {
    fn land(mut self, result: Result<Vec<crate::upstream::wire::WalletAccount>, UpstreamError>) {
        let now = Instant::now();
        let unknown_ttl = self.gate.settings.unknown_ttl;
        let notify = Arc::clone(&self.notify);
        self.gate.with_entry(self.key, |e| {
            if e
                .reading
                .as_ref()
                .is_some_and(|n| Arc::ptr_eq(n, &notify))
            {
                e.reading = None;
            }
            let charged = std::mem::take(&mut e.charged_while_reading);
            match result {
                Ok(accounts) => {
                    let mut available = Assets::default();
                    for a in accounts
                        .into_iter()
                        .filter(|a| a.name.eq_ignore_ascii_case(DEFAULT_ACCOUNT))
                    {
                        available.add(&Arc::from(a.asset.as_str()), a.available);
                    }
                    for (asset, amount) in &charged.0 {
                        available.add(asset, -*amount);
                    }
                    e.credyt = Some(Snapshot {
                        read_at: now,
                        stale: e.invalidated_while_reading,
                        available,
                    });
                    e.unknown = None;
                }
                Err(err) => {
                    tracing::warn!(class = err.class(), status = ?err.status(), "cannot read an end user's balance from credyt");
                    e.unknown = Some((now + unknown_ttl, Arc::new(err)));
                }
            }
            e.invalidated_while_reading = false;
        });
        self.landed = true;
        self.notify.notify_waiters();
    }
}

impl Drop for Read<'_> {
    fn drop(&mut self) {
        if self.landed {
            return;
        }
        let notify = Arc::clone(&self.notify);
        self.gate.with_entry(self.key, |e| {
            if e.reading.as_ref().is_some_and(|n| Arc::ptr_eq(n, &notify)) {
                e.reading = None;
                e.charged_while_reading = Assets::default();
                e.invalidated_while_reading = false;
            }
        });
        self.notify.notify_waiters();
    }
}

/// The debits one request holds, per event in the order of the events handed to the sink.
/// Dropped, it releases every hold it still has.
#[derive(Debug)]
pub struct Reservation {
    gate: Option<Arc<Gate>>,
    key: Key,
    events: Vec<Vec<Uuid>>,
    /// Per event: (fee index, transaction id) of the charges whose amount the outbox sets
    /// when it accepts the event (period-tiered prices); empty when there are none.
    rated_fees: Vec<Vec<(usize, Uuid)>>,
}

impl Reservation {
    /// Keeps the holds of the events for which `keep` is true (in order), releasing the
    /// others': what remains lines up with the events handed to the sink.
    /// Per event (in the order judged): (fee index, transaction id) of its charges whose
    /// amount the sink's answer will carry (see [`Reservation::settle`]).
    pub fn set_rated_fees(&mut self, rated_fees: Vec<Vec<(usize, Uuid)>>) {
        self.rated_fees = rated_fees;
    }

    pub fn retain(&mut self, keep: &[bool]) {
        if !self.rated_fees.is_empty() {
            let mut i = 0;
            self.rated_fees.retain(|_| {
                let k = keep.get(i).copied().unwrap_or(false);
                i += 1;
                k
            });
        }
        let mut released = Vec::new();
        let mut i = 0;
        self.events.retain_mut(|held| {
            let k = keep.get(i).copied().unwrap_or(false);
            i += 1;
            if !k {
                released.append(held);
            }
            k
        });
        self.release(&released);
    }

    /// Settles the holds with the sink's answers, one per event in order: `Some(rated)` for a
    /// new event, with the amounts the sink set (fee index, amount; see
    /// [`Reservation::set_rated_fees`]), `None` for a duplicate. A new event keeps its hold
    /// (at the rated amount; a charge rated to zero was dropped) until the forwarder reports
    /// on it, or, `charged_now`, Credyt confirmed it already: the hold ends as a charge. A
    /// duplicate releases it.
    pub fn settle(
        mut self,
        outcomes: impl Iterator<Item = Option<Vec<(usize, Decimal)>>>,
        charged_now: bool,
    ) {
        let Some(gate) = self.gate.take() else {
            return;
        };
        let events = std::mem::take(&mut self.events);
        let rated_fees = std::mem::take(&mut self.rated_fees);
        let mut shard = gate.shard(&self.key).lock();
        let Some(e) = shard.get_mut(&self.key) else {
            return;
        };
        let mut outcomes = outcomes.fuse();
        for (i, held) in events.iter().enumerate() {
            match (outcomes.next().flatten(), charged_now) {
                // Held until the forwarder reports on it (it may have already).
                (Some(rated), false) => {
                    for (fee, amount) in rated {
                        let id = rated_fees
                            .get(i)
                            .and_then(|f| f.iter().find(|(index, _)| *index == fee));
                        if let Some((_, id)) = id {
                            e.rehold(id, amount);
                        }
                    }
                }
                (Some(_), true) => {
                    for id in held {
                        if let Some((asset, amount)) = e.release(id) {
                            e.charged(&asset, amount);
                        }
                    }
                }
                (None, _) => {
                    for id in held {
                        e.release(id);
                    }
                }
            }
        }
    }

    fn release(&self, ids: &[Uuid]) {
        let Some(gate) = &self.gate else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let mut shard = gate.shard(&self.key).lock();
        if let Some(e) = shard.get_mut(&self.key) {
            for id in ids {
                e.release(id);
            }
        }
    }
}

impl Drop for Reservation {
    /// Unsettled (the request failed or went away): releases every hold, and marks the cached
    /// balance stale, since with `ack = "upstream"` some of its charges may have reached
    /// Credyt unconfirmed.
    fn drop(&mut self) {
        let ids: Vec<Uuid> = std::mem::take(&mut self.events).concat();
        if ids.is_empty() {
            return;
        }
        self.release(&ids);
        if let Some(gate) = &self.gate {
            gate.invalidate(&self.key.0, &self.key.1);
        }
    }
}

#[cfg(test)]
mod tests;
