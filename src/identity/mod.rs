//! Identity: tenant authentication and the mapping tenant -> connected account and
//! (account, end user) -> Credyt customer, through cached lookups.
//!
//! Contract:
//! - [`tenants`] authenticates a presented key against the hot-reloaded tenants file.
//! - [`Identity`] resolves the tenant's connected account (explicit `acc_...` or looked up by
//!   `external_id`) and the end user's customer (`GET /customers?external_id=`, following its
//!   303; optionally created on first sight). A `cust_...` id sent directly is accepted only if
//!   that customer is found *in the tenant's account* (Credyt partitions accounts, so a foreign
//!   id answers 404 there). Results are cached in moka with a TTL; "not found" is cached too,
//!   for a shorter time; many concurrent misses of one key make exactly one upstream lookup.
//! - The account sent upstream in `X-CREDYT-ACCOUNT` comes only from here.
//! - A hit is a memory lookup. Only misses do I/O, and their upstream errors are returned, never
//!   cached.

pub mod tenants;

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use crate::config::IdentitySettings;
use crate::domain::{AccountId, CustomerId, TenantId};
use crate::upstream::{CredytClient, UpstreamError};

pub use tenants::{AccountRef, ForwardMode, Tenant, TenantTable, Tenants};

/// Why an identity could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no connected account with external id `{0}`")]
    UnknownAccount(String),
    #[error("unknown customer `{0}`")]
    UnknownCustomer(String),
    #[error("identity lookup failed: {0}")]
    Upstream(#[source] Arc<UpstreamError>),
}

impl IdentityError {
    pub fn code(&self) -> &'static str {
        match self {
            IdentityError::UnknownAccount(_) => "account_not_found",
            IdentityError::UnknownCustomer(_) => "customer_not_found",
            IdentityError::Upstream(_) => "upstream_unavailable",
        }
    }
}

/// Positive entries live `ttl`, negative ones (`None`) `negative_ttl`.
struct TtlPolicy {
    ttl: Duration,
    negative_ttl: Duration,
}

impl<K, V> Expiry<K, Option<V>> for TtlPolicy {
    fn expire_after_create(&self, _: &K, value: &Option<V>, _: Instant) -> Option<Duration> {
        Some(if value.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        })
    }
}

type CustomerKey = (AccountId, Arc<str>);

/// Cached identity resolution.
pub struct Identity {
    client: CredytClient,
    accounts: Cache<TenantId, Option<AccountId>>,
    customers: Cache<CustomerKey, Option<CustomerId>>,
    owned: Cache<(AccountId, CustomerId), Option<()>>,
}

impl Identity {
    pub fn new(client: CredytClient, settings: &IdentitySettings) -> Identity {
        let policy = || TtlPolicy {
            ttl: settings.ttl,
            negative_ttl: settings.negative_ttl,
        };
        Identity {
            client,
            accounts: Cache::builder()
                .max_capacity(100_000)
                .expire_after(policy())
                .build(),
            customers: Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(policy())
                .build(),
            owned: Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(policy())
                .build(),
        }
    }

    /// The tenant's connected account.
    pub async fn account(&self, tenant: &Tenant) -> Result<AccountId, IdentityError> {
        let external = match &tenant.account {
            AccountRef::Id(id) => return Ok(id.clone()),
            AccountRef::ExternalId(e) => e,
        };
        let found = self
            .accounts
            .try_get_with_by_ref(&tenant.id, async {
                self.client.find_account(external).await
            })
            .await
            .map_err(IdentityError::Upstream)?;
        found.ok_or_else(|| IdentityError::UnknownAccount(external.clone()))
    }

    /// The customer of end user `external_id` in `account`, created if `create` and missing.
    pub async fn customer_by_external_id(
        &self,
        account: &AccountId,
        external_id: &str,
        create: bool,
    ) -> Result<CustomerId, IdentityError> {
        let key: CustomerKey = (account.clone(), Arc::from(external_id));
        let found = self
            .customers
            .try_get_with(key, async {
                let found = match self.client.find_customer(account, external_id).await? {
                    Some(id) => Some(id),
                    None if create => {
                        Some(self.client.create_customer(account, external_id).await?)
                    }
                    None => None,
                };
                // Learned on the miss only: a hit must stay a read (a moka insert per request
                // was ~6% of the request path's CPU in the load-test profile).
                if let Some(id) = &found {
                    self.owned
                        .insert((account.clone(), id.clone()), Some(()))
                        .await;
                }
                Ok(found)
            })
            .await
            .map_err(IdentityError::Upstream)?;
        found.ok_or_else(|| IdentityError::UnknownCustomer(external_id.to_string()))
    }

    /// `customer` itself, if it exists in `account` (never a customer of another account).
    pub async fn check_customer(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<CustomerId, IdentityError> {
        let key = (account.clone(), customer.clone());
        let found = self
            .owned
            .try_get_with(key, async {
                self.client
                    .customer_exists(account, customer)
                    .await
                    .map(|owned| owned.then_some(()))
            })
            .await
            .map_err(IdentityError::Upstream)?;
        match found {
            Some(()) => Ok(customer.clone()),
            None => Err(IdentityError::UnknownCustomer(customer.to_string())),
        }
    }

    /// Number of cached end-user mappings (for metrics and the memory benchmark).
    pub async fn cached_customers(&self) -> u64 {
        self.customers.run_pending_tasks().await;
        self.customers.entry_count()
    }
}
