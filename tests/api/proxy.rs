//! Test harness for the proxy: the real emulator and the real proxy on 127.0.0.1:0, with
//! tenants created through the emulator's API and a tenants file written to a temp dir.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use credyt_proxy::app::Application;
use credyt_proxy::config::Settings;
use credyt_proxy::emulator::{self, EmulatorConfig, RunningEmulator};
use rust_decimal::Decimal;
use serde_json::{json, Value};

pub const PLATFORM_KEY: &str = "platform-test-key";

/// One tenant of the test world.
pub struct TestTenant {
    pub key: String,
    pub account: String,
}

/// The emulator, the proxy, and two tenants (A with an explicit account, B resolved through
/// its external id).
pub struct World {
    pub emulator: RunningEmulator,
    pub app: Application,
    pub a: TestTenant,
    pub b: TestTenant,
    pub http: reqwest::Client,
    /// Holds the tenants file and the outbox; removed when the world is dropped.
    _dir: tempfile::TempDir,
    ack: &'static str,
    extra_config: String,
    credyt_config: String,
    ingest: Ingest,
}

/// The pricing directory and the extra `[ingest]` lines of a world's proxy.
#[derive(Clone, Default)]
pub struct Ingest {
    /// Default: the shipped `pricing/`.
    pub pricing_dir: Option<PathBuf>,
    /// Extra lines inside the `[ingest]` table.
    pub config: String,
}

/// A world whose proxy is stopped (see [`World::park`]): the emulator, the tenants and the
/// data directory (with the outbox) stay, so a new proxy can be started on them.
pub struct Parked {
    pub emulator: RunningEmulator,
    pub a: TestTenant,
    pub b: TestTenant,
    pub http: reqwest::Client,
    dir: tempfile::TempDir,
    ack: &'static str,
    extra_config: String,
    credyt_config: String,
    ingest: Ingest,
}

/// Options of a test world.
pub struct Options {
    pub ack: &'static str,
    pub rate_a: (u32, u32),
    /// Whole extra TOML tables appended to the config.
    pub extra_config: String,
    /// Extra lines inside the `[outbox]` table.
    pub outbox_config: String,
    /// Tenant B's `forward` mode.
    pub forward_b: &'static str,
    /// The lines of the `[credyt]` table after `base_url` (default: the platform key and a
    /// 5 s timeout).
    pub credyt_config: String,
    /// Files written into the world's directory before the proxy starts (name, content).
    pub files: Vec<(&'static str, String)>,
    /// Extra lines of tenant A's and tenant B's tenants-file entries (e.g. `gate = {...}`).
    pub tenant_a_extra: String,
    pub tenant_b_extra: String,
    pub ingest: Ingest,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ack: "upstream",
            rate_a: (10_000, 10_000),
            extra_config: String::new(),
            outbox_config: String::new(),
            forward_b: "charges",
            credyt_config: format!("api_key = \"{PLATFORM_KEY}\"\ntimeout_ms = 5000"),
            files: Vec::new(),
            tenant_a_extra: String::new(),
            tenant_b_extra: String::new(),
            ingest: Ingest::default(),
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub async fn start_emulator() -> RunningEmulator {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    emulator::start(
        EmulatorConfig {
            platform_keys: vec![PLATFORM_KEY.to_string()],
            ..Default::default()
        },
        listener,
    )
    .await
    .unwrap()
}

/// `POST` to the emulator with the platform key (and an account, if given); returns the JSON.
pub async fn emu_post(
    http: &reqwest::Client,
    emu: &RunningEmulator,
    path: &str,
    account: Option<&str>,
    body: Value,
) -> Value {
    let mut req = http
        .post(format!("{}{}", emu.url(), path))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .json(&body);
    if let Some(a) = account {
        req = req.header("X-CREDYT-ACCOUNT", a);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap_or(Value::Null)
}

/// `GET` of an emulator control path (`/_emulator/...`) with the platform key.
pub async fn emu_get(http: &reqwest::Client, emu: &RunningEmulator, path: &str) -> Value {
    http.get(format!("{}{path}", emu.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn emu_state(http: &reqwest::Client, emu: &RunningEmulator) -> Value {
    emu_get(http, emu, "/_emulator/state").await
}

/// The wallet account `default:<asset>` of `customer` in the emulator's state:
/// (available, charge count, charge total).
pub fn wallet(state: &Value, customer: &str, asset: &str) -> Option<(Decimal, u64, Decimal)> {
    let dec = |v: &Value| -> Decimal { v.to_string().trim_matches('"').parse().unwrap() };
    for account in state["accounts"].as_array()? {
        for c in account["customers"].as_array()? {
            if c["id"] == customer {
                for w in c["wallet"].as_array()? {
                    if w["asset"] == asset {
                        return Some((
                            dec(&w["available"]),
                            w["charges"]["count"].as_u64().unwrap(),
                            dec(&w["charges"]["total"]),
                        ));
                    }
                }
                return None;
            }
        }
    }
    None
}

/// The account (in the emulator's state) that holds `customer`.
pub fn account_of(state: &Value, customer: &str) -> Option<String> {
    state["accounts"].as_array()?.iter().find_map(|a| {
        a["customers"]
            .as_array()?
            .iter()
            .any(|c| c["id"] == customer)
            .then(|| a["id"].as_str().unwrap().to_string())
    })
}

/// Sum of charge counts over every customer and asset.
pub fn total_charges(state: &Value) -> u64 {
    state["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["customers"].as_array().unwrap().iter())
        .flat_map(|c| c["wallet"].as_array().unwrap().iter())
        .map(|w| w["charges"]["count"].as_u64().unwrap())
        .sum()
}

impl World {
    pub async fn start() -> World {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> World {
        let emulator = start_emulator().await;
        let http = reqwest::Client::new();
        let dir = tempfile::tempdir().unwrap();
        let acc_a = emu_post(
            &http,
            &emulator,
            "/accounts",
            None,
            json!({"name": "Tenant A", "external_id": "tenant-a"}),
        )
        .await;
        let acc_b = emu_post(
            &http,
            &emulator,
            "/accounts",
            None,
            json!({"name": "Tenant B", "external_id": "tenant-b"}),
        )
        .await;
        let (key_a, hash_a) = credyt_proxy::identity::tenants::generate_key();
        let (key_b, hash_b) = credyt_proxy::identity::tenants::generate_key();
        let tenants = format!(
            "[[tenants]]\nid = \"tenant-a\"\nkey_hashes = [\"{hash_a}\"]\naccount = \"{}\"\ncreate_customers = true\n\
             rate_limit = {{ per_second = {}, burst = {} }}\n{}\n\n\
             [[tenants]]\nid = \"tenant-b\"\nkey_hashes = [\"{hash_b}\"]\naccount_external_id = \"tenant-b\"\ncreate_customers = false\nforward = \"{}\"\n{}\n",
            acc_a["id"].as_str().unwrap(),
            opts.rate_a.0,
            opts.rate_a.1,
            opts.tenant_a_extra,
            opts.forward_b,
            opts.tenant_b_extra,
        );
        std::fs::write(dir.path().join("tenants.toml"), tenants).unwrap();
        for (name, content) in &opts.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let app = build_app(
            &emulator,
            dir.path(),
            opts.ack,
            &opts.outbox_config,
            &opts.credyt_config,
            &opts.extra_config,
            &opts.ingest,
        )
        .await;
        World {
            a: TestTenant {
                key: key_a,
                account: acc_a["id"].as_str().unwrap().to_string(),
            },
            b: TestTenant {
                key: key_b,
                account: acc_b["id"].as_str().unwrap().to_string(),
            },
            emulator,
            app,
            http,
            _dir: dir,
            ack: opts.ack,
            extra_config: opts.extra_config,
            credyt_config: opts.credyt_config,
            ingest: opts.ingest,
        }
    }

    /// The outbox directory (`outbox.dir` of the proxy's configuration).
    pub fn outbox_dir(&self) -> PathBuf {
        self._dir.path().join("outbox")
    }

    /// The world's directory (tenants file, outbox, files of [`Options::files`]).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The tenants file the proxy serves (hot reloaded).
    pub fn tenants_file(&self) -> PathBuf {
        self._dir.path().join("tenants.toml")
    }

    /// Edits the tenants file with `edit` (which must change it) and waits until the proxy
    /// serves the new version (its watcher polls every `tenants.reload_interval_ms`).
    pub async fn edit_tenants(&self, edit: impl FnOnce(String) -> String) {
        let path = self.tenants_file();
        let old = std::fs::read_to_string(&path).unwrap();
        let new = edit(old.clone());
        assert_ne!(old, new, "the edit must change the tenants file");
        let tenants = self.app.state().tenants.clone();
        let before = tenants.current().content_hash().to_string();
        let tmp = path.with_extension("toml.new");
        std::fs::write(&tmp, &new).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eventually(
            std::time::Duration::from_secs(10),
            "the tenants reload",
            || {
                let tenants = tenants.clone();
                let before = before.clone();
                async move {
                    assert!(tenants.last_error().is_none(), "{:?}", tenants.last_error());
                    (tenants.current().content_hash() != before).then_some(())
                }
            },
        )
        .await;
    }

    /// `http://` + the proxy's admin address.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.app.admin_addr())
    }

    /// Stops the proxy (`Application::stop`) and keeps everything else.
    pub async fn park(self) -> Parked {
        self.app.stop().await;
        Parked {
            emulator: self.emulator,
            a: self.a,
            b: self.b,
            http: self.http,
            dir: self._dir,
            ack: self.ack,
            extra_config: self.extra_config,
            credyt_config: self.credyt_config,
            ingest: self.ingest,
        }
    }

    /// Stops the proxy and starts a new one on the same data directory, with `outbox_config`
    /// (lines inside `[outbox]`) replacing the previous one.
    pub async fn restart(self, outbox_config: &str) -> World {
        self.park().await.resume(outbox_config).await
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.app.tenant_addr())
    }

    /// Creates a customer with `external_id` under `account` in the emulator, funded with
    /// `usd` USD; returns its id.
    pub async fn customer(&self, account: &str, external_id: &str, usd: &str) -> String {
        let c = emu_post(
            &self.http,
            &self.emulator,
            "/customers",
            Some(account),
            json!({"name": external_id, "external_id": external_id}),
        )
        .await;
        let id = c["id"].as_str().unwrap().to_string();
        let amount: Value = serde_json::from_str(usd).unwrap();
        emu_post(
            &self.http,
            &self.emulator,
            &format!("/customers/{id}/wallet/adjustments"),
            Some(account),
            json!({"transaction_id": format!("fund-{id}"), "asset": "USD", "amount": amount, "reason": "gift"}),
        )
        .await;
        id
    }

    /// POSTs `body` to the proxy's `path` with `key`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{}", self.proxy_url(), path))
            .header("X-CREDYT-API-KEY", key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn state(&self) -> Value {
        emu_state(&self.http, &self.emulator).await
    }

    /// Replaces the emulator's fault rules (`{"rules": [...]}`); `None` clears them.
    pub async fn set_faults(&self, rules: Option<Value>) {
        match rules {
            Some(r) => emu_faults(&self.http, &self.emulator, r["rules"].clone()).await,
            None => emu_clear_faults(&self.http, &self.emulator).await,
        }
    }

    /// Every request the emulator logged (its ring holds the newest 10,000).
    pub async fn requests(&self) -> Vec<Value> {
        let log = emu_get(
            &self.http,
            &self.emulator,
            "/_emulator/requests?limit=100000",
        )
        .await;
        log["requests"].as_array().unwrap().clone()
    }

    pub async fn stop(self) {
        self.app.stop().await;
        self.emulator.stop().await;
    }
}

impl Parked {
    pub fn outbox_dir(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }

    pub async fn emulator_state(&self) -> Value {
        emu_state(&self.http, &self.emulator).await
    }

    /// Starts a new proxy on the same data directory and emulator, with `outbox_config`
    /// (lines inside `[outbox]`) and the world's original extra tables.
    pub async fn resume(self, outbox_config: &str) -> World {
        let app = build_app(
            &self.emulator,
            self.dir.path(),
            self.ack,
            outbox_config,
            &self.credyt_config,
            &self.extra_config,
            &self.ingest,
        )
        .await;
        World {
            emulator: self.emulator,
            app,
            a: self.a,
            b: self.b,
            http: self.http,
            _dir: self.dir,
            ack: self.ack,
            extra_config: self.extra_config,
            credyt_config: self.credyt_config,
            ingest: self.ingest,
        }
    }
}

/// The proxy's configuration for a test world: `outbox_config` goes inside `[outbox]`,
/// `extra_config` (whole tables) after it.
pub fn proxy_config(
    emulator: &RunningEmulator,
    ack: &str,
    outbox_config: &str,
    credyt_config: &str,
    extra_config: &str,
) -> String {
    proxy_config_with(
        emulator,
        ack,
        outbox_config,
        credyt_config,
        extra_config,
        &Ingest::default(),
    )
}

/// As [`proxy_config`], with another pricing directory and extra `[ingest]` lines.
pub fn proxy_config_with(
    emulator: &RunningEmulator,
    ack: &str,
    outbox_config: &str,
    credyt_config: &str,
    extra_config: &str,
    ingest: &Ingest,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [log]\nfilter = \"warn\"\n\
         [credyt]\nbase_url = \"{}\"\n{credyt_config}\n\
         [tenants]\nfile = \"tenants.toml\"\n\
         [pricing]\ndir = \"{}\"\n\
         [ingest]\nack = \"{}\"\n{}\n\
         [outbox]\ndir = \"outbox\"\n{}\n{}",
        emulator.url(),
        ingest
            .pricing_dir
            .clone()
            .unwrap_or_else(|| repo().join("pricing"))
            .display(),
        ack,
        ingest.config,
        outbox_config,
        extra_config,
    )
}

async fn build_app(
    emulator: &RunningEmulator,
    dir: &Path,
    ack: &str,
    outbox_config: &str,
    credyt_config: &str,
    extra_config: &str,
    ingest: &Ingest,
) -> Application {
    let config = proxy_config_with(
        emulator,
        ack,
        outbox_config,
        credyt_config,
        extra_config,
        ingest,
    );
    let settings = Settings::from_toml(&config, dir, Some(Default::default())).unwrap();
    Application::build(settings).await.unwrap()
}

/// Creates tenant A's connected account (`external_id` `tenant-a`) at the emulator; its id.
pub async fn tenant_a_account(http: &reqwest::Client, emu: &RunningEmulator) -> String {
    emu_account(http, emu, "Tenant A", "tenant-a").await
}

/// Creates a connected account at the emulator; its id.
pub async fn emu_account(
    http: &reqwest::Client,
    emu: &RunningEmulator,
    name: &str,
    external_id: &str,
) -> String {
    let acc = emu_post(
        http,
        emu,
        "/accounts",
        None,
        json!({"name": name, "external_id": external_id}),
    )
    .await;
    acc["id"].as_str().unwrap().to_string()
}

/// Replaces the emulator's fault rules (`PUT /_emulator/faults`).
pub async fn emu_faults(http: &reqwest::Client, emu: &RunningEmulator, rules: Value) {
    let resp = http
        .put(format!("{}/_emulator/faults", emu.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .json(&json!({ "rules": rules }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "faults: {}", resp.status());
}

/// Clears the emulator's fault rules.
pub async fn emu_clear_faults(http: &reqwest::Client, emu: &RunningEmulator) {
    let resp = http
        .delete(format!("{}/_emulator/faults", emu.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "faults: {}", resp.status());
}

/// The emulator's request log (`GET /_emulator/requests?limit=N`).
pub async fn emu_requests(http: &reqwest::Client, emu: &RunningEmulator, limit: usize) -> Value {
    emu_get(http, emu, &format!("/_emulator/requests?limit={limit}")).await
}

/// Creates a customer with `external_id` under `account` directly in the emulator (no
/// funding: charges may take a wallet below zero); returns its id.
pub async fn emu_customer(
    http: &reqwest::Client,
    emu: &RunningEmulator,
    account: &str,
    external_id: &str,
) -> String {
    let c = emu_post(
        http,
        emu,
        "/customers",
        Some(account),
        json!({"name": external_id, "external_id": external_id}),
    )
    .await;
    c["id"].as_str().unwrap().to_string()
}

/// The charges of `customer`'s USD wallet: (count, exact total); (0, 0) without a wallet.
pub fn usd_charges(state: &Value, customer: &str) -> (u64, Decimal) {
    wallet(state, customer, "USD").map_or((0, Decimal::ZERO), |(_, n, t)| (n, t))
}

/// The proxy's `/metrics` (admin port), in the Prometheus text format.
pub async fn scrape(w: &World) -> String {
    let resp = w
        .http
        .get(format!("{}/metrics", w.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

/// One unlabelled sample of the proxy's `/metrics` (admin port), if present.
pub async fn metric(http: &reqwest::Client, admin_url: &str, name: &str) -> Option<u64> {
    let text = http
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// Waits until the outbox is empty (nothing pending or leased).
pub async fn drained(w: &World, limit: std::time::Duration) {
    let admin = w.admin_url();
    eventually(limit, "the outbox to drain", || async {
        (metric(&w.http, &admin, "credyt_proxy_outbox_depth").await? == 0).then_some(())
    })
    .await;
}

/// Asserts that each customer was charged exactly `expected[customer]` events at 0.50 USD
/// (`video_promoted`, one fee) and that nothing else was charged anywhere.
pub async fn assert_charged_exactly(w: &World, expected: &std::collections::BTreeMap<String, u64>) {
    let price = Decimal::new(50, 2);
    let state = w.state().await;
    for (customer, n) in expected {
        assert_eq!(
            usd_charges(&state, customer),
            (*n, price * Decimal::from(*n)),
            "charges of {customer}"
        );
    }
    assert_eq!(
        total_charges(&state),
        expected.values().sum::<u64>(),
        "charges outside the acknowledged events"
    );
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An RFC 3339 timestamp `secs_ago` seconds before now.
pub fn ago(secs_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(secs_ago))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
