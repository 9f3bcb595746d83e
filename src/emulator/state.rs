//! In-memory Credyt state: platforms (one per configured API key), their connected accounts,
//! and one fully separate partition of data per account (the platform's own account included).
//!
//! Contract:
//! - Each partition has its own `parking_lot::Mutex`; a request locks exactly one partition for
//!   a few microseconds and never across an `.await`, so tenants never contend with each other.
//! - Wallet movements (charges, adjustments) are idempotent on `transaction_id` per partition:
//!   a replay returns the original result and moves nothing, whatever the new payload.
//! - Balances are exact `Decimal`s; overdraft is allowed.
//! - A movement that takes a wallet account's `available` from >= threshold to < threshold
//!   reports a [`ThresholdHit`] for the caller to deliver once the lock is released.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::ids::new_id;
use super::webhooks::Destination;
use super::wire::{Metadata, MovementResponse};

/// One platform: the owner of an API key.
pub(crate) struct Platform {
    pub own: Arc<Partition>,
    pub org_id: String,
    pub data: Mutex<PlatformData>,
}

#[derive(Default)]
pub(crate) struct PlatformData {
    /// Connected account ids, oldest first (the listing order).
    pub connected: Vec<String>,
    pub by_external: HashMap<String, String>,
    pub webhooks: Vec<Destination>,
}

/// One account's data partition.
pub(crate) struct Partition {
    pub id: String,
    pub platform_account_id: String,
    pub connected: bool,
    pub name: String,
    pub external_id: Option<String>,
    pub metadata: Option<Metadata>,
    pub created_at: DateTime<Utc>,
    pub data: Mutex<PartitionData>,
}

#[derive(Default)]
pub(crate) struct PartitionData {
    pub customers: Vec<Customer>,
    pub by_id: HashMap<String, usize>,
    pub by_external: HashMap<String, usize>,
    pub transactions: HashMap<String, Transaction>,
    pub events: HashMap<String, StoredEvent>,
    /// Event ids in submission order (listing is newest first).
    pub event_order: Vec<String>,
}

pub(crate) struct Customer {
    pub id: String,
    pub external_id: Option<String>,
    pub name: String,
    pub email: Option<String>,
    pub metadata: Option<Metadata>,
    pub created_at: DateTime<Utc>,
    /// Per-customer `balance_threshold_hit` threshold; `None` falls back to the default.
    pub threshold: Option<Decimal>,
    pub wallet: Vec<WalletAccount>,
}

pub(crate) struct WalletAccount {
    /// As first written (matching is case-insensitive).
    pub name: String,
    /// Upper-case asset code.
    pub asset: String,
    pub available: Decimal,
    pub charge_count: u64,
    pub charge_total: Decimal,
    pub adjustment_count: u64,
    pub adjustment_total: Decimal,
}

impl WalletAccount {
    pub fn id(&self) -> String {
        format!("{}:{}", self.name, self.asset)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MovementKind {
    Adjustment,
    Charge,
}

pub(crate) struct Transaction {
    pub id: String,
    pub kind: MovementKind,
    pub customer_id: String,
    pub account_id: String,
    pub asset: String,
    pub amount: Decimal,
    pub description: Option<String>,
    pub metadata: Option<Metadata>,
    pub created_at: DateTime<Utc>,
}

pub(crate) struct StoredEvent {
    pub customer_id: String,
    pub created_at: DateTime<Utc>,
    /// The event object as sent (numbers kept exact by `arbitrary_precision`).
    pub body: Map<String, Value>,
}

/// A validated wallet movement.
pub(crate) struct Movement {
    pub kind: MovementKind,
    pub transaction_id: String,
    pub account_name: String,
    pub asset: String,
    /// Signed change to `available`: negative for charges and debit adjustments.
    pub delta: Decimal,
    /// The amount as recorded on the transaction (charges: the positive amount charged).
    pub amount: Decimal,
    pub description: Option<String>,
    pub metadata: Option<Metadata>,
}

/// A downward threshold crossing, to be delivered as `balance_threshold_hit`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ThresholdHit {
    pub account: String,
    pub connected: bool,
    pub customer_id: String,
    pub account_id: String,
    pub available: Decimal,
    pub threshold: Decimal,
}

/// Whether a balance change from `before` to `after` crosses `threshold` downwards: fired once
/// per crossing, not again while the balance stays below.
pub(crate) fn crosses_below(before: Decimal, after: Decimal, threshold: Decimal) -> bool {
    before >= threshold && after < threshold
}

impl Partition {
    pub fn new(
        id: String,
        platform_account_id: String,
        connected: bool,
        name: String,
        external_id: Option<String>,
        metadata: Option<Metadata>,
    ) -> Self {
        Partition {
            id,
            platform_account_id,
            connected,
            name,
            external_id,
            metadata,
            created_at: Utc::now(),
            data: Mutex::new(PartitionData::default()),
        }
    }
}

/// Fields of a new customer.
pub(crate) struct NewCustomer {
    pub id: Option<String>,
    pub name: String,
    pub external_id: Option<String>,
    pub email: Option<String>,
    pub metadata: Option<Metadata>,
}

impl PartitionData {
    pub fn customer(&self, id: &str) -> Result<&Customer, ApiError> {
        self.by_id
            .get(id)
            .map(|&i| &self.customers[i])
            .ok_or_else(|| customer_not_found(id))
    }

    pub fn customer_mut(&mut self, id: &str) -> Result<&mut Customer, ApiError> {
        match self.by_id.get(id) {
            Some(&i) => Ok(&mut self.customers[i]),
            None => Err(customer_not_found(id)),
        }
    }

    pub fn create_customer(&mut self, new: NewCustomer) -> Result<String, ApiError> {
        if let Some(ext) = &new.external_id {
            if self.by_external.contains_key(ext) {
                return Err(ApiError::Conflict(format!(
                    "A customer with external_id '{ext}' already exists."
                )));
            }
        }
        let id = new.id.unwrap_or_else(|| new_id("cust"));
        if self.by_id.contains_key(&id) {
            return Err(ApiError::Conflict(format!("Customer {id} already exists.")));
        }
        let index = self.customers.len();
        self.by_id.insert(id.clone(), index);
        if let Some(ext) = &new.external_id {
            self.by_external.insert(ext.clone(), index);
        }
        self.customers.push(Customer {
            id: id.clone(),
            external_id: new.external_id,
            name: new.name,
            email: new.email,
            metadata: new.metadata,
            created_at: Utc::now(),
            threshold: None,
            wallet: Vec::new(),
        });
        Ok(id)
    }

    pub fn update_customer(
        &mut self,
        id: &str,
        name: Option<String>,
        external_id: Option<String>,
        email: Option<String>,
    ) -> Result<(), ApiError> {
        let index = *self.by_id.get(id).ok_or_else(|| customer_not_found(id))?;
        if let Some(ext) = &external_id {
            if let Some(&other) = self.by_external.get(ext) {
                if other != index {
                    return Err(ApiError::Conflict(format!(
                        "A customer with external_id '{ext}' already exists."
                    )));
                }
            }
        }
        let customer = &mut self.customers[index];
        if let Some(ext) = external_id {
            if let Some(old) = customer.external_id.replace(ext.clone()) {
                self.by_external.remove(&old);
            }
            self.by_external.insert(ext, index);
        }
        if let Some(name) = name {
            customer.name = name;
        }
        if let Some(email) = email {
            customer.email = Some(email);
        }
        Ok(())
    }

    /// Applies a movement (or replays the original), returning the response and any crossing.
    pub fn apply_movement(
        &mut self,
        account: &Partition,
        customer_id: &str,
        movement: Movement,
        default_threshold: Option<Decimal>,
    ) -> Result<(MovementResponse, Option<ThresholdHit>), ApiError> {
        let index = *self
            .by_id
            .get(customer_id)
            .ok_or_else(|| customer_not_found(customer_id))?;
        if let Some(original) = self.transactions.get(&movement.transaction_id) {
            return Ok((
                MovementResponse {
                    id: original.id.clone(),
                    created_at: original.created_at,
                },
                None,
            ));
        }
        let customer = &mut self.customers[index];
        let threshold = customer.threshold.or(default_threshold);
        let wallet = wallet_account_mut(customer, &movement.account_name, &movement.asset);
        let before = wallet.available;
        wallet.available += movement.delta;
        let after = wallet.available;
        match movement.kind {
            MovementKind::Charge => {
                wallet.charge_count += 1;
                wallet.charge_total += movement.amount;
            }
            MovementKind::Adjustment => {
                wallet.adjustment_count += 1;
                wallet.adjustment_total += movement.amount;
            }
        }
        let account_id = wallet.id();
        let asset = wallet.asset.clone();
        let hit = threshold
            .filter(|&t| crosses_below(before, after, t))
            .map(|t| ThresholdHit {
                account: account.id.clone(),
                connected: account.connected,
                customer_id: customer_id.to_owned(),
                account_id: account_id.clone(),
                available: after,
                threshold: t,
            });
        let created_at = Utc::now();
        self.transactions.insert(
            movement.transaction_id.clone(),
            Transaction {
                id: movement.transaction_id.clone(),
                kind: movement.kind,
                customer_id: customer_id.to_owned(),
                account_id,
                asset,
                amount: movement.amount,
                description: movement.description,
                metadata: movement.metadata,
                created_at,
            },
        );
        Ok((
            MovementResponse {
                id: movement.transaction_id,
                created_at,
            },
            hit,
        ))
    }
}

/// Finds the wallet account `name:asset` (case-insensitively), creating it at zero if missing.
pub(crate) fn wallet_account_mut<'a>(
    customer: &'a mut Customer,
    name: &str,
    asset: &str,
) -> &'a mut WalletAccount {
    let position = customer
        .wallet
        .iter()
        .position(|w| w.name.eq_ignore_ascii_case(name) && w.asset.eq_ignore_ascii_case(asset));
    let index = match position {
        Some(i) => i,
        None => {
            customer.wallet.push(WalletAccount {
                name: name.to_ascii_lowercase(),
                asset: asset.to_ascii_uppercase(),
                available: Decimal::ZERO,
                charge_count: 0,
                charge_total: Decimal::ZERO,
                adjustment_count: 0,
                adjustment_total: Decimal::ZERO,
            });
            customer.wallet.len() - 1
        }
    };
    &mut customer.wallet[index]
}

/// Splits a wallet account id `name:ASSET` (already percent-decoded).
pub(crate) fn parse_wallet_account_id(id: &str) -> Option<(&str, &str)> {
    let (name, asset) = id.split_once(':')?;
    (!name.is_empty() && !asset.is_empty()).then_some((name, asset))
}

pub(crate) fn customer_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Customer {id} was not found."))
}

/// All platforms and partitions.
pub(crate) struct Store {
    pub platforms: HashMap<String, Arc<Platform>>,
    pub partitions: RwLock<HashMap<String, Arc<Partition>>>,
    pub default_threshold: RwLock<Option<Decimal>>,
}

impl Store {
    pub fn new(keys: &[String], default_threshold: Option<Decimal>) -> Self {
        let mut platforms = HashMap::new();
        let mut partitions = HashMap::new();
        for (n, key) in keys.iter().enumerate() {
            if platforms.contains_key(key) {
                continue;
            }
            let id = new_id("acc");
            let own = Arc::new(Partition::new(
                id.clone(),
                id.clone(),
                false,
                format!("Emulated Platform {}", n + 1),
                None,
                None,
            ));
            partitions.insert(id, own.clone());
            platforms.insert(
                key.clone(),
                Arc::new(Platform {
                    own,
                    org_id: new_id("org"),
                    data: Mutex::new(PlatformData::default()),
                }),
            );
        }
        Store {
            platforms,
            partitions: RwLock::new(partitions),
            default_threshold: RwLock::new(default_threshold),
        }
    }

    pub fn platform(&self, key: &str) -> Option<Arc<Platform>> {
        self.platforms.get(key).cloned()
    }

    pub fn partition(&self, id: &str) -> Option<Arc<Partition>> {
        self.partitions.read().get(id).cloned()
    }

    /// Resolves `X-CREDYT-ACCOUNT` for `platform`: its own account when absent.
    pub fn resolve(
        &self,
        platform: &Platform,
        account: Option<&str>,
    ) -> Result<Arc<Partition>, ApiError> {
        let Some(id) = account else {
            return Ok(platform.own.clone());
        };
        match self.partition(id) {
            Some(p) if p.platform_account_id == platform.own.id => Ok(p),
            _ => Err(ApiError::Forbidden(format!(
                "Connected account {id} does not belong to this platform."
            ))),
        }
    }

    pub fn create_account(
        &self,
        platform: &Platform,
        id: Option<String>,
        name: String,
        external_id: Option<String>,
        metadata: Option<Metadata>,
    ) -> Result<Arc<Partition>, ApiError> {
        let id = id.unwrap_or_else(|| new_id("acc"));
        // Lock order: platform data, then the partition map (never the reverse).
        let mut data = platform.data.lock();
        if let Some(ext) = &external_id {
            if data.by_external.contains_key(ext) {
                return Err(ApiError::Conflict(format!(
                    "An account with external_id '{ext}' already exists."
                )));
            }
        }
        let mut partitions = self.partitions.write();
        if partitions.contains_key(&id) {
            return Err(ApiError::Conflict(format!("Account {id} already exists.")));
        }
        let partition = Arc::new(Partition::new(
            id.clone(),
            platform.own.id.clone(),
            true,
            name,
            external_id.clone(),
            metadata,
        ));
        partitions.insert(id.clone(), partition.clone());
        drop(partitions);
        if let Some(ext) = external_id {
            data.by_external.insert(ext, id.clone());
        }
        data.connected.push(id);
        Ok(partition)
    }

    /// Connected accounts of `platform`, oldest first.
    pub fn connected_accounts(&self, platform: &Platform) -> Vec<Arc<Partition>> {
        let ids = platform.data.lock().connected.clone();
        let partitions = self.partitions.read();
        ids.iter()
            .filter_map(|id| partitions.get(id).cloned())
            .collect()
    }

    /// Forgets every account, customer, transaction, event and webhook; platforms stay.
    pub fn reset(&self, default_threshold: Option<Decimal>) {
        let mut partitions = self.partitions.write();
        partitions.clear();
        for platform in self.platforms.values() {
            *platform.data.lock() = PlatformData::default();
            *platform.own.data.lock() = PartitionData::default();
            partitions.insert(platform.own.id.clone(), platform.own.clone());
        }
        *self.default_threshold.write() = default_threshold;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn crossing_fires_only_on_the_way_down_through_the_threshold() {
        assert!(crosses_below(d("5"), d("4.99"), d("5")));
        assert!(crosses_below(d("20"), d("-1"), d("5")));
        assert!(!crosses_below(d("4.99"), d("4"), d("5")), "already below");
        assert!(
            !crosses_below(d("20"), d("5"), d("5")),
            "landing on it is not below"
        );
        assert!(!crosses_below(d("4"), d("6"), d("5")), "upwards");
    }

    fn movement(kind: MovementKind, tx: &str, delta: &str) -> Movement {
        let delta = d(delta);
        Movement {
            kind,
            transaction_id: tx.into(),
            account_name: "default".into(),
            asset: "USD".into(),
            delta,
            amount: if kind == MovementKind::Charge {
                -delta
            } else {
                delta
            },
            description: None,
            metadata: None,
        }
    }

    #[test]
    fn movements_are_idempotent_and_report_one_crossing() {
        let account = Partition::new("acc_x".into(), "acc_p".into(), true, "x".into(), None, None);
        let mut data = PartitionData::default();
        let id = data
            .create_customer(NewCustomer {
                id: None,
                name: "c".into(),
                external_id: Some("e".into()),
                email: None,
                metadata: None,
            })
            .unwrap();
        let t = Some(d("10"));
        let (_, hit) = data
            .apply_movement(
                &account,
                &id,
                movement(MovementKind::Adjustment, "a", "20"),
                t,
            )
            .unwrap();
        assert!(hit.is_none());
        let (_, hit) = data
            .apply_movement(
                &account,
                &id,
                movement(MovementKind::Charge, "c1", "-10.01"),
                t,
            )
            .unwrap();
        let hit = hit.expect("crossing");
        assert_eq!(hit.available, d("9.99"));
        assert_eq!(hit.account_id, "default:USD");
        // Replay: nothing moves, no second hit.
        let (_, hit) = data
            .apply_movement(&account, &id, movement(MovementKind::Charge, "c1", "-5"), t)
            .unwrap();
        assert!(hit.is_none());
        // Still below: no new hit.
        let (_, hit) = data
            .apply_movement(&account, &id, movement(MovementKind::Charge, "c2", "-1"), t)
            .unwrap();
        assert!(hit.is_none());
        let w = &data.customer(&id).unwrap().wallet[0];
        assert_eq!(w.available, d("8.99"));
        assert_eq!(w.charge_count, 2);
        assert_eq!(w.charge_total, d("11.01"));
    }
}
