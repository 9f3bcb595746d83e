//! Raw serde mirror of the configuration file, with the documented defaults.
//!
//! Every table denies unknown keys. Values that need checking (addresses, enumerations, URLs)
//! are kept as plain strings and numbers here so that validation can report all problems
//! together instead of stopping at the first serde error.
//!
//! Reading is two passes, both collecting: [`RawSettings::from_config`] takes the merged file
//! and environment section by section and key by key (an unknown key or a value of the wrong
//! type is recorded with its `section.key`, and the key falls back to its default), then
//! [`RawSettings::validate`] checks the values. A new section is one field of [`RawSettings`]
//! (its struct with `#[serde(deny_unknown_fields, default)]` and a `Default`, so that each key
//! can be read alone) plus one line in `from_config`; a test fails if the line is missing.
//!
//! The `Default` impls are the documented defaults: `docs/configuration.md` states every key
//! with its default, and the tests of `config::reference` compare the two (through `Serialize`,
//! derived in test builds only, so no production code can serialize a configuration and its
//! secrets).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use config::{Map, Value, ValueKind};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{
    AckMode, AdminSettings, BalanceSettings, ConfigErrors, CredytSettings, GatewaySettings,
    IdentitySettings, IngestSettings, LogFormat, LogSettings, OutboxSettings, PricingSettings,
    Problems, RateLimitDefaults, Secret, ServerSettings, Settings, ShutdownSettings, SyncMode,
    TelemetrySettings, TenantsSettings, WebhookSettings,
};

#[derive(Debug, Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    pub server: RawServer,
    pub log: RawLog,
    pub credyt: RawCredyt,
    pub tenants: RawTenants,
    pub pricing: RawPricing,
    pub ingest: RawIngest,
    pub identity: RawIdentity,
    pub outbox: RawOutbox,
    pub rate_limit: RawRateLimit,
    pub admin: RawAdmin,
    pub telemetry: RawTelemetry,
    pub shutdown: RawShutdown,
    pub webhooks: RawWebhooks,
    pub gateway: RawGateway,
    pub balance: RawBalance,
}

/// `[balance]`: the balances balance gating judges events against (see `crate::balance`).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawBalance {
    pub ttl_ms: u64,
    pub unknown_ttl_ms: u64,
}

impl Default for RawBalance {
    fn default() -> Self {
        Self {
            ttl_ms: 30_000,
            unknown_ttl_ms: 1_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    pub workers: u64,
    pub max_body_bytes: u64,
    pub shutdown_grace_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            workers: 1,
            max_body_bytes: 1024 * 1024,
            shutdown_grace_ms: 20_000,
        }
    }
}

/// `[gateway]`: the tenant gateway to the Credyt API (see `crate::gateway`).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    /// Each tenant's sustained gateway calls per second, unless its entry says otherwise.
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RawGateway {
    fn default() -> Self {
        Self {
            per_second: 20,
            burst: 40,
        }
    }
}

/// `[webhooks]`: the relay of Credyt's webhooks to tenants (off while `credyt_secrets` is
/// empty). Lists may also be given as one comma-separated string (environment variables).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawWebhooks {
    #[serde(deserialize_with = "list_or_csv")]
    pub credyt_secrets: Vec<String>,
    pub listen: String,
    pub path: String,
    pub dir: String,
    pub tolerance_secs: u64,
    pub max_body_bytes: u64,
    pub dedupe_window_secs: u64,
    pub attempt_timeout_ms: u64,
    #[serde(deserialize_with = "list_or_csv")]
    pub retry_schedule_ms: Vec<u64>,
    pub per_tenant_concurrency: u64,
    pub max_pending: u64,
}

impl RawWebhooks {
    fn validate(
        self,
        p: &mut Problems,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Option<WebhookSettings> {
        let listen = p.addr("webhooks.listen", &self.listen);
        if !self.path.starts_with('/') || self.path.contains(['?', '#']) {
            p.push(
                "webhooks.path",
                "must be an absolute path such as /webhooks/credyt",
            );
        }
        if self.credyt_secrets.iter().any(|s| s.trim().is_empty()) {
            p.push("webhooks.credyt_secrets", "holds an empty secret");
        }
        if self.dedupe_window_secs < 7 * 24 * 3600 {
            p.push(
                "webhooks.dedupe_window_secs",
                "must be at least 604800 (7 days): credyt redelivers a webhook for hours",
            );
        }
        if self.retry_schedule_ms.len() > 30 {
            p.push("webhooks.retry_schedule_ms", "must have at most 30 retries");
        }
        let settings = WebhookSettings {
            credyt_secrets: self.credyt_secrets.into_iter().map(Secret::new).collect(),
            listen,
            path: self.path,
            dir: resolve(&self.dir),
            tolerance: Duration::from_secs(
                p.nonzero("webhooks.tolerance_secs", self.tolerance_secs),
            ),
            max_body_bytes: p.nonzero("webhooks.max_body_bytes", self.max_body_bytes) as usize,
            dedupe_window: Duration::from_secs(self.dedupe_window_secs),
            attempt_timeout: p.positive_ms("webhooks.attempt_timeout_ms", self.attempt_timeout_ms),
            retry_schedule: self
                .retry_schedule_ms
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            per_tenant_concurrency: p.nonzero(
                "webhooks.per_tenant_concurrency",
                self.per_tenant_concurrency,
            ) as usize,
            max_pending: p.nonzero("webhooks.max_pending", self.max_pending) as usize,
        };
        (!settings.credyt_secrets.is_empty()).then_some(settings)
    }
}

impl WebhookSettings {
    /// The relay with every default, these Credyt secrets and its outbox in `dir` (the
    /// sandbox's relay).
    pub fn with_defaults(credyt_secrets: Vec<String>, dir: std::path::PathBuf) -> WebhookSettings {
        let d = RawWebhooks::default();
        WebhookSettings {
            credyt_secrets: credyt_secrets.into_iter().map(Secret::new).collect(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            path: d.path,
            dir,
            tolerance: Duration::from_secs(d.tolerance_secs),
            max_body_bytes: d.max_body_bytes as usize,
            dedupe_window: Duration::from_secs(d.dedupe_window_secs),
            attempt_timeout: Duration::from_millis(d.attempt_timeout_ms),
            retry_schedule: d
                .retry_schedule_ms
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            per_tenant_concurrency: d.per_tenant_concurrency as usize,
            max_pending: d.max_pending as usize,
        }
    }
}

impl Default for RawWebhooks {
    fn default() -> Self {
        Self {
            credyt_secrets: Vec::new(),
            listen: "127.0.0.1:8082".into(),
            path: "/webhooks/credyt".into(),
            dir: "data/webhooks".into(),
            tolerance_secs: 300,
            max_body_bytes: 256 * 1024,
            dedupe_window_secs: 7 * 24 * 3600,
            attempt_timeout_ms: 10_000,
            retry_schedule_ms: vec![5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000],
            per_tenant_concurrency: 4,
            max_pending: 100_000,
        }
    }
}

/// A list from a TOML array, or from one string of comma-separated items (what an environment
/// variable can hold).
fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        List(Vec<T>),
        Csv(String),
    }
    match Either::<T>::deserialize(d)? {
        Either::List(items) => Ok(items),
        Either::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<T>().map_err(serde::de::Error::custom))
            .collect(),
    }
}

/// `[shutdown]`: what happens between the first SIGTERM and the exit (`server.shutdown_grace_ms`
/// is the whole budget).
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// How long the proxy keeps taking requests, not ready, while the endpoints that route to
    /// it are updated.
    pub drain_delay_ms: u64,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `pretty` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `credyt_proxy=debug,info`.
    pub filter: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawCredyt {
    pub base_url: String,
    pub api_key: String,
    /// A file holding the platform key (a mounted Secret): read at start and again before
    /// every key check, so a rotated key is picked up without a restart. Wins over `api_key`.
    pub api_key_file: String,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub max_idle_per_host: u64,
}

impl Default for RawCredyt {
    fn default() -> Self {
        Self {
            base_url: "https://api.credyt.ai".into(),
            api_key: String::new(),
            api_key_file: String::new(),
            timeout_ms: 10_000,
            connect_timeout_ms: 2_000,
            max_idle_per_host: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawTenants {
    pub file: String,
    pub reload_interval_ms: u64,
}

impl Default for RawTenants {
    fn default() -> Self {
        Self {
            file: "tenants.toml".into(),
            reload_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawPricing {
    pub dir: String,
    pub reload_interval_ms: u64,
}

impl Default for RawPricing {
    fn default() -> Self {
        Self {
            dir: "pricing".into(),
            reload_interval_ms: 500,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawIngest {
    /// `durable` (default) or `upstream`.
    pub ack: String,
    pub max_events_per_request: u64,
    pub max_event_id_len: u64,
    pub max_field_len: u64,
    pub max_data_entries: u64,
    pub past_window_secs: u64,
    pub future_skew_secs: u64,
    pub dedupe_window_secs: u64,
}

impl Default for RawIngest {
    fn default() -> Self {
        Self {
            ack: "durable".into(),
            max_events_per_request: 100,
            max_event_id_len: 128,
            max_field_len: 1024,
            max_data_entries: 64,
            past_window_secs: 7 * 24 * 3600,
            future_skew_secs: 300,
            dedupe_window_secs: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    pub ttl_secs: u64,
    pub negative_ttl_secs: u64,
    pub max_entries: u64,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            ttl_secs: 600,
            negative_ttl_secs: 30,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawOutbox {
    pub dir: String,
    /// `interval` (default) or `always`.
    pub sync: String,
    pub sync_interval_ms: u64,
    pub max_pending: u64,
    /// Most concurrent appends merged into one commit group.
    pub max_group: u64,
    /// Run the forwarder that drains the outbox to Credyt (off only for request-path
    /// benchmarks: records then stay on disk until a run with it on).
    pub forwarder: bool,
    /// A fixed number of deliveries in flight at once (sets both bounds below).
    pub forwarder_concurrency: Option<u64>,
    /// Bounds of the adaptive number of deliveries in flight (see `upstream::concurrency`).
    pub forwarder_concurrency_min: u64,
    pub forwarder_concurrency_max: u64,
    /// A record that keeps failing transiently for this long after it was accepted (and was
    /// tried at least 3 times by this process) becomes a dead letter `retries_exhausted`.
    pub retry_max_age_ms: u64,
    /// 0 = off. Fees for the same (account, customer, asset) within this window go out as one
    /// charge.
    pub coalesce_window_ms: u64,
}

impl Default for RawOutbox {
    fn default() -> Self {
        Self {
            dir: "data/outbox".into(),
            sync: "interval".into(),
            sync_interval_ms: 500,
            max_pending: 100_000,
            max_group: 512,
            forwarder: true,
            forwarder_concurrency: None,
            forwarder_concurrency_min: 16,
            forwarder_concurrency_max: 1024,
            retry_max_age_ms: 72 * 3600 * 1000,
            coalesce_window_ms: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    /// Default sustained events per second per tenant (a tenant may override).
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            per_second: 1_000,
            burst: 2_000,
        }
    }
}

/// `[admin]`: the operator API on the admin port.
#[derive(Debug, Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Bearer token of the dead-letter endpoints (`/admin/...`); unset (the default) disables
    /// them. Set it from the environment (`CREDYT_PROXY__ADMIN__TOKEN`), not in the file.
    pub token: Option<String>,
}

/// `[telemetry]`: what the proxy reports about itself besides its logs.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// Label event, fee and rate-limit counters by tenant (default false).
    pub per_tenant_metrics: bool,
    /// Tenants labelled by their own id; the rest share `other` (default 100, at most 10000).
    pub max_tenant_labels: u64,
    // Traces over OTLP (see `config::traces`): each key, when set, wins over its standard
    // `OTEL_*` variable; all unset (and no variable) means no traces.
    /// Base URL of an OTLP/HTTP receiver; `/v1/traces` is appended (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Full URL spans are posted to (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub traces_endpoint: Option<String>,
    /// `http/protobuf`, the only one built in (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub protocol: Option<String>,
    /// `OTEL_SERVICE_NAME`; default `credyt-proxy`.
    pub service_name: Option<String>,
    /// `key=value,key2=value2` (`OTEL_RESOURCE_ATTRIBUTES`, merged; these win per key).
    pub resource_attributes: Option<String>,
    /// `OTEL_TRACES_SAMPLER`; default `parentbased_always_on`.
    pub traces_sampler: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `*traceidratio` samplers.
    pub traces_sampler_arg: Option<f64>,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`; default 2048.
    pub traces_max_queue_size: Option<u64>,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`; default 512.
    pub traces_max_export_batch_size: Option<u64>,
    /// `OTEL_BSP_SCHEDULE_DELAY`; default 5000.
    pub traces_schedule_delay_ms: Option<u64>,
    /// `OTEL_BSP_EXPORT_TIMEOUT`; default 10000.
    pub traces_export_timeout_ms: Option<u64>,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        let d = TelemetrySettings::default();
        Self {
            per_tenant_metrics: d.per_tenant_metrics,
            max_tenant_labels: d.max_tenant_labels as u64,
            endpoint: None,
            traces_endpoint: None,
            protocol: None,
            service_name: None,
            resource_attributes: None,
            traces_sampler: None,
            traces_sampler_arg: None,
            traces_max_queue_size: None,
            traces_max_export_batch_size: None,
            traces_schedule_delay_ms: None,
            traces_export_timeout_ms: None,
        }
    }
}

/// Most tenant label values: each one multiplies the series of every per-tenant counter.
const MAX_TENANT_LABELS: u64 = 10_000;

/// Shortest admin token accepted: a guessable token would guard the replay of money.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

fn admin_token(p: &mut Problems, token: Option<String>) -> Option<Secret> {
    let token = token?;
    // Never echo the value: it is a secret.
    if token.len() < MIN_ADMIN_TOKEN_LEN {
        p.push(
            "admin.token",
            format!(
                "must be at least {MIN_ADMIN_TOKEN_LEN} characters (leave it unset to disable the dead-letter endpoints)"
            ),
        );
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        p.push(
            "admin.token",
            "must be printable ASCII without spaces (it travels in an Authorization header)",
        );
    }
    Some(Secret::new(token))
}

/// The field names serde knows for a `#[derive(Deserialize)]` struct (its `deserialize_struct`
/// call carries them), so unknown keys can be found without stopping at the first.
pub(crate) fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The sections of the file (the fields of [`RawSettings`]).
pub fn section_names() -> &'static [&'static str] {
    struct_fields::<RawSettings>()
}

/// What went wrong with one value, without the key and origin the caller already names.
fn type_problem(e: config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        config::ConfigError::At { error, .. } => type_problem(*error),
        other => other.to_string(),
    }
}

/// `(set in the environment)` for a value that came from a `CREDYT_PROXY__...` variable.
fn origin_note(value: &Value) -> &'static str {
    match value.origin() {
        Some("the environment") => " (set in the environment)",
        _ => "",
    }
}

/// Reads one section key by key: unknown keys and values of the wrong type are recorded as
/// problems with their `section.key`, and those keys keep their defaults.
fn section<T: DeserializeOwned + Default>(
    p: &mut Problems,
    config: &config::Config,
    root: &mut Map<String, Value>,
    name: &str,
) -> T {
    if root.remove(name).is_none() {
        return T::default();
    }
    // From the config itself, not the root map: its values still know where they came from.
    let table = match config.get_table(name) {
        Ok(table) => table,
        Err(_) => {
            p.parse_problem(name, format!("must be a table ([{name}])"));
            return T::default();
        }
    };
    let known = struct_fields::<T>();
    let mut keys: Vec<&String> = table.keys().collect();
    keys.sort();
    let mut good = Map::new();
    for key in keys {
        let Some(value) = table.get(key) else {
            continue;
        };
        let path = format!("{name}.{key}");
        let note = origin_note(value);
        if !known.contains(&key.as_str()) {
            p.parse_problem(
                &path,
                format!("unknown key{note}; [{name}] has: {}", known.join(", ")),
            );
            continue;
        }
        let one = Map::from_iter([(key.clone(), value.clone())]);
        match Value::new(None, ValueKind::Table(one)).try_deserialize::<T>() {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => p.parse_problem(&path, format!("{}{note}", type_problem(e))),
        }
    }
    Value::new(None, ValueKind::Table(good))
        .try_deserialize::<T>()
        .unwrap_or_else(|e| {
            p.parse_problem(name, type_problem(e));
            T::default()
        })
}

impl RawSettings {
    /// Reads the merged file and environment, collecting every unknown key and every value of
    /// the wrong type (each with its key) instead of stopping at the first.
    pub(crate) fn from_config(config: config::Config) -> (RawSettings, Problems) {
        let mut p = Problems::default();
        let mut root: Map<String, Value> = match config.clone().try_deserialize() {
            Ok(root) => root,
            Err(e) => {
                p.parse_problem("(file)", e.to_string());
                return (RawSettings::default(), p);
            }
        };
        let c = &config;
        let raw = RawSettings {
            server: section(&mut p, c, &mut root, "server"),
            log: section(&mut p, c, &mut root, "log"),
            credyt: section(&mut p, c, &mut root, "credyt"),
            tenants: section(&mut p, c, &mut root, "tenants"),
            pricing: section(&mut p, c, &mut root, "pricing"),
            ingest: section(&mut p, c, &mut root, "ingest"),
            identity: section(&mut p, c, &mut root, "identity"),
            outbox: section(&mut p, c, &mut root, "outbox"),
            rate_limit: section(&mut p, c, &mut root, "rate_limit"),
            admin: section(&mut p, c, &mut root, "admin"),
            telemetry: section(&mut p, c, &mut root, "telemetry"),
            shutdown: section(&mut p, c, &mut root, "shutdown"),
            webhooks: section(&mut p, c, &mut root, "webhooks"),
            gateway: section(&mut p, c, &mut root, "gateway"),
            balance: section(&mut p, c, &mut root, "balance"),
        };
        // What is left is not a section of the file.
        let mut unknown: Vec<String> = root.into_keys().collect();
        unknown.sort();
        for key in unknown {
            let note = config
                .get_table(&key)
                .ok()
                .and_then(|t| t.values().next().map(origin_note))
                .unwrap_or("");
            p.parse_problem(
                &key,
                format!(
                    "unknown section{note}; the sections are: {}",
                    section_names().join(", ")
                ),
            );
        }
        (raw, p)
    }
}

/// The value `examples/config.toml` puts in `credyt.api_key`.
pub const PLACEHOLDER_API_KEY: &str = "set-me-through-CREDYT_PROXY__CREDYT__API_KEY";

/// A copied example value rather than a key: the proxy must not start with it.
fn is_placeholder_key(key: &str) -> bool {
    let key = key.trim();
    key == PLACEHOLDER_API_KEY || key.to_ascii_lowercase().starts_with("set-me")
}

fn nonzero_u32(p: &mut Problems, key: &str, v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or_else(|| {
        p.push(key, "must be greater than 0");
        NonZeroU32::MIN
    })
}

impl RawSettings {
    /// Validates everything, collecting every problem; relative paths resolve against `base`;
    /// `otel` holds the `OTEL_*` environment variables (see `config::traces`).
    pub fn validate(
        self,
        base: &Path,
        otel: &HashMap<String, String>,
    ) -> Result<Settings, ConfigErrors> {
        self.validate_with(base, Problems::default(), otel)
    }

    /// Like [`RawSettings::validate`], adding to the problems already found while reading (a
    /// key that could not be read is not reported a second time for its default).
    pub(crate) fn validate_with(
        self,
        base: &Path,
        mut p: Problems,
        otel: &HashMap<String, String>,
    ) -> Result<Settings, ConfigErrors> {
        let resolve = |s: &str| {
            let path = Path::new(s);
            if path.is_absolute() {
                path.to_path_buf()
            } else {
                base.join(path)
            }
        };

        let server = ServerSettings {
            listen: p.addr("server.listen", &self.server.listen),
            admin_listen: p.addr("server.admin_listen", &self.server.admin_listen),
            workers: p.nonzero("server.workers", self.server.workers) as usize,
            max_body_bytes: p.nonzero("server.max_body_bytes", self.server.max_body_bytes) as usize,
        };
        // 0 would stop accepting and cut in-flight requests at once on SIGTERM.
        let grace = p.positive_ms("server.shutdown_grace_ms", self.server.shutdown_grace_ms);
        // Judged against a valid grace only (0 is reported above).
        if self.server.shutdown_grace_ms > 0
            && self.shutdown.drain_delay_ms >= self.server.shutdown_grace_ms
        {
            p.push(
                "shutdown.drain_delay_ms",
                format!(
                    "must be less than server.shutdown_grace_ms ({}), the whole drain budget",
                    self.server.shutdown_grace_ms
                ),
            );
        }
        let shutdown = ShutdownSettings {
            drain_delay: Duration::from_millis(self.shutdown.drain_delay_ms),
            grace,
        };

        let format = match self.log.format.as_str() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                p.push(
                    "log.format",
                    format!("`{other}` is not one of: pretty, json"),
                );
                LogFormat::Pretty
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            p.push(
                "log.filter",
                format!("`{}` is not a valid filter", self.log.filter),
            );
        }

        let base_url = self.credyt.base_url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base_url).ok();
        let usable = parsed.as_ref().is_some_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.query().is_none()
                && u.fragment().is_none()
        });
        if !usable {
            p.push(
                "credyt.base_url",
                format!("`{base_url}` is not an http(s) URL"),
            );
        }
        let api_key_file = (!self.credyt.api_key_file.trim().is_empty())
            .then(|| resolve(&self.credyt.api_key_file));
        if self.credyt.api_key.trim().is_empty() && api_key_file.is_none() {
            p.push(
                "credyt.api_key",
                "the platform API key is required (set CREDYT_PROXY__CREDYT__API_KEY or credyt.api_key_file)",
            );
        } else if api_key_file.is_none() && is_placeholder_key(&self.credyt.api_key) {
            p.push(
                "credyt.api_key",
                "is the placeholder of examples/config.toml, not a platform key: set the real \
                 key through CREDYT_PROXY__CREDYT__API_KEY (e.g. from a mounted secret)",
            );
        }
        let credyt = CredytSettings {
            base_url,
            api_key: Secret::new(self.credyt.api_key),
            api_key_file,
            timeout: p.positive_ms("credyt.timeout_ms", self.credyt.timeout_ms),
            connect_timeout: p
                .positive_ms("credyt.connect_timeout_ms", self.credyt.connect_timeout_ms),
            max_idle_per_host: self.credyt.max_idle_per_host as usize,
        };

        let tenants = TenantsSettings {
            file: resolve(&self.tenants.file),
            reload_interval: p.positive_ms(
                "tenants.reload_interval_ms",
                self.tenants.reload_interval_ms,
            ),
        };
        let pricing = PricingSettings {
            dir: resolve(&self.pricing.dir),
            reload_interval: p.positive_ms(
                "pricing.reload_interval_ms",
                self.pricing.reload_interval_ms,
            ),
        };

        let ack = match self.ingest.ack.as_str() {
            "durable" => AckMode::Durable,
            "upstream" => AckMode::Upstream,
            other => {
                p.push(
                    "ingest.ack",
                    format!("`{other}` is not one of: durable, upstream"),
                );
                AckMode::Durable
            }
        };
        let max_events = p.nonzero(
            "ingest.max_events_per_request",
            self.ingest.max_events_per_request,
        );
        if max_events > 1000 {
            p.push("ingest.max_events_per_request", "must be at most 1000");
        }
        let ingest = IngestSettings {
            ack,
            max_events_per_request: max_events as usize,
            max_event_id_len: p.nonzero("ingest.max_event_id_len", self.ingest.max_event_id_len)
                as usize,
            max_field_len: p.nonzero("ingest.max_field_len", self.ingest.max_field_len) as usize,
            max_data_entries: p.nonzero("ingest.max_data_entries", self.ingest.max_data_entries)
                as usize,
            past_window: Duration::from_secs(
                p.nonzero("ingest.past_window_secs", self.ingest.past_window_secs),
            ),
            future_skew: Duration::from_secs(self.ingest.future_skew_secs),
            dedupe_window: Duration::from_secs(
                p.nonzero("ingest.dedupe_window_secs", self.ingest.dedupe_window_secs),
            ),
        };
        if self.ingest.future_skew_secs > 300 {
            p.push(
                "ingest.future_skew_secs",
                "must be at most 300 (Credyt accepts 5 minutes ahead)",
            );
        }

        let identity = IdentitySettings {
            ttl: Duration::from_secs(p.nonzero("identity.ttl_secs", self.identity.ttl_secs)),
            negative_ttl: Duration::from_secs(p.nonzero(
                "identity.negative_ttl_secs",
                self.identity.negative_ttl_secs,
            )),
            max_entries: p.nonzero("identity.max_entries", self.identity.max_entries),
        };

        let sync = match self.outbox.sync.as_str() {
            "always" => SyncMode::Always,
            "interval" => SyncMode::Interval,
            other => {
                p.push(
                    "outbox.sync",
                    format!("`{other}` is not one of: always, interval"),
                );
                SyncMode::Interval
            }
        };
        let outbox = OutboxSettings {
            dir: resolve(&self.outbox.dir),
            sync,
            sync_interval: p.positive_ms("outbox.sync_interval_ms", self.outbox.sync_interval_ms),
            max_pending: p.nonzero("outbox.max_pending", self.outbox.max_pending) as usize,
            max_group: p.nonzero("outbox.max_group", self.outbox.max_group) as usize,
            forwarder: self.outbox.forwarder,
            forwarder_concurrency: match self.outbox.forwarder_concurrency {
                Some(fixed) => {
                    let fixed = p.nonzero("outbox.forwarder_concurrency", fixed) as usize;
                    (fixed, fixed)
                }
                None => (
                    p.nonzero(
                        "outbox.forwarder_concurrency_min",
                        self.outbox.forwarder_concurrency_min,
                    ) as usize,
                    p.nonzero(
                        "outbox.forwarder_concurrency_max",
                        self.outbox.forwarder_concurrency_max,
                    ) as usize,
                ),
            },
            retry_max_age: p.positive_ms("outbox.retry_max_age_ms", self.outbox.retry_max_age_ms),
            coalesce_window: (self.outbox.coalesce_window_ms > 0)
                .then(|| Duration::from_millis(self.outbox.coalesce_window_ms)),
        };

        if self.outbox.coalesce_window_ms > 60_000 {
            p.push("outbox.coalesce_window_ms", "must be at most 60000");
        }
        let (min, max) = outbox.forwarder_concurrency;
        if min > max {
            p.push(
                "outbox.forwarder_concurrency_min",
                format!("{min} is above outbox.forwarder_concurrency_max ({max})"),
            );
        }
        if max > 16_384 {
            p.push(
                "outbox.forwarder_concurrency_max",
                "must be at most 16384 (each slot is a connection to credyt)",
            );
        }

        let webhooks = self.webhooks.validate(&mut p, &resolve);
        let gateway = GatewaySettings {
            default_quota: crate::ratelimit::TenantQuota {
                per_second: nonzero_u32(&mut p, "gateway.per_second", self.gateway.per_second),
                burst: nonzero_u32(&mut p, "gateway.burst", self.gateway.burst),
            },
        };

        let balance = BalanceSettings {
            ttl: Duration::from_millis(p.nonzero("balance.ttl_ms", self.balance.ttl_ms)),
            unknown_ttl: Duration::from_millis(
                p.nonzero("balance.unknown_ttl_ms", self.balance.unknown_ttl_ms),
            ),
        };

        let rate_limit = RateLimitDefaults {
            per_second: nonzero_u32(&mut p, "rate_limit.per_second", self.rate_limit.per_second),
            burst: nonzero_u32(&mut p, "rate_limit.burst", self.rate_limit.burst),
        };

        let admin = AdminSettings {
            token: admin_token(&mut p, self.admin.token),
        };

        let max_tenant_labels = p.nonzero(
            "telemetry.max_tenant_labels",
            self.telemetry.max_tenant_labels,
        );
        if max_tenant_labels > MAX_TENANT_LABELS {
            p.push(
                "telemetry.max_tenant_labels",
                format!("must be at most {MAX_TENANT_LABELS}"),
            );
        }
        let telemetry = TelemetrySettings {
            per_tenant_metrics: self.telemetry.per_tenant_metrics,
            max_tenant_labels: max_tenant_labels as usize,
            traces: super::traces::resolve(&mut p, &self.telemetry, otel),
        };

        p.into_result(Settings {
            server,
            log: LogSettings {
                format,
                filter: self.log.filter,
            },
            credyt,
            tenants,
            pricing,
            ingest,
            identity,
            outbox,
            rate_limit,
            admin,
            telemetry,
            shutdown,
            webhooks,
            gateway,
            balance,
        })
    }
}
