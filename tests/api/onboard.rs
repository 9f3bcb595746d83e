//! Onboarding from the command line: the real `credyt-proxy tenant ...` and
//! `credyt-proxy webhooks register` binaries against a real emulator on 127.0.0.1:0, and a
//! real proxy started on the tenants file they wrote.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use credyt_proxy::app::Application;
use credyt_proxy::config::Settings;
use credyt_proxy::emulator::RunningEmulator;
use serde_json::{json, Value};

use super::proxy::{
    ago, emu_clear_faults, emu_faults, emu_post, emu_requests, eventually, repo, start_emulator,
    PLATFORM_KEY,
};

/// An operator's tenants file: comments and a tenant already onboarded by hand.
const HAND_WRITTEN: &str = "# tenants of this proxy; keep the comments\n\
[[tenants]]\n\
id = \"old-timer\"   # onboarded by hand\n\
key_hashes = [\"sha256:1111111111111111111111111111111111111111111111111111111111111111\"]\n\
account_external_id = \"old-timer-ext\"\n";

/// The emulator, a folder with the proxy's configuration (`config.toml`, its tenants file
/// `tenants.toml` next to it) and an HTTP client.
struct Onboarding {
    emulator: RunningEmulator,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Onboarding {
    /// The emulator and a config pointing at it; `tenants`: the tenants file's first content.
    async fn start(tenants: Option<&str>) -> Onboarding {
        let emulator = start_emulator().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), config_text(&emulator.url())).unwrap();
        if let Some(text) = tenants {
            std::fs::write(dir.path().join("tenants.toml"), text).unwrap();
        }
        Onboarding {
            emulator,
            dir,
            http: reqwest::Client::new(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn tenants_file(&self) -> PathBuf {
        self.dir.path().join("tenants.toml")
    }

    fn tenants_bytes(&self) -> Option<Vec<u8>> {
        std::fs::read(self.tenants_file()).ok()
    }

    /// Runs `credyt-proxy ARGS --config <the config>`.
    async fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.push("--config".into());
        all.push(self.config().display().to_string());
        run(all).await
    }

    /// The emulator's connected accounts with `external_id` (through `GET /accounts`).
    async fn accounts_with(&self, external_id: &str) -> Vec<Value> {
        let page: Value = self
            .http
            .get(format!("{}/accounts", self.emulator.url()))
            .query(&[("external_id", external_id)])
            .header("X-CREDYT-API-KEY", PLATFORM_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page["items"].as_array().unwrap().clone()
    }

    /// The logged requests to Credyt's `/accounts` (lookups and creations).
    async fn account_calls(&self) -> Vec<Value> {
        let log = emu_requests(&self.http, &self.emulator, 10_000).await;
        log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["path"] == "/accounts")
            .cloned()
            .collect()
    }

    /// A proxy started on the configuration (and so on the tenants file the commands wrote).
    async fn proxy(&self) -> Application {
        let settings = Settings::load_from(&self.config(), Some(Default::default())).unwrap();
        Application::build(settings).await.unwrap()
    }
}

fn config_text(base_url: &str) -> String {
    config_with_tenants(base_url, "tenants.toml")
}

/// The configuration with `tenants.file = tenants`.
fn config_with_tenants(base_url: &str, tenants: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [log]\nfilter = \"warn\"\n\
         [credyt]\nbase_url = \"{base_url}\"\napi_key = \"{PLATFORM_KEY}\"\ntimeout_ms = 5000\n\
         [tenants]\nfile = \"{tenants}\"\nreload_interval_ms = 100\n\
         [pricing]\ndir = \"{}\"\n\
         [ingest]\nack = \"upstream\"\n\
         [outbox]\ndir = \"outbox\"\n",
        repo().join("pricing").display()
    )
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_credyt-proxy"));
    c.current_dir(repo())
        .env_remove("CREDYT_PROXY__CREDYT__API_KEY")
        .env_remove("CREDYT_PROXY__TENANTS__FILE");
    c
}

/// Runs the binary off the runtime's thread (the emulator answers on it meanwhile).
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || bin().args(&args).output().unwrap())
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "the command failed:\n{}\n{}",
        stdout(out),
        stderr(out)
    );
}

/// The value of the output line `<prefix>: <value>`.
fn printed(out: &Output, prefix: &str) -> String {
    let text = stdout(out);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{prefix}: ")))
        .unwrap_or_else(|| panic!("no `{prefix}:` line in:\n{text}"))
        .trim()
        .to_string()
}

/// `tenant create --id ID --name NAME` plus `extra`.
fn create_args<'a>(id: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["tenant", "create", "--id", id, "--name", name];
    args.extend_from_slice(extra);
    args
}

/// A `/v1/quote` call with `key`: authenticates the key without touching Credyt.
async fn quote_status(http: &reqwest::Client, app: &Application, key: &str) -> u16 {
    http.post(format!("http://{}/v1/quote", app.tenant_addr()))
        .header("X-CREDYT-API-KEY", key)
        .json(&json!({"id": "q1", "event_type": "video_promoted", "occurred_at": ago(5)}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[actix_web::test]
async fn create_twice_makes_one_connected_account_and_the_second_run_changes_nothing() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let first = o
        .run(&create_args(
            "acme",
            "Acme Corp",
            &["--external-id", "acme-ext"],
        ))
        .await;
    assert_ok(&first);
    let key = printed(&first, "key");
    assert!(key.starts_with("cpk_"), "{key}");
    let accounts = o.accounts_with("acme-ext").await;
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(accounts[0]["name"], "Acme Corp");
    let account = accounts[0]["id"].as_str().unwrap();
    assert!(stdout(&first).contains(&format!("connected account {account}, created at credyt")));

    let written = o.tenants_bytes().unwrap();
    let text = String::from_utf8(written.clone()).unwrap();
    assert!(
        text.starts_with(HAND_WRITTEN),
        "the hand-written part changed:\n{text}"
    );
    assert!(text.contains(&format!("account = \"{account}\"")), "{text}");
    assert!(text.contains(&credyt_proxy::identity::tenants::key_hash(&key)));
    assert!(!text.contains(&key), "the key itself is never stored");

    let second = o
        .run(&create_args(
            "acme",
            "Acme Corp",
            &["--external-id", "acme-ext"],
        ))
        .await;
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("tenant `acme` is already in the tenants file"),
        "{}",
        stderr(&second)
    );
    assert!(
        stdout(&second).is_empty(),
        "no key printed: {}",
        stdout(&second)
    );
    assert_eq!(
        o.tenants_bytes().unwrap(),
        written,
        "the file is byte-identical"
    );
    assert_eq!(o.accounts_with("acme-ext").await.len(), 1);
    o.emulator.stop().await;
}

#[actix_web::test]
async fn an_id_already_in_the_tenants_file_is_refused_before_credyt_is_called() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let out = o.run(&create_args("old-timer", "Again", &[])).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("tenant `old-timer` is already in the tenants file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(o.tenants_bytes().unwrap(), HAND_WRITTEN.as_bytes());
    assert!(o.account_calls().await.is_empty(), "credyt was called");
    o.emulator.stop().await;
}

#[actix_web::test]
async fn a_tenants_file_that_cannot_be_written_is_refused_before_credyt_is_called() {
    let o = Onboarding::start(None).await;
    std::fs::write(
        o.config(),
        config_with_tenants(&o.emulator.url(), "no-such-folder/tenants.toml"),
    )
    .unwrap();
    let out = o.run(&create_args("acme", "Acme", &[])).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the tenants file cannot be written here") && err.contains("--print"),
        "{err}"
    );
    assert!(o.account_calls().await.is_empty(), "credyt was called");
    assert!(!o.dir.path().join("no-such-folder").exists());
    o.emulator.stop().await;
}

#[actix_web::test]
async fn an_external_id_or_account_already_used_by_a_tenant_is_refused() {
    // By external id: refused from the file alone, before Credyt is asked.
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let out = o
        .run(&create_args(
            "newco",
            "NewCo",
            &["--external-id", "old-timer-ext"],
        ))
        .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("external id `old-timer-ext` is already the account of tenant `old-timer`"),
        "{err}"
    );
    assert!(o.account_calls().await.is_empty(), "credyt was called");
    assert_eq!(o.tenants_bytes().unwrap(), HAND_WRITTEN.as_bytes());

    // By account id: the account found at Credyt is one a tenant already names.
    let existing = emu_post(
        &o.http,
        &o.emulator,
        "/accounts",
        None,
        json!({"name": "Taken", "external_id": "taken"}),
    )
    .await;
    let acc = existing["id"].as_str().unwrap();
    let file = format!(
        "{HAND_WRITTEN}\n[[tenants]]\nid = \"holder\"\nkey_hashes = [\"sha256:2222222222222222222222222222222222222222222222222222222222222222\"]\naccount = \"{acc}\"\n"
    );
    std::fs::write(o.tenants_file(), &file).unwrap();
    let out = o
        .run(&create_args("newco", "NewCo", &["--external-id", "taken"]))
        .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "connected account {acc} is already the account of tenant `holder`"
        )),
        "{err}"
    );
    assert_eq!(o.tenants_bytes().unwrap(), file.as_bytes());
    assert_eq!(o.accounts_with("taken").await.len(), 1);
    o.emulator.stop().await;
}

#[actix_web::test]
async fn a_tenants_file_changed_underneath_is_refused_and_the_rerun_reuses_the_account() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    // The account's creation takes 3 s: the file is edited while the command waits for it,
    // after it read the file and looked the account up.
    emu_faults(
        &o.http,
        &o.emulator,
        json!([{"path_prefix": "/accounts", "method": "POST", "latency_ms": 3000}]),
    )
    .await;
    let mut args: Vec<String> = create_args("acme", "Acme", &[])
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["--config".into(), o.config().display().to_string()]);
    let child = bin()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "the account lookup", || async {
        let calls = o.account_calls().await;
        calls.iter().any(|r| r["method"] == "GET").then_some(())
    })
    .await;
    let edited = format!("{HAND_WRITTEN}# edited by hand meanwhile\n");
    std::fs::write(o.tenants_file(), &edited).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("changed while this command ran; nothing written"),
        "{err}"
    );
    assert!(err.contains("running the command again uses it"), "{err}");
    assert!(stdout(&out).is_empty(), "no key printed: {}", stdout(&out));
    assert_eq!(
        o.tenants_bytes().unwrap(),
        edited.as_bytes(),
        "the hand edit stays"
    );
    let leftovers: Vec<_> = std::fs::read_dir(o.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(o.accounts_with("acme").await.len(), 1);

    emu_clear_faults(&o.http, &o.emulator).await;
    let again = o.run(&create_args("acme", "Acme", &[])).await;
    assert_ok(&again);
    assert!(
        stdout(&again).contains("found at credyt"),
        "{}",
        stdout(&again)
    );
    assert_eq!(o.accounts_with("acme").await.len(), 1, "no second account");
    let text = std::fs::read_to_string(o.tenants_file()).unwrap();
    assert!(text.starts_with(&edited), "{text}");
    o.emulator.stop().await;
}

#[actix_web::test]
async fn a_credyt_outage_names_the_failed_step_and_leaves_the_file_unchanged() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    // Every call to /accounts answers 503.
    emu_faults(
        &o.http,
        &o.emulator,
        json!([{"path_prefix": "/accounts", "rate_503": 1.0}]),
    )
    .await;
    let out = o.run(&create_args("acme", "Acme", &[])).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "looking up the connected account with external id `acme` failed: credyt answered 503"
        ),
        "{err}"
    );
    assert!(err.contains("the tenants file is unchanged"), "{err}");

    // The lookup works, the creation answers 503.
    emu_faults(
        &o.http,
        &o.emulator,
        json!([{"path_prefix": "/accounts", "method": "POST", "rate_503": 1.0}]),
    )
    .await;
    let out = o.run(&create_args("acme", "Acme", &[])).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "creating the connected account with external id `acme` failed: credyt answered 503"
        ),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "no key printed: {}", stdout(&out));
    assert_eq!(o.tenants_bytes().unwrap(), HAND_WRITTEN.as_bytes());
    assert!(o.accounts_with("acme").await.is_empty());

    // Credyt down altogether: the connection is refused.
    let (config, tenants) = (o.config(), o.tenants_file());
    let Onboarding { emulator, dir, .. } = o;
    let url = emulator.url();
    emulator.stop().await;
    std::fs::write(&config, config_text(&url)).unwrap();
    let args: Vec<String> = create_args("acme", "Acme", &["--config"])
        .into_iter()
        .map(String::from)
        .chain([config.display().to_string()])
        .collect();
    let out = run(args).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "looking up the connected account with external id `acme` failed: credyt unreachable"
        ),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert_eq!(std::fs::read(&tenants).unwrap(), HAND_WRITTEN.as_bytes());
    drop(dir);
}

#[actix_web::test]
async fn print_writes_nothing_and_prints_an_entry_the_proxy_accepts() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let out = o
        .run(&create_args(
            "acme",
            "Acme",
            &["--print", "--webhook-url", "https://acme.example/hooks"],
        ))
        .await;
    assert_ok(&out);
    assert_eq!(o.tenants_bytes().unwrap(), HAND_WRITTEN.as_bytes());
    let text = stdout(&out);
    assert!(text.contains("nothing written"), "{text}");
    let block = text
        .split_once("add this block to the tenants file:\n\n")
        .unwrap_or_else(|| panic!("no block in:\n{text}"))
        .1;
    let key = printed(&out, "key");
    let secret = printed(&out, "webhook secret");
    let account = o.accounts_with("acme").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        block.contains(&format!("account = \"{account}\"")),
        "{block}"
    );
    assert!(block.contains(&secret), "{block}");
    let table = credyt_proxy::identity::onboard::validate_text(block).unwrap();
    assert_eq!(table.authenticate(&key).unwrap().id.as_str(), "acme");

    // Without a tenants file at all: still nothing written.
    std::fs::remove_file(o.tenants_file()).unwrap();
    let out = o.run(&create_args("other", "Other", &["--print"])).await;
    assert_ok(&out);
    assert!(o.tenants_bytes().is_none(), "a tenants file was created");
    o.emulator.stop().await;
}

#[actix_web::test]
async fn a_created_tenant_posts_an_event_through_the_proxy_with_the_printed_key() {
    // No tenants file yet: `tenant create` makes it (private: it holds webhook secrets).
    let o = Onboarding::start(None).await;
    let out = o
        .run(&create_args(
            "acme",
            "Acme",
            &["--webhook-url", "https://acme.example/hooks"],
        ))
        .await;
    assert_ok(&out);
    let key = printed(&out, "key");
    let secret = printed(&out, "webhook secret");
    assert!(secret.starts_with("whsec_"), "{secret}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(o.tenants_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let check = run(vec![
        "check-config".into(),
        o.config().display().to_string(),
    ])
    .await;
    assert_ok(&check);

    let app = o.proxy().await;
    let state = app.state();
    let tenant = state.tenants.current();
    let acme = tenant.get("acme").unwrap();
    assert_eq!(
        acme.webhook.as_ref().unwrap().url,
        "https://acme.example/hooks"
    );
    assert_eq!(acme.name.as_deref(), Some("Acme"));

    let account = o.accounts_with("acme").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let customer = emu_post(
        &o.http,
        &o.emulator,
        "/customers",
        Some(&account),
        json!({"name": "user-1", "external_id": "user-1"}),
    )
    .await;
    let customer = customer["id"].as_str().unwrap();
    emu_post(
        &o.http,
        &o.emulator,
        &format!("/customers/{customer}/wallet/adjustments"),
        Some(&account),
        json!({"transaction_id": "fund-1", "asset": "USD", "amount": 20, "reason": "gift"}),
    )
    .await;
    let resp = o
        .http
        .post(format!("http://{}/v1/events", app.tenant_addr()))
        .header("X-CREDYT-API-KEY", &key)
        .json(&json!({"customer_external_id": "user-1", "events": [
            {"id": "onboarded-1", "event_type": "video_promoted", "occurred_at": ago(5)}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(quote_status(&o.http, &app, "cpk_not_a_key").await, 401);
    app.stop().await;
    o.emulator.stop().await;
}

#[actix_web::test]
async fn rotate_key_keeps_both_keys_until_retire_old_refuses_the_old_ones() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let out = o.run(&create_args("acme", "Acme", &[])).await;
    assert_ok(&out);
    let first = printed(&out, "key");
    let app = o.proxy().await;
    assert_eq!(quote_status(&o.http, &app, &first).await, 200);

    let out = o.run(&["tenant", "rotate-key", "acme"]).await;
    assert_ok(&out);
    assert!(stdout(&out).contains("2 keys now"), "{}", stdout(&out));
    let second = printed(&out, "key");
    assert_ne!(first, second);
    let text = std::fs::read_to_string(o.tenants_file()).unwrap();
    assert!(text.starts_with(HAND_WRITTEN), "{text}");
    eventually(Duration::from_secs(10), "the new key to work", || async {
        (quote_status(&o.http, &app, &second).await == 200).then_some(())
    })
    .await;
    assert_eq!(
        quote_status(&o.http, &app, &first).await,
        200,
        "the old key still works"
    );

    let out = o
        .run(&["tenant", "rotate-key", "acme", "--retire-old"])
        .await;
    assert_ok(&out);
    let third = printed(&out, "key");
    eventually(
        Duration::from_secs(10),
        "the old keys to be refused",
        || async { (quote_status(&o.http, &app, &first).await == 401).then_some(()) },
    )
    .await;
    assert_eq!(quote_status(&o.http, &app, &second).await, 401);
    assert_eq!(quote_status(&o.http, &app, &third).await, 200);
    let table = app.state().tenants.current();
    assert!(table.authenticate(&third).is_some());
    assert!(
        table.get("old-timer").is_some(),
        "the other tenant is untouched"
    );

    let unknown = o.run(&["tenant", "rotate-key", "nobody"]).await;
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("tenant `nobody` is not in the tenants file"),
        "{}",
        stderr(&unknown)
    );
    app.stop().await;
    o.emulator.stop().await;
}

#[actix_web::test]
async fn list_shows_each_tenant_and_no_key_hash_or_secret() {
    let o = Onboarding::start(Some(HAND_WRITTEN)).await;
    let created = o
        .run(&create_args(
            "acme",
            "Acme",
            &["--webhook-url", "https://acme.example/hooks"],
        ))
        .await;
    assert_ok(&created);
    // A tenants file named directly (e.g. a copy of a Kubernetes Secret), without a config.
    let rotated = run(vec![
        "tenant".into(),
        "rotate-key".into(),
        "--tenants".into(),
        o.tenants_file().display().to_string(),
        "acme".into(),
    ])
    .await;
    assert_ok(&rotated);
    let account = o.accounts_with("acme").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let out = o.run(&["tenant", "list"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let old: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        old,
        ["old-timer", "external_id=old-timer-ext", "1", "key", "-"]
    );
    let acme: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        acme,
        [
            "acme",
            account.as_str(),
            "2",
            "keys",
            "https://acme.example/hooks"
        ]
    );
    for secret in ["sha256:", "whsec_", "cpk_"] {
        assert!(!text.contains(secret), "{secret} in:\n{text}");
    }

    let json_out = run(vec![
        "tenant".into(),
        "list".into(),
        "--tenants".into(),
        o.tenants_file().display().to_string(),
        "--json".into(),
    ])
    .await;
    assert_ok(&json_out);
    let text = stdout(&json_out);
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list[1]["id"], "acme");
    assert_eq!(list[1]["name"], "Acme");
    assert_eq!(list[1]["account"], account.as_str());
    assert_eq!(list[1]["keys"], 2);
    assert_eq!(list[1]["webhook_url"], "https://acme.example/hooks");
    for secret in ["sha256:", "whsec_", "cpk_"] {
        assert!(!text.contains(secret), "{secret} in:\n{text}");
    }
    o.emulator.stop().await;
}

#[actix_web::test]
async fn webhooks_register_creates_a_connect_destination_and_prints_its_secret() {
    let o = Onboarding::start(None).await;
    let url = "https://relay.example/credyt";
    let out = o
        .run(&[
            "webhooks",
            "register",
            "--url",
            url,
            "--topic",
            "balance_threshold_hit",
        ])
        .await;
    assert_ok(&out);
    let text = stdout(&out);
    let secret = printed(&out, "signing secret");
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(
        text.contains(&format!("[webhooks]\ncredyt_secrets = [\"{secret}\"]")),
        "{text}"
    );
    assert!(
        text.contains("CREDYT_PROXY__WEBHOOKS__CREDYT_SECRETS"),
        "{text}"
    );

    let list: Value = o
        .http
        .get(format!("{}/webhooks?connect=true", o.emulator.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["url"], url);
    assert_eq!(items[0]["connect"], true);
    assert_eq!(items[0]["topics"], json!(["balance_threshold_hit"]));
    let id = items[0]["id"].as_str().unwrap();
    assert!(
        text.contains(&format!("webhook destination {id} registered")),
        "{text}"
    );
    let destination: Value = o
        .http
        .get(format!("{}/webhooks/{id}", o.emulator.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(destination["secret"], secret.as_str());

    // The same URL again: refused, Credyt would deliver every event twice.
    let again = o.run(&["webhooks", "register", "--url", url]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains(&format!("destination {id}")),
        "{}",
        stderr(&again)
    );
    let list: Value = o
        .http
        .get(format!("{}/webhooks", o.emulator.url()))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    o.emulator.stop().await;
}

/// The tenants file is resolved like every path of the configuration: next to the config.
#[test]
fn the_tenants_file_is_found_next_to_the_config_from_any_working_directory() {
    // Checked through `tenant list`, which needs no Credyt.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        config_text("http://127.0.0.1:9"),
    )
    .unwrap();
    std::fs::write(dir.path().join("tenants.toml"), HAND_WRITTEN).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(elsewhere.path())
        .args(["tenant", "list", "--config"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(stdout(&out).starts_with("old-timer"), "{}", stdout(&out));
}
