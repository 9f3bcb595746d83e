//! The tenants file: who may post events, with which key, on which connected account.
//!
//! Keys are high-entropy random tokens, so the file stores only their SHA-256 (a slow KDF
//! would buy nothing and cost every request). A presented key is hashed once and found in a
//! map; the stored hash is then compared in constant time. The file is hot reloaded: a new
//! version is parsed and validated whole before it replaces the old one, and a broken edit
//! keeps the last good table serving.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{AccountId, TenantId};
use crate::ratelimit::{TenantLimiter, TenantQuota};

/// Where a tenant's events go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Price locally, send each fee as a wallet charge (default).
    Charges,
    /// Send the events to Credyt's `POST /events`; Credyt prices them.
    Events,
}

/// How the tenant's connected account is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRef {
    Id(AccountId),
    /// Resolved through `GET /accounts?external_id=` (cached).
    ExternalId(String),
}

/// Where a tenant receives the Credyt webhooks of its account, relayed and re-signed per the
/// Standard Webhooks specification (see [`crate::webhooks`]).
#[derive(Clone, PartialEq, Eq)]
pub struct TenantWebhook {
    /// An `http(s)://` URL.
    pub url: String,
    /// The tenant's `whsec_<base64>` signing secrets: every delivery carries one signature per
    /// secret, so a tenant can rotate (add the new one, switch its verifier, drop the old).
    pub secrets: Vec<WebhookSecret>,
    /// Topics relayed to the tenant; `None`: all.
    pub topics: Option<Vec<String>>,
}

impl TenantWebhook {
    pub fn wants(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == "*" || x == topic))
    }
}

impl std::fmt::Debug for TenantWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantWebhook")
            .field("url", &self.url)
            .field("secrets", &self.secrets.len())
            .field("topics", &self.topics)
            .finish()
    }
}

/// A Standard Webhooks signing secret: `whsec_` and the base64 of the key bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl WebhookSecret {
    /// Parses `whsec_<base64>` (at least 24 key bytes, as Standard Webhooks recommends).
    pub fn parse(s: &str) -> Option<WebhookSecret> {
        use base64::Engine;
        let b64 = s.strip_prefix("whsec_")?;
        let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        (key.len() >= 24 && key.len() <= 64).then_some(WebhookSecret { key })
    }

    /// A fresh random secret (32 bytes) in its `whsec_` form.
    pub fn generate() -> String {
        use base64::Engine;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// What a tenant may do through the Credyt gateway (see [`crate::gateway`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPolicy {
    /// The endpoint groups it may call (default: all but those that move money).
    pub allow: Vec<crate::gateway::table::Group>,
    /// Its own quota of gateway calls (`None`: `[gateway]`'s default), separate from events.
    pub rate_limit: Option<TenantQuota>,
}

impl Default for GatewayPolicy {
    fn default() -> Self {
        GatewayPolicy {
            allow: crate::gateway::table::Group::default_allowed(),
            rate_limit: None,
        }
    }
}

impl GatewayPolicy {
    pub fn allows(&self, group: crate::gateway::table::Group) -> bool {
        self.allow.contains(&group)
    }
}

/// One tenant, as configured.
pub struct Tenant {
    pub id: TenantId,
    /// A display name (as given to `tenant create`); informational.
    pub name: Option<String>,
    pub account: AccountRef,
    pub webhook: Option<TenantWebhook>,
    pub gateway: GatewayPolicy,
    /// Balance gating (see [`crate::balance`]); `None`: off.
    pub gate: Option<crate::balance::GatePolicy>,
    pub create_customers: bool,
    pub forward: ForwardMode,
    pub limiter: Arc<TenantLimiter>,
    key_hashes: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// A validated tenants file.
#[derive(Default)]
pub struct TenantTable {
    by_key: HashMap<[u8; 32], Arc<Tenant>>,
    by_id: HashMap<TenantId, Arc<Tenant>>,
    content_hash: String,
}

impl std::fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTable")
            .field("tenants", &self.by_id.len())
            .field("content_hash", &self.content_hash)
            .finish()
    }
}

impl TenantTable {
    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every tenant, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_id.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// The tenant whose key this is, if any.
    pub fn authenticate(&self, key: &str) -> Option<&Arc<Tenant>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let tenant = self.by_key.get(&digest)?;
        // The map lookup found a candidate; confirm in constant time against the stored hash.
        tenant
            .key_hashes
            .iter()
            .any(|h| bool::from(h.ct_eq(&digest)))
            .then_some(tenant)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    name: Option<String>,
    #[serde(default)]
    key_hashes: Vec<String>,
    account: Option<String>,
    account_external_id: Option<String>,
    #[serde(default)]
    create_customers: bool,
    #[serde(default)]
    forward: Option<String>,
    rate_limit: Option<RawRate>,
    webhook: Option<RawWebhook>,
    gateway: Option<RawGateway>,
    gate: Option<RawGate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    mode: String,
    min_available: Option<RawAmount>,
    on_unknown: Option<String>,
}

/// A decimal string (`"0.50"`) or an integer; a float is refused (it is not exact).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAmount {
    Text(String),
    Integer(i64),
    Float(f64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    allow: Option<Vec<String>>,
    rate_limit: Option<RawRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    secrets: Vec<String>,
    topics: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: u32,
    burst: Option<u32>,
}

/// A fresh tenant key and the line to paste into the tenants file.
pub fn generate_key() -> (String, String) {
    let mut bytes = [0u8; 30];
    rand::thread_rng().fill_bytes(&mut bytes);
    let key = format!("cpk_{}", crate::domain::base32(&bytes));
    let hash = key_hash(&key);
    (key, hash)
}

/// The `sha256:<hex>` form of a key stored in the tenants file.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let hex_part = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

impl TenantTable {
    /// Parses and validates a tenants file; every problem is reported. `previous` lends its
    /// limiters to unchanged quotas so a reload does not reset anyone's rate limit.
    pub fn parse(
        text: &str,
        default_quota: TenantQuota,
        previous: Option<&TenantTable>,
    ) -> Result<TenantTable, Vec<String>> {
        let raw: RawFile = toml_edit::de::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let mut table = TenantTable {
            content_hash: hex::encode(Sha256::digest(text.as_bytes())),
            ..TenantTable::default()
        };
        for (i, t) in raw.tenants.into_iter().enumerate() {
            let at = format!("tenants[{i}] ({})", t.id);
            if t.id.is_empty() || t.id.len() > 64 {
                problems.push(format!("{at}: id must be 1 to 64 characters"));
            }
            if t.key_hashes.is_empty() {
                problems.push(format!("{at}: key_hashes must list at least one key hash"));
            }
            let mut hashes = Vec::new();
            for h in &t.key_hashes {
                match parse_hash(h) {
                    Some(bytes) => hashes.push(bytes),
                    None => problems.push(format!(
                        "{at}: `{h}` is not a key hash (sha256:<64 hex>; see `credyt-proxy tenant-key`)"
                    )),
                }
            }
            let account = match (t.account, t.account_external_id) {
                (Some(a), None) if a.starts_with("acc_") => AccountRef::Id(AccountId::new(a)),
                (Some(a), None) => {
                    problems.push(format!("{at}: account `{a}` is not an acc_ id"));
                    continue;
                }
                (None, Some(e)) if !e.is_empty() => AccountRef::ExternalId(e),
                _ => {
                    problems.push(format!(
                        "{at}: set exactly one of account (acc_...) or account_external_id"
                    ));
                    continue;
                }
            };
            let forward = match t.forward.as_deref() {
                None | Some("charges") => ForwardMode::Charges,
                Some("events") => ForwardMode::Events,
                Some(other) => {
                    problems.push(format!(
                        "{at}: forward `{other}` is not one of: charges, events"
                    ));
                    ForwardMode::Charges
                }
            };
            let quota = match t.rate_limit {
                None => default_quota,
                Some(r) => match (
                    NonZeroU32::new(r.per_second),
                    NonZeroU32::new(r.burst.unwrap_or(r.per_second)),
                ) {
                    (Some(per_second), Some(burst)) => TenantQuota { per_second, burst },
                    _ => {
                        problems.push(format!("{at}: rate_limit values must be greater than 0"));
                        default_quota
                    }
                },
            };
            let webhook = t.webhook.and_then(|w| {
                let before = problems.len();
                let url_ok = reqwest::Url::parse(&w.url)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
                if !url_ok {
                    problems.push(format!(
                        "{at}: webhook.url `{}` is not an http(s) URL",
                        w.url
                    ));
                }
                if w.secrets.is_empty() {
                    problems.push(format!(
                        "{at}: webhook.secrets must list at least one whsec_ secret"
                    ));
                }
                let secrets: Vec<_> = w
                    .secrets
                    .iter()
                    .filter_map(|s| {
                        let parsed = WebhookSecret::parse(s);
                        if parsed.is_none() {
                            problems.push(format!(
                                "{at}: a webhook secret is not whsec_<base64 of 24 to 64 bytes>"
                            ));
                        }
                        parsed
                    })
                    .collect();
                if w.topics
                    .as_ref()
                    .is_some_and(|t| t.iter().any(String::is_empty))
                {
                    problems.push(format!("{at}: webhook.topics holds an empty topic"));
                }
                (problems.len() == before).then_some(TenantWebhook {
                    url: w.url,
                    secrets,
                    topics: w.topics,
                })
            });
            let gateway = match t.gateway {
                None => GatewayPolicy::default(),
                Some(g) => {
                    let allow = match g.allow {
                        None => crate::gateway::table::Group::default_allowed(),
                        Some(names) => names
                            .iter()
                            .filter_map(|n| {
                                let group = crate::gateway::table::Group::parse(n);
                                if group.is_none() {
                                    problems.push(format!(
                                        "{at}: gateway.allow `{n}` is not one of: {}",
                                        crate::gateway::table::Group::ALL
                                            .map(|g| g.as_str())
                                            .join(", ")
                                    ));
                                }
                                group
                            })
                            .collect(),
                    };
                    let rate_limit = g.rate_limit.and_then(|r| {
                        match (
                            NonZeroU32::new(r.per_second),
                            NonZeroU32::new(r.burst.unwrap_or(r.per_second)),
                        ) {
                            (Some(per_second), Some(burst)) => {
                                Some(TenantQuota { per_second, burst })
                            }
                            _ => {
                                problems.push(format!(
                                    "{at}: gateway.rate_limit values must be greater than 0"
                                ));
                                None
                            }
                        }
                    });
                    GatewayPolicy { allow, rate_limit }
                }
            };
            let gate = t.gate.and_then(|g| {
                let before = problems.len();
                match g.mode.as_str() {
                    "balance" | "off" => {}
                    other => problems.push(format!(
                        "{at}: gate.mode `{other}` is not one of: balance, off"
                    )),
                }
                let min_available = match g.min_available {
                    None => rust_decimal::Decimal::ZERO,
                    Some(RawAmount::Integer(n)) => rust_decimal::Decimal::from(n),
                    Some(RawAmount::Text(text)) => {
                        match rust_decimal::Decimal::from_str_exact(text.trim()) {
                            Ok(d) => d,
                            Err(_) => {
                                problems.push(format!(
                                    "{at}: gate.min_available `{text}` is not a decimal number"
                                ));
                                rust_decimal::Decimal::ZERO
                            }
                        }
                    }
                    Some(RawAmount::Float(f)) => {
                        problems.push(format!(
                            "{at}: gate.min_available {f} is a float; write it as a string, e.g. \"{f}\""
                        ));
                        rust_decimal::Decimal::ZERO
                    }
                };
                let on_unknown = match g.on_unknown.as_deref() {
                    None | Some("deny") => crate::balance::OnUnknown::Deny,
                    Some("allow") => crate::balance::OnUnknown::Allow,
                    Some(other) => {
                        problems.push(format!(
                            "{at}: gate.on_unknown `{other}` is not one of: deny, allow"
                        ));
                        crate::balance::OnUnknown::Deny
                    }
                };
                if g.mode == "balance" && forward == ForwardMode::Events {
                    problems.push(format!(
                        "{at}: gate.mode = \"balance\" needs forward = \"charges\" (events forwarded unpriced have no amount to judge)"
                    ));
                }
                (problems.len() == before && g.mode == "balance").then_some(
                    crate::balance::GatePolicy {
                        min_available,
                        on_unknown,
                    },
                )
            });
            let id = TenantId::new(t.id.as_str());
            let limiter = previous
                .and_then(|p| p.by_id.get(&id))
                .filter(|old| old.limiter.quota() == quota)
                .map(|old| old.limiter.clone())
                .unwrap_or_else(|| Arc::new(TenantLimiter::new(quota)));
            let tenant = Arc::new(Tenant {
                id: id.clone(),
                name: t.name,
                account,
                webhook,
                gateway,
                gate,
                create_customers: t.create_customers,
                forward,
                limiter,
                key_hashes: hashes.clone(),
            });
            if table.by_id.insert(id, tenant.clone()).is_some() {
                problems.push(format!("{at}: duplicate tenant id"));
            }
            for h in hashes {
                if table.by_key.insert(h, tenant.clone()).is_some() {
                    problems.push(format!("{at}: a key hash is used by two tenants"));
                }
            }
        }
        if problems.is_empty() {
            Ok(table)
        } else {
            Err(problems)
        }
    }
}

/// The live, hot-reloaded tenants table.
pub struct Tenants {
    path: PathBuf,
    default_quota: TenantQuota,
    current: ArcSwap<TenantTable>,
    last_error: Mutex<Option<String>>,
}

impl Tenants {
    /// Loads the file; fails (with every problem) if it is unreadable or invalid.
    pub fn load(path: &Path, default_quota: TenantQuota) -> Result<Tenants, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        let table = TenantTable::parse(&text, default_quota, None).map_err(|p| {
            p.into_iter()
                .map(|m| format!("{}: {m}", path.display()))
                .collect::<Vec<_>>()
        })?;
        Ok(Tenants {
            path: path.to_path_buf(),
            default_quota,
            current: ArcSwap::from_pointee(table),
            last_error: Mutex::new(None),
        })
    }

    /// A tenants table built in memory (tests and embedding).
    pub fn from_table(table: TenantTable, default_quota: TenantQuota) -> Tenants {
        Tenants {
            path: PathBuf::new(),
            default_quota,
            current: ArcSwap::from_pointee(table),
            last_error: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<TenantTable> {
        self.current.load_full()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Re-reads the file; swaps in the new table if it changed and is valid.
    pub fn reload_now(&self) -> Result<bool, String> {
        let result = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| {
                let old = self.current.load();
                if hex::encode(Sha256::digest(text.as_bytes())) == old.content_hash {
                    return Ok(false);
                }
                let table = TenantTable::parse(&text, self.default_quota, Some(&old))
                    .map_err(|p| p.join("; "))?;
                self.current.store(Arc::new(table));
                Ok(true)
            });
        match &result {
            Ok(true) => {
                tracing::info!(path = %self.path.display(), tenants = self.current().len(), "tenants reloaded");
                *self.last_error.lock() = None;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "tenants file rejected, keeping the last good one");
                *self.last_error.lock() = Some(e.clone());
            }
        }
        result
    }

    /// Polls the file every `interval` (robust to ConfigMap symlink swaps and editors that
    /// replace files) until the returned task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let me2 = me.clone();
                let _ = tokio::task::spawn_blocking(move || me2.reload_now()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota() -> TenantQuota {
        TenantQuota {
            per_second: NonZeroU32::new(10).unwrap(),
            burst: NonZeroU32::new(10).unwrap(),
        }
    }

    #[test]
    fn webhook_and_gateway_entries_are_checked_whole() {
        use crate::gateway::table::Group;
        let (_, hash) = generate_key();
        let secret = WebhookSecret::generate();
        let good = format!(
            "[[tenants]]\nid = \"t\"\nkey_hashes = [\"{hash}\"]\naccount = \"acc_1\"\n\
             webhook = {{ url = \"https://t.example/h\", secrets = [\"{secret}\"], topics = [\"balance_threshold_hit\"] }}\n\
             gateway = {{ allow = [\"customers.read\", \"wallets.charge\"], rate_limit = {{ per_second = 2 }} }}\n"
        );
        let table = TenantTable::parse(&good, quota(), None).unwrap();
        let t = table.get("t").unwrap();
        let w = t.webhook.as_ref().unwrap();
        assert!(w.wants("balance_threshold_hit") && !w.wants("subscription.activated"));
        assert!(t.gateway.allows(Group::WalletsCharge) && !t.gateway.allows(Group::CustomersWrite));
        assert_eq!(t.gateway.rate_limit.unwrap().burst.get(), 2);
        // Absent: every group but money, and all topics.
        let plain =
            format!("[[tenants]]\nid = \"p\"\nkey_hashes = [\"{hash}\"]\naccount = \"acc_2\"\n");
        let p = TenantTable::parse(&plain, quota(), None).unwrap();
        let p = p.get("p").unwrap();
        assert!(p.webhook.is_none());
        assert_eq!(p.gateway.allow, Group::default_allowed());
        for bad in [
            good.replace("https://t.example/h", "ftp://t.example/h"),
            good.replace(&secret, "whsec_short"),
            good.replace(&secret, "not-a-whsec"),
            good.replace("\"customers.read\"", "\"accounts.write\""),
            good.replace("per_second = 2", "per_second = 0"),
            good.replace("topics = [\"balance_threshold_hit\"]", "topics = [\"\"]"),
            good.replace(&format!("secrets = [\"{secret}\"], "), ""),
        ] {
            assert!(TenantTable::parse(&bad, quota(), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_gate_entry_is_checked_whole_and_off_by_default() {
        use crate::balance::{GatePolicy, OnUnknown};
        use rust_decimal_macros::dec;
        let (_, hash) = generate_key();
        let entry = |gate: &str| {
            format!(
                "[[tenants]]\nid = \"t\"\nkey_hashes = [\"{hash}\"]\naccount = \"acc_1\"\n{gate}\n"
            )
        };
        let gate_of = |gate: &str| {
            TenantTable::parse(&entry(gate), quota(), None)
                .map(|t| t.get("t").unwrap().gate.clone())
        };
        assert_eq!(gate_of(""), Ok(None));
        assert_eq!(gate_of("gate = { mode = \"off\" }"), Ok(None));
        assert_eq!(
            gate_of("gate = { mode = \"balance\" }"),
            Ok(Some(GatePolicy {
                min_available: dec!(0),
                on_unknown: OnUnknown::Deny
            }))
        );
        assert_eq!(
            gate_of(
                "gate = { mode = \"balance\", min_available = \"-2.50\", on_unknown = \"allow\" }"
            ),
            Ok(Some(GatePolicy {
                min_available: dec!(-2.50),
                on_unknown: OnUnknown::Allow
            }))
        );
        assert_eq!(
            gate_of("gate = { mode = \"balance\", min_available = 3 }")
                .map(|g| g.map(|g| g.min_available)),
            Ok(Some(dec!(3)))
        );
        for (bad, says) in [
            ("gate = { mode = \"credit\" }", "gate.mode"),
            (
                "gate = { mode = \"balance\", min_available = 0.1 }",
                "is a float",
            ),
            (
                "gate = { mode = \"balance\", min_available = \"ten\" }",
                "not a decimal",
            ),
            (
                "gate = { mode = \"balance\", on_unknown = \"maybe\" }",
                "gate.on_unknown",
            ),
            (
                "gate = { mode = \"balance\" }\nforward = \"events\"",
                "needs forward",
            ),
        ] {
            let problems = gate_of(bad).unwrap_err();
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{bad}: {problems:?}"
            );
        }
    }

    #[test]
    fn keys_authenticate_only_their_tenant() {
        let (ka, ha) = generate_key();
        let (kb, hb) = generate_key();
        assert!(ka.starts_with("cpk_") && ka.len() > 40);
        let text = format!(
            "[[tenants]]\nid = \"a\"\nkey_hashes = [\"{ha}\"]\naccount = \"acc_1\"\n\
             [[tenants]]\nid = \"b\"\nkey_hashes = [\"{hb}\"]\naccount_external_id = \"b-ext\"\nforward = \"events\"\n"
        );
        let t = TenantTable::parse(&text, quota(), None).unwrap();
        assert_eq!(t.authenticate(&ka).unwrap().id.as_str(), "a");
        assert_eq!(t.authenticate(&kb).unwrap().forward, ForwardMode::Events);
        assert!(t.authenticate("cpk_wrong").is_none());
        assert!(
            t.authenticate(&ha).is_none(),
            "the hash itself is not a key"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[[tenants]]\nid = \"a\"\nkey_hashes = [\"md5:x\"]\naccount = \"nope\"\n\
                    [[tenants]]\nid = \"b\"\nkey_hashes = []\n";
        let problems = TenantTable::parse(text, quota(), None).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn hot_reload_keeps_the_last_good_table_on_a_broken_edit() {
        let dir = std::env::temp_dir().join(format!("cp-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        let (ka, ha) = generate_key();
        let (kb, hb) = generate_key();
        let entry = |id: &str, h: &str| {
            format!("[[tenants]]\nid = \"{id}\"\nkey_hashes = [\"{h}\"]\naccount = \"acc_1\"\n")
        };
        std::fs::write(&path, entry("a", &ha)).unwrap();
        let tenants = Tenants::load(&path, quota()).unwrap();
        assert_eq!(tenants.reload_now(), Ok(false));
        std::fs::write(
            &path,
            format!("{}[[tenants]]\nid = \"broken\"\n", entry("a", &ha)),
        )
        .unwrap();
        assert!(tenants.reload_now().is_err());
        assert!(tenants.last_error().is_some());
        assert!(
            tenants.current().authenticate(&ka).is_some(),
            "the old table keeps serving"
        );
        std::fs::write(&path, format!("{}{}", entry("a", &ha), entry("b", &hb))).unwrap();
        assert_eq!(tenants.reload_now(), Ok(true));
        assert!(tenants.last_error().is_none());
        assert_eq!(
            tenants.current().authenticate(&kb).unwrap().id.as_str(),
            "b"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reload_keeps_limiters_of_unchanged_quotas() {
        let (_, h) = generate_key();
        let text =
            format!("[[tenants]]\nid = \"a\"\nkey_hashes = [\"{h}\"]\naccount = \"acc_1\"\n");
        let first = TenantTable::parse(&text, quota(), None).unwrap();
        let second = TenantTable::parse(&format!("{text}\n"), quota(), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(
            &first.get("a").unwrap().limiter,
            &second.get("a").unwrap().limiter
        ));
    }
}
