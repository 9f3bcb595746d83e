//! Configuration: a TOML file plus `CREDYT_PROXY__SECTION__KEY` environment overrides, read by the
//! `config` crate into raw serde mirror structs ([`raw`]) and then validated into the typed
//! [`Settings`] the rest of the proxy uses.
//!
//! Contract: [`Settings::load`] either returns settings in which every value has been checked
//! (addresses parse, durations are non-zero where they must be, the platform key is present,
//! enumerations are known) or a [`ConfigErrors`] that lists *every* problem found, each with the
//! key it concerns: unknown keys and values of the wrong type anywhere (file or environment)
//! as well as values that fail validation, never only the first. Unknown keys are errors
//! (`deny_unknown_fields`), so a typo never silently falls back to a default.

pub mod raw;
#[cfg(test)]
mod reference;
pub mod traces;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};

/// The prefix of environment overrides: `CREDYT_PROXY__CREDYT__API_KEY=...`.
pub const ENV_PREFIX: &str = "CREDYT_PROXY";

/// Every problem found in a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One configuration problem: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {}: {}", e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A secret that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// When the proxy answers the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After Credyt confirmed every charge of the request.
    Upstream,
    /// After every debit of the request is durably recorded in the local outbox.
    Durable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Always,
    Interval,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The tenant-facing port (`POST /events`, `POST /v1/events`, `POST /v1/quote`).
    pub listen: SocketAddr,
    /// The operator port (`/livez`, `/readyz`, `/metrics`, `/admin/dead-letters`).
    pub admin_listen: SocketAddr,
    pub workers: usize,
    pub max_body_bytes: usize,
}

/// The pod-shutdown sequence (see `app::Application::stop`).
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// After the first signal: not ready, still serving, for this long.
    pub drain_delay: Duration,
    /// From the first signal to the exit (`server.shutdown_grace_ms`), the drain delay included.
    pub grace: Duration,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone)]
pub struct CredytSettings {
    /// Base URL of the Credyt API, without a trailing slash.
    pub base_url: String,
    pub api_key: Secret,
    /// Where the key is read from (and re-read) instead of `api_key`, when set.
    pub api_key_file: Option<PathBuf>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct TenantsSettings {
    pub file: PathBuf,
    pub reload_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct PricingSettings {
    pub dir: PathBuf,
    pub reload_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub ack: AckMode,
    pub max_events_per_request: usize,
    pub max_event_id_len: usize,
    pub max_field_len: usize,
    pub max_data_entries: usize,
    /// How old an event's `occurred_at` may be.
    pub past_window: Duration,
    /// How far in the future an event's `occurred_at` may be.
    pub future_skew: Duration,
    /// How long a seen event id is remembered (the dedupe window).
    pub dedupe_window: Duration,
}

#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: u64,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    pub dir: PathBuf,
    pub sync: SyncMode,
    pub sync_interval: Duration,
    pub max_pending: usize,
    pub max_group: usize,
    pub forwarder: bool,
    /// Bounds (min, max) of the deliveries in flight; equal bounds fix it.
    pub forwarder_concurrency: (usize, usize),
    /// How long a record may keep failing transiently before it becomes a dead letter.
    pub retry_max_age: Duration,
    pub coalesce_window: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct RateLimitDefaults {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The operator API on the admin port (dead letters).
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// The bearer token of `/admin/...`; `None` disables those endpoints (403). Usually set
    /// from the environment: `CREDYT_PROXY__ADMIN__TOKEN`.
    pub token: Option<Secret>,
}

/// `[telemetry]`: what the proxy reports about itself besides its logs.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// Label event, fee and rate-limit counters with the tenant id (from the tenants file).
    pub per_tenant_metrics: bool,
    /// Tenants with a label of their own; the others share `tenant="other"`.
    pub max_tenant_labels: usize,
    /// OTLP trace export; `None` (no exporter, nothing buffered) unless an endpoint is
    /// configured. See [`traces`].
    pub traces: Option<traces::TraceSettings>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            per_tenant_metrics: false,
            max_tenant_labels: 100,
            traces: None,
        }
    }
}

/// The webhook relay (see `crate::webhooks`); present when `credyt_secrets` is set.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Secrets of the platform's `connect: true` destination(s) in Credyt; a webhook is
    /// accepted when any of them signed it (rotation).
    pub credyt_secrets: Vec<Secret>,
    /// The relay's own listener (the one address exposed to Credyt).
    pub listen: SocketAddr,
    pub path: String,
    /// The relay's outbox directory (received webhooks and their dedupe ids).
    pub dir: PathBuf,
    /// Largest accepted `|now - t|` of a `Credyt-Signature`.
    pub tolerance: Duration,
    pub max_body_bytes: usize,
    /// How long webhook ids are remembered (at least 7 days).
    pub dedupe_window: Duration,
    /// Timeout of one delivery attempt to a tenant.
    pub attempt_timeout: Duration,
    /// The waits before each retry after the first attempt; after the last, a dead letter.
    pub retry_schedule: Vec<Duration>,
    /// Deliveries in flight to one tenant at once.
    pub per_tenant_concurrency: usize,
    pub max_pending: usize,
}

/// The tenant gateway (see `crate::gateway`).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// A tenant's gateway quota unless its tenants-file entry sets `gateway.rate_limit`.
    pub default_quota: crate::ratelimit::TenantQuota,
}

/// Balance gating's view of Credyt's balances (see `crate::balance`).
#[derive(Debug, Clone)]
pub struct BalanceSettings {
    /// How long a balance read from Credyt is used before it is read again.
    pub ttl: Duration,
    /// How long a failed read is remembered: meanwhile `on_unknown` decides without asking.
    pub unknown_ttl: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub credyt: CredytSettings,
    pub tenants: TenantsSettings,
    pub pricing: PricingSettings,
    pub ingest: IngestSettings,
    pub identity: IdentitySettings,
    pub outbox: OutboxSettings,
    pub rate_limit: RateLimitDefaults,
    pub admin: AdminSettings,
    pub telemetry: TelemetrySettings,
    pub shutdown: ShutdownSettings,
    /// `None`: the webhook relay is off.
    pub webhooks: Option<WebhookSettings>,
    pub gateway: GatewaySettings,
    pub balance: BalanceSettings,
}

impl Settings {
    /// Loads `path` plus the process environment's `CREDYT_PROXY__...` overrides.
    pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
        Self::load_from(path, None)
    }

    /// Like [`Settings::load`], with an explicit environment instead of the process's (tests).
    pub fn load_from(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, base, env)
    }

    /// Parses and validates TOML text; relative paths in it are taken relative to `base`. `env`
    /// (the process environment when `None`) also supplies the standard `OTEL_*` variables.
    pub fn from_toml(
        text: &str,
        base: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, ConfigErrors> {
        let mut environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        let otel = traces::otel_vars(env.as_ref());
        if let Some(env) = env {
            environment = environment.source(Some(env));
        }
        // Only a file that is not TOML at all stops here; everything else is collected.
        let config = Config::builder()
            .add_source(File::from_str(text, FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "(file)".into(),
                    message: e.to_string(),
                }])
            })?;
        let (raw, problems) = raw::RawSettings::from_config(config);
        raw.validate_with(base, problems, &otel)
    }
}

/// Collects problems while reading and validating; every check records and goes on.
#[derive(Default)]
pub(crate) struct Problems {
    found: Vec<ConfigError>,
    /// Keys that could not be read: their defaults are not judged again.
    unreadable: Vec<String>,
}

impl Problems {
    /// A key that is unknown or has a value of the wrong type.
    pub(crate) fn parse_problem(&mut self, key: &str, message: impl Into<String>) {
        self.unreadable.push(key.to_string());
        self.found.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    pub(crate) fn push(&mut self, key: &str, message: impl Into<String>) {
        // `credyt.api_key` is not judged when `credyt.api_key` or all of `credyt` was unreadable.
        let judged_already = self
            .unreadable
            .iter()
            .any(|k| key == k || (key.starts_with(k.as_str()) && key[k.len()..].starts_with('.')));
        if judged_already {
            return;
        }
        self.found.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    pub(crate) fn addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.push(
                key,
                format!("`{value}` is not a socket address like 127.0.0.1:8080"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    pub(crate) fn positive_ms(&mut self, key: &str, ms: u64) -> Duration {
        if ms == 0 {
            self.push(key, "must be greater than 0");
        }
        Duration::from_millis(ms)
    }

    pub(crate) fn nonzero(&mut self, key: &str, value: u64) -> u64 {
        if value == 0 {
            self.push(key, "must be greater than 0");
        }
        value
    }

    pub(crate) fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.found.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.found))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [credyt]
        base_url = "http://127.0.0.1:1"
        api_key = "key_test"
    "#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let s = Settings::from_toml(MINIMAL, Path::new("/etc/cp"), Some(HashMap::new())).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.ingest.ack, AckMode::Durable);
        assert_eq!(s.ingest.max_events_per_request, 100);
        assert_eq!(s.pricing.dir, Path::new("/etc/cp/pricing"));
        assert_eq!(s.credyt.api_key.expose(), "key_test");
        assert_eq!(format!("{:?}", s.credyt.api_key), "Secret(***)");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = HashMap::from([
            (
                "CREDYT_PROXY__SERVER__LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "CREDYT_PROXY__CREDYT__API_KEY".to_string(),
                "key_env".to_string(),
            ),
        ]);
        let s = Settings::from_toml(MINIMAL, Path::new("."), Some(env)).unwrap();
        assert_eq!(s.server.listen.port(), 0);
        assert_eq!(s.credyt.api_key.expose(), "key_env");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [server]
            listen = "not-an-address"
            workers = 0
            [credyt]
            base_url = "ftp://x"
            api_key = ""
            [ingest]
            ack = "sometimes"
        "#;
        let errs = Settings::from_toml(text, Path::new("."), Some(HashMap::new())).unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "server.listen",
            "server.workers",
            "credyt.base_url",
            "credyt.api_key",
            "ingest.ack",
        ] {
            assert!(keys.contains(&key), "{key} missing from {errs}");
        }
    }

    #[test]
    fn a_base_url_must_parse_as_an_http_url_without_query() {
        for bad in [
            "http://exa mple.com",
            "https://",
            "https://api.credyt.ai?x=1",
            "mailto:a@b.c",
        ] {
            let text = format!("[credyt]\nbase_url = \"{bad}\"\napi_key = \"k\"\n");
            let errs =
                Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap_err();
            assert!(
                errs.0.iter().any(|e| e.key == "credyt.base_url"),
                "{bad}: {errs}"
            );
        }
    }

    #[test]
    fn admin_token_is_off_by_default_and_comes_from_the_environment() {
        let s = Settings::from_toml(MINIMAL, Path::new("."), Some(HashMap::new())).unwrap();
        assert!(s.admin.token.is_none());
        let env = HashMap::from([(
            "CREDYT_PROXY__ADMIN__TOKEN".to_string(),
            "adm_0123456789abcdef".to_string(),
        )]);
        let text = format!("{MINIMAL}\n[admin]\ntoken = \"file-token-0123456789\"\n");
        let s = Settings::from_toml(&text, Path::new("."), Some(env)).unwrap();
        let token = s.admin.token.as_ref().unwrap();
        assert_eq!(token.expose(), "adm_0123456789abcdef");
        assert!(!format!("{s:?}").contains("adm_0123456789abcdef"));
    }

    #[test]
    fn admin_token_must_be_long_and_printable_and_is_never_echoed() {
        for bad in ["", "short", "has a space in the middle"] {
            let env = HashMap::from([("CREDYT_PROXY__ADMIN__TOKEN".to_string(), bad.to_string())]);
            let errs = Settings::from_toml(MINIMAL, Path::new("."), Some(env)).unwrap_err();
            assert!(
                errs.0.iter().any(|e| e.key == "admin.token"),
                "{bad:?}: {errs}"
            );
            if !bad.is_empty() {
                assert!(!errs.to_string().contains(bad), "{errs}");
            }
        }
    }

    #[test]
    fn telemetry_per_tenant_metrics_are_off_by_default_and_capped() {
        let s = Settings::from_toml(MINIMAL, Path::new("."), Some(HashMap::new())).unwrap();
        assert!(!s.telemetry.per_tenant_metrics);
        assert_eq!(s.telemetry.max_tenant_labels, 100);
        assert!(s.telemetry.traces.is_none());
        let text =
            format!("{MINIMAL}\n[telemetry]\nper_tenant_metrics = true\nmax_tenant_labels = 5\n");
        let s = Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap();
        assert!(s.telemetry.per_tenant_metrics);
        assert_eq!(s.telemetry.max_tenant_labels, 5);
        for bad in [0, 10_001] {
            let text = format!("{MINIMAL}\n[telemetry]\nmax_tenant_labels = {bad}\n");
            let errs =
                Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap_err();
            assert!(
                errs.0
                    .iter()
                    .any(|e| e.key == "telemetry.max_tenant_labels"),
                "{bad}: {errs}"
            );
        }
    }

    #[test]
    fn unknown_keys_wrong_types_and_invalid_values_are_all_reported_at_once() {
        let text = r#"
            colour = "blue"
            [server]
            listen_addr = "127.0.0.1:1"
            workers = "many"
            max_body_bytes = -1
            shutdown_grace_ms = 0
            [credyt]
            base_url = "http://127.0.0.1:1"
            api_key = "key_test"
            timeout = 5
            [ingest]
            ack = "sometimes"
            [outbox]
            forwarder = "maybe"
            segment_bytes = 1
            [rate_limit]
            per_second = "fast"
        "#;
        let env = HashMap::from([
            (
                "CREDYT_PROXY__IDENTITY__TTL_SECS".to_string(),
                "ten".to_string(),
            ),
            ("CREDYT_PROXY__LOG__COLOUR".to_string(), "red".to_string()),
        ]);
        let errs = Settings::from_toml(text, Path::new("."), Some(env)).unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        let expected = [
            "colour",
            "server.listen_addr",
            "server.workers",
            "server.max_body_bytes",
            "server.shutdown_grace_ms",
            "credyt.timeout",
            "ingest.ack",
            "outbox.forwarder",
            "outbox.segment_bytes",
            "rate_limit.per_second",
            "identity.ttl_secs",
            "log.colour",
        ];
        for key in expected {
            assert!(keys.contains(&key), "{key} missing from {errs}");
        }
        // One problem per key: a value that could not be read is not judged again as its
        // default would be.
        assert_eq!(errs.0.len(), expected.len(), "{errs}");
        let text = errs.to_string();
        assert!(
            text.contains("server.listen_addr: unknown key; [server] has: listen,"),
            "{text}"
        );
        assert!(
            text.contains("log.colour: unknown key (set in the environment)"),
            "{text}"
        );
        assert!(text.contains("identity.ttl_secs: expected"), "{text}");
    }

    #[test]
    fn every_section_of_the_raw_settings_is_read() {
        let text: String = raw::section_names()
            .iter()
            .map(|s| format!("[{s}]\n"))
            .collect();
        let env = HashMap::from([(
            "CREDYT_PROXY__CREDYT__API_KEY".to_string(),
            "key_test".to_string(),
        )]);
        Settings::from_toml(&text, Path::new("."), Some(env)).unwrap();
    }

    #[test]
    fn a_section_that_is_not_a_table_is_one_problem() {
        let text = format!("{MINIMAL}\nserver = 5\n");
        let errs = Settings::from_toml(&text, Path::new("."), Some(HashMap::new()));
        // TOML itself refuses a key defined twice; a lone scalar section is ours to report.
        let errs = errs.unwrap_err();
        assert!(!errs.0.is_empty(), "{errs}");
        let text = "server = 5\n[credyt]\napi_key = \"k\"\n";
        let errs = Settings::from_toml(text, Path::new("."), Some(HashMap::new())).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "server");
    }

    #[test]
    fn a_drain_delay_must_leave_part_of_the_grace() {
        let text = format!(
            "{MINIMAL}\n[server]\nshutdown_grace_ms = 5000\n[shutdown]\ndrain_delay_ms = 5000\n"
        );
        let errs = Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "shutdown.drain_delay_ms");
        let text = text.replace("drain_delay_ms = 5000", "drain_delay_ms = 4999");
        let s = Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap();
        assert_eq!(s.shutdown.drain_delay, Duration::from_millis(4999));
        assert_eq!(s.shutdown.grace, Duration::from_millis(5000));
    }

    #[test]
    fn a_zero_shutdown_grace_is_refused() {
        let text = format!("{MINIMAL}\n[server]\nshutdown_grace_ms = 0\n");
        let errs = Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "server.shutdown_grace_ms");
    }

    #[test]
    fn the_placeholder_key_of_the_example_config_is_refused() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.toml");
        let errs = Settings::load_from(&example, Some(HashMap::new())).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "credyt.api_key");
        assert!(
            errs.0[0].message.contains("CREDYT_PROXY__CREDYT__API_KEY")
                && errs.0[0].message.contains("placeholder"),
            "{errs}"
        );
        // With the real key from the environment the example is a working configuration.
        let env = HashMap::from([(
            "CREDYT_PROXY__CREDYT__API_KEY".to_string(),
            "key_live_123".to_string(),
        )]);
        let s = Settings::load_from(&example, Some(env)).unwrap();
        assert_eq!(s.credyt.api_key.expose(), "key_live_123");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{MINIMAL}\n[server]\nlisten_addr = \"127.0.0.1:1\"\n");
        let errs = Settings::from_toml(&text, Path::new("."), Some(HashMap::new())).unwrap_err();
        assert!(errs.to_string().contains("listen_addr"), "{errs}");
    }
}
