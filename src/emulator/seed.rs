//! Seed files: a JSON description of accounts, customers, opening balances, thresholds and
//! webhooks loaded into a running emulator (`RunningEmulator::apply_seed`).
//!
//! Contract: seeding is all-or-nothing per entity kind checks (ids must have the Credyt shape,
//! duplicates are errors); opening balances set `available` directly and are not transactions
//! (charge/adjustment counters stay at zero). `POST /_emulator/reset` re-applies every seed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use chrono::Utc;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::ids::{is_valid, new_id, random_body};
use super::state::{parse_wallet_account_id, wallet_account_mut, NewCustomer, Partition, Store};
use super::webhooks::Destination;
use super::wire::Metadata;

#[derive(Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Which platform (API key) owns the seeded data; default: the first configured key.
    #[serde(default)]
    pub platform_key: Option<String>,
    /// Default `balance_threshold_hit` threshold (overrides the configured one).
    #[serde(default)]
    pub default_threshold: Option<Decimal>,
    /// Connected accounts and their customers.
    #[serde(default)]
    pub accounts: Vec<SeedAccount>,
    /// Customers of the platform's own account.
    #[serde(default)]
    pub customers: Vec<SeedCustomer>,
    #[serde(default)]
    pub webhooks: Vec<SeedWebhook>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct SeedAccount {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub customers: Vec<SeedCustomer>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct SeedCustomer {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// Opening balances: `{"USD": 20}` (account `default:USD`) or `{"credits:IMG": 100}`.
    #[serde(default)]
    pub balances: BTreeMap<String, Decimal>,
    /// Per-customer threshold overriding the default.
    #[serde(default)]
    pub threshold: Option<Decimal>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct SeedWebhook {
    #[serde(default)]
    pub id: Option<String>,
    pub url: String,
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    #[serde(default)]
    pub connect: bool,
    #[serde(default)]
    pub secret: Option<String>,
}

impl Seed {
    pub fn from_file(path: &Path) -> anyhow::Result<Seed> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading seed file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing seed file {}", path.display()))
    }

    /// Loads the seed into `store`; `first_key` is the platform used when none is named.
    pub(crate) fn apply(&self, store: &Store, first_key: &str) -> anyhow::Result<()> {
        let key = self.platform_key.as_deref().unwrap_or(first_key);
        let Some(platform) = store.platform(key) else {
            bail!("seed names a platform key that is not configured");
        };
        if let Some(t) = self.default_threshold {
            *store.default_threshold.write() = Some(t);
        }
        seed_customers(&platform.own, &self.customers)?;
        for account in &self.accounts {
            if let Some(id) = &account.id {
                if !is_valid(id, "acc") {
                    bail!("seed account id {id} is not a valid Credyt id (acc_ + 26 chars, starting with 4)");
                }
            }
            let partition = store
                .create_account(
                    &platform,
                    account.id.clone(),
                    account.name.clone(),
                    account.external_id.clone(),
                    account.metadata.clone(),
                )
                .map_err(|e| anyhow::anyhow!("seed account {}: {e}", account.name))?;
            seed_customers(&partition, &account.customers)?;
        }
        let now = Utc::now();
        let mut data = platform.data.lock();
        for w in &self.webhooks {
            let id = w.id.clone().unwrap_or_else(|| new_id("whd"));
            if data.webhooks.iter().any(|d| d.id == id) {
                bail!("seed webhook {id} already exists");
            }
            data.webhooks.push(Destination {
                id,
                url: w.url.clone(),
                topics: w.topics.clone().unwrap_or_else(|| vec!["*".to_owned()]),
                connect: w.connect,
                enabled: true,
                secret: w
                    .secret
                    .clone()
                    .unwrap_or_else(|| format!("whsec_{}", random_body(32))),
                created_at: now,
                updated_at: now,
            });
        }
        Ok(())
    }
}

fn seed_customers(partition: &Partition, customers: &[SeedCustomer]) -> anyhow::Result<()> {
    let mut data = partition.data.lock();
    for c in customers {
        if let Some(id) = &c.id {
            if !is_valid(id, "cust") {
                bail!("seed customer id {id} is not a valid Credyt id (cust_ + 26 chars, starting with 4)");
            }
        }
        let id = data
            .create_customer(NewCustomer {
                id: c.id.clone(),
                name: c.name.clone(),
                external_id: c.external_id.clone(),
                email: c.email.clone(),
                metadata: c.metadata.clone(),
            })
            .map_err(|e| anyhow::anyhow!("seed customer {}: {e}", c.name))?;
        let customer = data
            .customer_mut(&id)
            .map_err(|e| anyhow::anyhow!("seed customer {id}: {e}"))?;
        customer.threshold = c.threshold;
        for (account, amount) in &c.balances {
            let (name, asset) = parse_wallet_account_id(account).unwrap_or(("default", account));
            wallet_account_mut(customer, name, asset).available = *amount;
        }
    }
    Ok(())
}
