//! Identity: tenant authentication and the mapping tenant -> connected account and
//! (account, end user) -> Credyt customer, through cached lookups.
//!
//! Contract:
//! - [`tenants`] authenticates a presented key against the hot-reloaded tenants file.
//! - [`onboard`] edits that file for the `credyt-proxy tenant ...` commands (add a tenant,
//!   rotate a key, list); the proxy itself only reads it.
//! - [`Identity`] resolves the tenant's connected account (explicit `acc_...` or looked up by
//!   `external_id`) and the end user's customer (`GET /customers?external_id=`, following its
//!   303; optionally created on first sight). A `cust_...` id sent directly is accepted only if
//!   that customer is found *in the tenant's account* (Credyt partitions accounts, so a foreign
//!   id answers 404 there). Results are cached in moka with a TTL; "not found" is cached too,
//!   for a shorter time; many concurrent misses of one key make exactly one upstream lookup.
//! - Cache keys hold what the answer depends on, so a tenants-file reload takes effect on the
//!   next request without any invalidation: the account is cached per (tenant, account external
//!   id), customers per (resolved account, end user); a tenant moved to another account can
//!   never use a mapping of its old one. A cached "not found" of an end user does not hold back
//!   a lookup that may create it (`create_customers` switched on). Deliveries already accepted
//!   carry their account and are never re-routed.
//! - The account sent upstream in `X-CREDYT-ACCOUNT` comes only from here.
//! - Counted by kind (account, customer, customer_check) in `telemetry::metrics`: hits
//!   (answered from the cache, including a wait for another caller's load of the same key),
//!   misses (loads: concurrent misses of one key share one), the calls to Credyt the loads
//!   made (a customer created on first sight is two) and how long each load took.
//! - A hit is a memory lookup. Only misses do I/O, and their upstream errors are returned, never
//!   cached.

pub mod onboard;
pub mod tenants;

use std::sync::Arc;

use moka::future::Cache;

use crate::config::IdentitySettings;
use crate::domain::{AccountId, CustomerId, TenantId};
use crate::telemetry::metrics::{IdentityMetrics, LookupKind};
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
            IdentityError::Upstream(e) if e.is_retryable() => "upstream_unavailable",
            IdentityError::Upstream(_) => "upstream_rejected",
        }
    }
}

type CustomerKey = (AccountId, Arc<str>);

/// A tenant's account as configured now: an account moved by a reload is another key.
type AccountKey = (TenantId, Arc<str>);

/// Why an uncached lookup found nothing usable. Shared by every caller waiting on the same miss.
#[derive(Debug)]
enum Miss {
    NotFound,
    Upstream(Arc<UpstreamError>),
}

impl From<UpstreamError> for Miss {
    fn from(e: UpstreamError) -> Self {
        Miss::Upstream(Arc::new(e))
    }
}

/// Cached identity resolution.
///
/// Memory matters here (a sidecar may map millions of end users): positive mappings live in
/// caches with one global time-to-live (no per-entry expiry bookkeeping), and "not found" lives
/// in a separate, small cache with a shorter life.
pub struct Identity {
    client: CredytClient,
    accounts: Cache<AccountKey, AccountId>,
    /// Account external ids that were not found (negative TTL).
    missing_accounts: Cache<AccountKey, ()>,
    customers: Cache<CustomerKey, CustomerId>,
    missing: Cache<CustomerKey, ()>,
    /// Customer ids sent directly (or named by a webhook): whether each belongs to the
    /// account (`Some`), with its external id.
    owned: Cache<(AccountId, CustomerId), Option<Option<Arc<str>>>>,
    metrics: IdentityMetrics,
}

impl Identity {
    pub fn new(client: CredytClient, settings: &IdentitySettings) -> Identity {
        Identity {
            client,
            accounts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.ttl)
                .build(),
            missing_accounts: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(settings.negative_ttl)
                .build(),
            customers: Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.ttl)
                .build(),
            missing: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.negative_ttl)
                .build(),
            owned: Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(settings.ttl)
                .build(),
            metrics: IdentityMetrics::default(),
        }
    }

    /// Counts hits, misses and upstream lookups into these (registered) handles.
    pub fn with_metrics(mut self, metrics: IdentityMetrics) -> Identity {
        self.metrics = metrics;
        self
    }

    /// Runs a load (a miss this call makes for everyone waiting on its key): counts it and
    /// times it. The hit path costs a flag check and one atomic add, and its future stays `Send`.
    async fn load<T>(
        &self,
        kind: LookupKind,
        loaded: &std::sync::atomic::AtomicBool,
        lookup: impl std::future::Future<Output = T>,
    ) -> T {
        loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        self.metrics.miss(kind);
        let started = std::time::Instant::now();
        let result = lookup.await;
        self.metrics.observe_lookup(kind, started.elapsed());
        result
    }

    fn count_hit(&self, kind: LookupKind, loaded: &std::sync::atomic::AtomicBool) {
        if !loaded.load(std::sync::atomic::Ordering::Relaxed) {
            self.metrics.hit(kind);
        }
    }

    fn upstream(miss: Arc<Miss>, not_found: impl FnOnce() -> IdentityError) -> IdentityError {
        match &*miss {
            Miss::NotFound => not_found(),
            Miss::Upstream(e) => IdentityError::Upstream(e.clone()),
        }
    }

    /// The tenant's connected account.
    pub async fn account(&self, tenant: &Tenant) -> Result<AccountId, IdentityError> {
        let external = match &tenant.account {
            AccountRef::Id(id) => return Ok(id.clone()),
            AccountRef::ExternalId(e) => e,
        };
        const KIND: LookupKind = LookupKind::Account;
        let key: AccountKey = (tenant.id.clone(), Arc::from(external.as_str()));
        if self.missing_accounts.contains_key(&key) {
            self.metrics.hit(KIND);
            return Err(IdentityError::UnknownAccount(external.clone()));
        }
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let found = self
            .accounts
            .try_get_with_by_ref(
                &key,
                self.load(KIND, &loaded, async {
                    self.metrics.upstream_lookup(KIND);
                    self.client
                        .find_account(external)
                        .await?
                        .ok_or(Miss::NotFound)
                }),
            )
            .await;
        self.count_hit(KIND, &loaded);
        match found {
            Ok(id) => Ok(id),
            Err(miss) => {
                if matches!(*miss, Miss::NotFound) {
                    self.missing_accounts.insert(key, ()).await;
                }
                Err(Self::upstream(miss, || {
                    IdentityError::UnknownAccount(external.clone())
                }))
            }
        }
    }

    /// The customer of end user `external_id` in `account`, created if `create` and missing.
    pub async fn customer_by_external_id(
        &self,
        account: &AccountId,
        external_id: &str,
        create: bool,
    ) -> Result<CustomerId, IdentityError> {
        const KIND: LookupKind = LookupKind::Customer;
        let key: CustomerKey = (account.clone(), Arc::from(external_id));
        // A cached "not found" answers only lookups that would not create the customer: a
        // tenant whose `create_customers` was just switched on creates it on the next request.
        if !create && self.missing.contains_key(&key) {
            self.metrics.hit(KIND);
            return Err(IdentityError::UnknownCustomer(external_id.to_string()));
        }
        let mut found = self.load_customer(&key, create).await;
        if create && matches!(&found, Err(miss) if matches!(**miss, Miss::NotFound)) {
            // Joined a concurrent lookup that was not allowed to create (a reload switched
            // `create_customers` on meanwhile): "not found" is never cached by moka, so this
            // loads again, creating.
            found = self.load_customer(&key, create).await;
        }
        match found {
            Ok(id) => Ok(id),
            Err(miss) => {
                if matches!(*miss, Miss::NotFound) {
                    self.missing.insert(key, ()).await;
                }
                Err(Self::upstream(miss, || {
                    IdentityError::UnknownCustomer(external_id.to_string())
                }))
            }
        }
    }

    /// One coalesced lookup (and, if `create`, creation) of an end user's customer.
    async fn load_customer(
        &self,
        key: &CustomerKey,
        create: bool,
    ) -> Result<CustomerId, Arc<Miss>> {
        const KIND: LookupKind = LookupKind::Customer;
        let (account, external_id) = (&key.0, &*key.1);
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let found = self
            .customers
            .try_get_with_by_ref(
                key,
                self.load(KIND, &loaded, async {
                    self.metrics.upstream_lookup(KIND);
                    match self.client.find_customer(account, external_id).await? {
                        Some(id) => Ok(id),
                        None if create => {
                            self.metrics.upstream_lookup(KIND);
                            let id = self.client.create_customer(account, external_id).await?;
                            // It exists now, whoever asks.
                            self.missing.invalidate(key).await;
                            Ok(id)
                        }
                        None => Err(Miss::NotFound),
                    }
                }),
            )
            .await;
        self.count_hit(KIND, &loaded);
        found
    }

    /// `customer` itself, if it exists in `account` (never a customer of another account).
    pub async fn check_customer(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<CustomerId, IdentityError> {
        match self.owned_customer(account, customer).await? {
            Some(_) => Ok(customer.clone()),
            None => Err(IdentityError::UnknownCustomer(customer.to_string())),
        }
    }

    /// The end user's external id of `customer` in `account`: the id the tenant knows it by
    /// (`Ok(None)`: the customer has none, or is not in that account).
    pub async fn external_id_of(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<Option<Arc<str>>, IdentityError> {
        Ok(self.owned_customer(account, customer).await?.flatten())
    }

    async fn owned_customer(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<Option<Option<Arc<str>>>, IdentityError> {
        const KIND: LookupKind = LookupKind::CustomerCheck;
        let key = (account.clone(), customer.clone());
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let owned = self
            .owned
            .try_get_with(
                key,
                self.load(KIND, &loaded, async {
                    self.metrics.upstream_lookup(KIND);
                    self.client
                        .customer_external_id(account, customer)
                        .await
                        .map(|found| found.map(|ext| ext.map(Arc::from)))
                        .map_err(Miss::from)
                }),
            )
            .await;
        self.count_hit(KIND, &loaded);
        owned
            .map_err(|m| Self::upstream(m, || IdentityError::UnknownCustomer(customer.to_string())))
    }

    /// Forgets what the caches know of `customer` in `account` after its external id changed
    /// (a gateway `PATCH /customers/{id}`): the mapping of its old external id (`old`, as
    /// [`Identity::external_id_of`] knew it before the change), the answer for the new one
    /// (`new`, possibly a cached "not found"), and the customer's own entry.
    pub async fn forget_customer(
        &self,
        account: &AccountId,
        customer: &CustomerId,
        old: Option<&str>,
        new: Option<&str>,
    ) {
        for external_id in [old, new].into_iter().flatten() {
            let key: CustomerKey = (account.clone(), Arc::from(external_id));
            self.customers.invalidate(&key).await;
            self.missing.invalidate(&key).await;
        }
        self.owned
            .invalidate(&(account.clone(), customer.clone()))
            .await;
    }

    /// The tenant of `table` whose connected account is `account`: tenants configured by id
    /// first, then those configured by external id, resolved through the account cache.
    pub async fn tenant_of_account(
        &self,
        table: &TenantTable,
        account: &AccountId,
    ) -> Result<Option<Arc<Tenant>>, IdentityError> {
        if let Some(t) = table
            .iter()
            .find(|t| t.account == AccountRef::Id(account.clone()))
        {
            return Ok(Some(t.clone()));
        }
        for t in table.iter() {
            if matches!(t.account, AccountRef::ExternalId(_)) {
                match self.account(t).await {
                    Ok(id) if &id == account => return Ok(Some(t.clone())),
                    Ok(_) | Err(IdentityError::UnknownAccount(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(None)
    }

    /// Number of cached end-user mappings (for metrics and the memory benchmark).
    pub async fn cached_customers(&self) -> u64 {
        self.customers.run_pending_tasks().await;
        self.customers.entry_count()
    }

    /// [`Identity::cached_customers`] as the cache last counted it (no maintenance run).
    pub fn cached_customers_now(&self) -> u64 {
        self.customers.entry_count()
    }
}
