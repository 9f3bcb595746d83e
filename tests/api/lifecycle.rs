//! A pod's shutdown, played against the real binary (`credyt-proxy serve` as a child process,
//! the emulator in-process): SIGTERM under load, SIGTERM while Credyt is down, and a second
//! signal during the drain.
//!
//! The sequence under test (`app::Application::stop`): `/readyz` turns 503 at once, the
//! tenant port keeps answering for `shutdown.drain_delay_ms`, then stops accepting, finishes
//! in-flight requests and delivers the outbox until `server.shutdown_grace_ms` is spent; the
//! process exits 0. A second signal exits at once (status 128 + signal).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::crash::{body, client, Load, Proxy, Setup};
use super::proxy::{
    ago, emu_clear_faults, emu_faults, emu_state, eventually, metric, repo, start_emulator,
    tenant_a_account, total_charges, PLATFORM_KEY,
};

const USERS: &[&str] = &["pod-0", "pod-1", "pod-2"];

/// Charges (`POST /customers/{id}/...`) fail with 503; lookups and customer creation work.
async fn fail_charges(setup: &Setup) {
    emu_faults(
        &setup.http,
        &setup.emulator,
        json!([{"path_prefix": "/customers/", "method": "POST", "rate_503": 1.0}]),
    )
    .await;
}

async fn readyz(http: &reqwest::Client, proxy: &Proxy) -> Option<u16> {
    let r = http.get(format!("{}/readyz", proxy.admin)).send().await;
    r.ok().map(|r| r.status().as_u16())
}

/// Posts `n` events for `user`, one per request, each answered 204.
async fn post_events(setup: &Setup, proxy: &Proxy, user: &str, n: usize) {
    for i in 0..n {
        let r = setup
            .http
            .post(format!("{}/events", proxy.url))
            .header("X-CREDYT-API-KEY", &setup.key)
            .json(&body(user, &[format!("{user}-{i}")]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{:?}", r.text().await);
    }
}

/// Credyt healthy again, a new process on the same outbox delivers what the last one left:
/// `user` is charged exactly `n` events, and nothing else is charged.
async fn restart_and_assert_charged(setup: Setup, user: &str, n: u64) {
    emu_clear_faults(&setup.http, &setup.emulator).await;
    let proxy = Proxy::start(&setup.config()).await;
    proxy.drained(&setup.http, Duration::from_secs(20)).await;
    setup
        .assert_charged_exactly(&BTreeMap::from([(user.to_string(), n)]))
        .await;
    drop(proxy);
    setup.emulator.stop().await;
}

/// Load running, SIGTERM: `/readyz` turns 503 first; requests keep succeeding during the
/// drain delay; the process exits 0 within the grace period with the outbox delivered, and
/// every event acknowledged before the exit is charged exactly once before any restart. The
/// clients' requests the stopped proxy did not answer succeed after a restart on the same
/// outbox, and then every acknowledged event is charged exactly once.
#[actix_web::test]
async fn sigterm_follows_a_pods_shutdown_sequence() {
    let drain_delay = Duration::from_millis(2_500);
    let grace = Duration::from_secs(10);
    let setup = Setup::new(
        &format!(
            "sync = \"interval\"\nsync_interval_ms = 200\n[shutdown]\ndrain_delay_ms = {}\n",
            drain_delay.as_millis()
        ),
        grace.as_millis() as u64,
    )
    .await;
    let http = &setup.http;
    let mut proxy = Proxy::start(&setup.config()).await;
    let load = Load::new(&proxy.url);
    let clients: Vec<_> = (0..4)
        .map(|t| tokio::spawn(client(t, USERS, setup.key.clone(), load.clone())))
        .collect();
    eventually(Duration::from_secs(20), "load", || {
        let load = load.clone();
        async move { (load.acked.load(Ordering::SeqCst) >= 100).then_some(()) }
    })
    .await;
    assert_eq!(readyz(http, &proxy).await, Some(200));

    let signalled = Instant::now();
    proxy.sigterm();
    eventually(Duration::from_secs(2), "/readyz to answer 503", || async {
        (readyz(http, &proxy).await == Some(503)).then_some(())
    })
    .await;
    let not_ready_after = signalled.elapsed();
    let (acked, retries) = (
        load.acked.load(Ordering::SeqCst),
        load.retries.load(Ordering::SeqCst),
    );
    // Still inside the drain delay: the tenant port answers as before.
    let inside = drain_delay - Duration::from_millis(1_000);
    assert!(
        not_ready_after < inside,
        "readiness took {not_ready_after:?} to fail"
    );
    tokio::time::sleep(inside - not_ready_after).await;
    let fresh = reqwest::Client::new()
        .post(format!("{}/events", proxy.url))
        .header("X-CREDYT-API-KEY", &setup.key)
        .json(&body("pod-late", &["late-0".into()]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fresh.status(),
        204,
        "a new connection during the drain delay"
    );
    assert!(
        load.acked.load(Ordering::SeqCst) > acked,
        "requests kept succeeding after /readyz turned 503"
    );
    assert_eq!(
        load.retries.load(Ordering::SeqCst),
        retries,
        "no request failed during the drain delay"
    );

    let status = proxy
        .wait_exit(signalled, grace + Duration::from_secs(2))
        .await;
    assert!(status.success(), "exit status {status:?}\n{}", proxy.log());
    let log = proxy.log();
    assert!(log.contains("outbox closed, everything delivered"), "{log}");
    // Before any restart: everything acknowledged is charged, once.
    let at_exit = load.acked.load(Ordering::SeqCst) + 1;
    let state = emu_state(http, &setup.emulator).await;
    assert_eq!(total_charges(&state), at_exit, "charges at exit");

    // Requests the stopped proxy never answered are retried against the next one.
    drop(proxy);
    let proxy = Proxy::start(&setup.config()).await;
    *load.url.lock().unwrap() = proxy.url.clone();
    load.stop.store(true, Ordering::SeqCst);
    let mut expected: BTreeMap<String, u64> = BTreeMap::from([("pod-late".into(), 1)]);
    for c in clients {
        for (user, n) in c.await.unwrap() {
            *expected.entry(user).or_default() += n;
        }
    }
    proxy.drained(http, Duration::from_secs(20)).await;
    setup.assert_charged_exactly(&expected).await;
    eprintln!(
        "pod shutdown: not ready after {not_ready_after:?}, {} events acknowledged by the first process",
        at_exit
    );
    drop(proxy);
    setup.emulator.stop().await;
}

/// SIGTERM while Credyt refuses every charge: the proxy spends the grace period trying,
/// exits 0 within it, and says in the log how much it left; a restart on the same outbox
/// delivers exactly that.
#[actix_web::test]
async fn sigterm_with_credyt_down_exits_zero_and_the_next_start_delivers_the_rest() {
    let grace = Duration::from_secs(3);
    let setup = Setup::new("sync = \"interval\"\n", grace.as_millis() as u64).await;
    let mut proxy = Proxy::start(&setup.config()).await;
    fail_charges(&setup).await;
    post_events(&setup, &proxy, "down-0", 12).await;

    let signalled = Instant::now();
    proxy.sigterm();
    let status = proxy
        .wait_exit(signalled, grace + Duration::from_secs(2))
        .await;
    assert!(status.success(), "exit status {status:?}\n{}", proxy.log());
    let log = proxy.log();
    assert!(log.contains("delivering the outbox before exit"), "{log}");
    assert!(
        log.contains("grace period spent before the outbox was delivered"),
        "{log}"
    );
    assert!(
        log.contains("\"undelivered\":12") && log.contains("outbox closed with undelivered"),
        "{log}"
    );
    let state = emu_state(&setup.http, &setup.emulator).await;
    assert_eq!(total_charges(&state), 0);
    drop(proxy);

    restart_and_assert_charged(setup, "down-0", 12).await;
}

/// A second signal during the drain ends the process at once (status 143 for SIGTERM), long
/// before the grace period; what was acknowledged is charged exactly once after a restart.
#[actix_web::test]
async fn a_second_signal_exits_at_once_losing_nothing() {
    let grace = Duration::from_secs(60);
    let setup = Setup::new("sync = \"interval\"\n", grace.as_millis() as u64).await;
    let mut proxy = Proxy::start(&setup.config()).await;
    fail_charges(&setup).await;
    post_events(&setup, &proxy, "twice-0", 7).await;

    proxy.sigterm();
    eventually(Duration::from_secs(5), "the delivery phase", || async {
        proxy
            .log()
            .contains("delivering the outbox before exit")
            .then_some(())
    })
    .await;
    let second = Instant::now();
    proxy.sigterm();
    let status = proxy.wait_exit(second, Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(143), "{status:?}\n{}", proxy.log());
    assert_eq!(status.signal(), None, "exited, not killed");
    assert!(proxy.log().contains("second signal"), "{}", proxy.log());
    drop(proxy);

    restart_and_assert_charged(setup, "twice-0", 7).await;
}

/// A volume as the kubelet writes a ConfigMap or Secret (its atomic writer): the files live in
/// a timestamped directory, `..data` links to it and each name links through `..data`.
struct KubeletVolume {
    dir: std::path::PathBuf,
    generation: u32,
}

impl KubeletVolume {
    fn new(dir: std::path::PathBuf, files: &[(&str, String)]) -> KubeletVolume {
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = KubeletVolume { dir, generation: 0 };
        v.update(files);
        v
    }

    /// One update, in the kubelet's order: write the new timestamped directory, point
    /// `..data_tmp` at it and rename it over `..data` (the atomic step), add the links of new
    /// names, remove the links of names that went away, remove the old directory.
    fn update(&mut self, files: &[(&str, String)]) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let name = format!("..2026_12_06_00_00_00.{:09}", self.generation);
        let new = self.dir.join(&name);
        std::fs::create_dir(&new).unwrap();
        for (file, text) in files {
            std::fs::write(new.join(file), text).unwrap();
        }
        symlink(&name, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        for (file, _) in files {
            let link = self.dir.join(file);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(std::path::Path::new("..data").join(file), link).unwrap();
            }
        }
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let entry = entry.unwrap();
            let n = entry.file_name().to_string_lossy().into_owned();
            if !n.starts_with("..") && !files.iter().any(|(f, _)| *f == n) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// The shipped price books, with `video_promoted` at `price`.
fn books(price: &str) -> Vec<(&'static str, String)> {
    ["assets.toml", "assignments.toml", "standard.toml"]
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(repo().join("pricing").join(f)).unwrap();
            let text = if f == "standard.toml" {
                let old = "event_type = \"video_promoted\"\nusage_type = \"unit\"\nasset = \"USD\"\nunit_price = 0.50\n";
                assert!(text.contains(old), "pricing/standard.toml changed shape");
                text.replace(
                    old,
                    &old.replace("unit_price = 0.50", &format!("unit_price = {price}")),
                )
            } else {
                text
            };
            (f, text)
        })
        .collect()
}

fn tenant_entry(id: &str, hash: &str, account: &str) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\nkey_hashes = [\"{hash}\"]\naccount = \"{account}\"\ncreate_customers = true\n"
    )
}

/// The price books (a ConfigMap) and the tenants file and platform key (a Secret) updated the
/// way the kubelet does it: the running proxy serves the new prices and the new tenant
/// without a restart; a broken update of either keeps the last good version serving, is
/// logged and shows in `credyt_proxy_reload_rejected`; a good update after it clears that.
#[actix_web::test]
async fn configmap_and_secret_updates_apply_without_a_restart() {
    let emulator = start_emulator().await;
    let http = reqwest::Client::new();
    let account = tenant_a_account(&http, &emulator).await;
    let (key_a, hash_a) = credyt_proxy::identity::tenants::generate_key();
    let (key_b, hash_b) = credyt_proxy::identity::tenants::generate_key();
    let dir = tempfile::tempdir().unwrap();
    let mut pricing = KubeletVolume::new(dir.path().join("pricing"), &books("0.50"));
    let tenants_a = tenant_entry("tenant-a", &hash_a, &account);
    let mut secrets = KubeletVolume::new(
        dir.path().join("secrets"),
        &[
            ("platform-key", PLATFORM_KEY.to_string()),
            ("tenants.toml", tenants_a.clone()),
        ],
    );
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [log]\nformat = \"json\"\n\
             [credyt]\nbase_url = \"{}\"\napi_key_file = \"secrets/platform-key\"\n\
             [tenants]\nfile = \"secrets/tenants.toml\"\nreload_interval_ms = 100\n\
             [pricing]\ndir = \"pricing\"\nreload_interval_ms = 100\n\
             [ingest]\nack = \"durable\"\n[outbox]\ndir = \"outbox\"\n",
            emulator.url()
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&config).await;
    let quote = |key: String| {
        let (http, url) = (http.clone(), proxy.url.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/quote"))
                .header("X-CREDYT-API-KEY", key)
                .json(&json!({"id": "q", "event_type": "video_promoted", "occurred_at": ago(5)}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (
                status,
                body["fees"][0]["amount"].as_str().map(str::to_owned),
            )
        }
    };
    let rejected = |source: &'static str| {
        let (http, admin) = (http.clone(), proxy.admin.clone());
        async move {
            metric(
                &http,
                &admin,
                &format!("credyt_proxy_reload_rejected{{source=\"{source}\"}}"),
            )
            .await
        }
    };
    assert_eq!(quote(key_a.clone()).await, (200, Some("0.50".into())));
    assert_eq!(quote(key_b.clone()).await.0, 401);
    assert_eq!(rejected("pricing").await, Some(0));

    // New prices and a new tenant, each as one kubelet update.
    pricing.update(&books("0.75"));
    secrets.update(&[
        ("platform-key", PLATFORM_KEY.to_string()),
        (
            "tenants.toml",
            format!("{tenants_a}{}", tenant_entry("tenant-b", &hash_b, &account)),
        ),
    ]);
    eventually(Duration::from_secs(5), "the new prices and tenant", || {
        let (qa, qb) = (quote(key_a.clone()), quote(key_b.clone()));
        async move { (qa.await == (200, Some("0.75".into())) && qb.await.0 == 200).then_some(()) }
    })
    .await;

    // Broken updates: the last good versions keep serving, and the rejection is reported.
    let mut broken = books("0.75");
    broken[2].1.push_str("\n[[oops\n");
    pricing.update(&broken);
    secrets.update(&[
        ("platform-key", PLATFORM_KEY.to_string()),
        ("tenants.toml", "[[tenants]]\nid = \n".into()),
    ]);
    eventually(
        Duration::from_secs(5),
        "both rejections reported",
        || async {
            (rejected("pricing").await == Some(1) && rejected("tenants").await == Some(1))
                .then_some(())
        },
    )
    .await;
    assert_eq!(quote(key_a.clone()).await, (200, Some("0.75".into())));
    assert_eq!(quote(key_b.clone()).await.0, 200);
    let log = proxy.log();
    assert!(
        log.contains("pricing reload rejected, keeping the last good set"),
        "{log}"
    );
    assert!(
        log.contains("tenants file rejected, keeping the last good one"),
        "{log}"
    );

    // A good update after the broken one clears the report.
    pricing.update(&books("0.60"));
    secrets.update(&[
        ("platform-key", PLATFORM_KEY.to_string()),
        ("tenants.toml", tenants_a.clone()),
    ]);
    eventually(Duration::from_secs(5), "the fixed versions", || {
        let (qa, qb) = (quote(key_a.clone()), quote(key_b.clone()));
        async move { (qa.await == (200, Some("0.60".into())) && qb.await.0 == 401).then_some(()) }
    })
    .await;
    assert_eq!(rejected("pricing").await, Some(0));
    assert_eq!(rejected("tenants").await, Some(0));
    drop(proxy);
    emulator.stop().await;
}
