//! The proxy as a real child process (`credyt-proxy serve --config FILE`), the emulator
//! in-process: SIGKILL under load, and SIGTERM with requests in flight.
//!
//! What the kill test proves: no acknowledged event is lost or charged twice when the process
//! dies at any moment (SIGKILL: no destructor, no final sync) and restarts on the same data
//! directory. SIGKILL leaves the OS page cache intact, so this is exactly the `interval`
//! guarantee; it says nothing about power loss (only `sync = "always"` survives that, and no
//! test here can show it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credyt_proxy::emulator::RunningEmulator;
use rand::Rng;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{
    ago, emu_clear_faults, emu_faults, emu_post, emu_state, eventually, metric, repo,
    start_emulator, tenant_a_account, total_charges, usd_charges, PLATFORM_KEY,
};

/// `video_promoted` costs 0.50 USD per event, one fee (pricing/standard.toml).
const PRICE: Decimal = dec!(0.50);

/// The emulator, one tenant (A, creating customers on first sight) and a data directory with
/// the proxy's config, tenants file and outbox.
pub(super) struct Setup {
    pub(super) emulator: RunningEmulator,
    pub(super) http: reqwest::Client,
    pub(super) key: String,
    account: String,
    dir: tempfile::TempDir,
    /// With [`Setup::with_relay`]: while true, Credyt's answers never reach the proxy.
    hold_answers: Arc<AtomicBool>,
}

/// A TCP relay from the proxy to the emulator that can swallow the emulator's answers (the
/// requests still reach it and take effect): "Credyt charged, the proxy never heard".
async fn start_relay(to: std::net::SocketAddr, hold: Arc<AtomicBool>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let hold = hold.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut server_rd, mut server_wr) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match server_rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if !hold.load(Ordering::SeqCst) => {
                            if client_wr.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {} // swallowed
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

impl Setup {
    /// `outbox_config` goes at the end of the `[outbox]` section (and may open further
    /// sections, e.g. `[shutdown]`).
    pub(super) async fn new(outbox_config: &str, grace_ms: u64) -> Setup {
        Self::build(outbox_config, grace_ms, false).await
    }

    /// Like [`Setup::new`], with the proxy talking to the emulator through [`start_relay`].
    async fn with_relay(outbox_config: &str, grace_ms: u64) -> Setup {
        Self::build(outbox_config, grace_ms, true).await
    }

    async fn build(outbox_config: &str, grace_ms: u64, relay: bool) -> Setup {
        let emulator = start_emulator().await;
        let hold_answers = Arc::new(AtomicBool::new(false));
        let credyt_url = if relay {
            start_relay(emulator.addr, hold_answers.clone()).await
        } else {
            emulator.url()
        };
        let http = reqwest::Client::new();
        let dir = tempfile::tempdir().unwrap();
        let account = tenant_a_account(&http, &emulator).await;
        let (key, hash) = credyt_proxy::identity::tenants::generate_key();
        std::fs::write(
            dir.path().join("tenants.toml"),
            format!(
                "[[tenants]]\nid = \"tenant-a\"\nkey_hashes = [\"{hash}\"]\naccount = \"{account}\"\n\
                 create_customers = true\nrate_limit = {{ per_second = 100000, burst = 100000 }}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\n\
                 shutdown_grace_ms = {grace_ms}\n\
                 [log]\nformat = \"json\"\nfilter = \"info\"\n\
                 [credyt]\nbase_url = \"{}\"\napi_key = \"{PLATFORM_KEY}\"\ntimeout_ms = 5000\n\
                 [tenants]\nfile = \"tenants.toml\"\n\
                 [pricing]\ndir = \"{}\"\n\
                 [ingest]\nack = \"durable\"\n\
                 [outbox]\ndir = \"outbox\"\n{outbox_config}",
                credyt_url,
                repo().join("pricing").display(),
            ),
        )
        .unwrap();
        Setup {
            emulator,
            http,
            key,
            account,
            dir,
            hold_answers,
        }
    }

    pub(super) fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    async fn state(&self) -> Value {
        emu_state(&self.http, &self.emulator).await
    }

    /// Customer id (in A's account) of each external id.
    async fn customers(&self) -> BTreeMap<String, String> {
        let state = self.state().await;
        let mut out = BTreeMap::new();
        for a in state["accounts"].as_array().unwrap() {
            if a["id"] != self.account.as_str() {
                continue;
            }
            for c in a["customers"].as_array().unwrap() {
                if let Some(ext) = c["external_id"].as_str() {
                    out.insert(ext.to_string(), c["id"].as_str().unwrap().to_string());
                }
            }
        }
        out
    }

    /// With coalescing, charges carry several events: asserts that each external id's charges
    /// total exactly `expected[ext]` x 0.50 in at most that many charges, and that nothing else
    /// was charged anywhere.
    async fn assert_total_exactly(&self, expected: &BTreeMap<String, u64>) {
        let customers = self.customers().await;
        let state = self.state().await;
        let mut charges = 0;
        for (ext, n) in expected {
            let id = customers
                .get(ext)
                .unwrap_or_else(|| panic!("no customer {ext}"));
            let (count, total) = usd_charges(&state, id);
            assert_eq!(total, PRICE * Decimal::from(*n), "total charged to {ext}");
            assert!(count <= *n, "{count} charges for {n} events of {ext}");
            charges += count;
        }
        assert_eq!(total_charges(&state), charges, "charges outside the users");
    }

    /// Asserts that each external id was charged exactly `expected[ext]` events at 0.50, and
    /// nothing else anywhere.
    pub(super) async fn assert_charged_exactly(&self, expected: &BTreeMap<String, u64>) {
        let customers = self.customers().await;
        let state = self.state().await;
        for (ext, n) in expected {
            let id = customers
                .get(ext)
                .unwrap_or_else(|| panic!("no customer {ext}"));
            assert_eq!(
                usd_charges(&state, id),
                (*n, PRICE * Decimal::from(*n)),
                "charges of {ext}"
            );
        }
        assert_eq!(
            total_charges(&state),
            expected.values().sum::<u64>(),
            "charges outside the acknowledged events"
        );
    }
}

/// A running `credyt-proxy serve` child; SIGKILLed when dropped.
pub(super) struct Proxy {
    pub(super) child: Child,
    pub(super) url: String,
    pub(super) admin: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Spawns the proxy and waits for its `credyt-proxy ready` log line.
    pub(super) async fn start(config: &Path) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_credyt-proxy"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    // Shown with the test's output when it fails.
                    if v["level"] == "WARN" || v["level"] == "ERROR" {
                        eprintln!("proxy: {line}");
                    }
                    if v["message"] == "credyt-proxy ready" {
                        if let Some(tx) = tx.take() {
                            let addrs = (
                                v["tenant_addr"].as_str().unwrap_or_default().to_string(),
                                v["admin_addr"].as_str().unwrap_or_default().to_string(),
                            );
                            let _ = tx.send(addrs);
                        }
                    }
                }
                let mut lines = lines.lock().unwrap();
                if lines.len() < 2000 {
                    lines.push(line);
                }
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(30), rx).await;
        let Ok(Ok((tenant, admin))) = ready else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "proxy did not get ready:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Proxy {
            child,
            url: format!("http://{tenant}"),
            admin: format!("http://{admin}"),
            log,
        }
    }

    fn kill(mut self) {
        // Child::kill is SIGKILL on Unix: no destructor, no final sync.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub(super) fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, at most until `limit` after `since`.
    pub(super) async fn wait_exit(
        &mut self,
        since: Instant,
        limit: Duration,
    ) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                since.elapsed() < limit,
                "still running {:?} after the signal (limit {limit:?})\n{}",
                since.elapsed(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub(super) async fn drained(&self, http: &reqwest::Client, limit: Duration) {
        eventually(limit, "the outbox to drain", || async {
            (metric(http, &self.admin, "credyt_proxy_outbox_depth").await? == 0).then_some(())
        })
        .await;
    }
}

pub(super) fn body(user: &str, ids: &[String]) -> Value {
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}))
        .collect();
    json!({"customer_external_id": user, "events": events})
}

/// Load shared by the client tasks and the killer.
pub(super) struct Load {
    /// The current proxy's tenant URL.
    pub(super) url: Mutex<String>,
    pub(super) stop: AtomicBool,
    pub(super) acked: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) duplicates: AtomicU64,
}

impl Load {
    pub(super) fn new(url: &str) -> Arc<Load> {
        Arc::new(Load {
            url: Mutex::new(url.to_string()),
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        })
    }
}

/// One client: posts requests of 1 to 4 events with unique ids for a few users, alternating
/// `/events` and `/v1/events`, and retries a request it got no success for (same ids) until
/// it gets one. Returns the acknowledged events per user.
pub(super) async fn client(
    t: usize,
    users: &'static [&'static str],
    key: String,
    load: Arc<Load>,
) -> BTreeMap<String, u64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0usize;
    while !load.stop.load(Ordering::SeqCst) {
        let user = users[(t + n) % users.len()];
        let count = 1 + (n * 7 + t) % 4;
        let ids: Vec<String> = (0..count).map(|i| format!("c{t}-{n}-{i}")).collect();
        let v1 = n % 2 == 1;
        let path = if v1 { "/v1/events" } else { "/events" };
        let payload = body(user, &ids);
        let mut attempt = 0;
        loop {
            let url = format!("{}{path}", load.url.lock().unwrap());
            let answer = http
                .post(url)
                .header("X-CREDYT-API-KEY", &key)
                .json(&payload)
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 204 && !v1 => break,
                Ok(r) if r.status() == 200 && v1 => {
                    let b: Value = r.json().await.unwrap();
                    let statuses: Vec<&str> = b["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["status"].as_str().unwrap())
                        .collect();
                    assert!(
                        statuses.iter().all(|s| *s == "accepted")
                            || statuses.iter().all(|s| *s == "duplicate"),
                        "an append is atomic: {statuses:?}"
                    );
                    if statuses[0] == "duplicate" {
                        assert!(attempt > 0, "duplicate on a first attempt: {ids:?}");
                        load.duplicates.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
                // The proxy is down or draining: no answer, retry the same ids.
                Ok(r) if r.status() == 503 => {}
                Err(_) => {}
                Ok(r) => panic!("unexpected answer {}: {:?}", r.status(), r.text().await),
            }
            attempt += 1;
            load.retries.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *acked.entry(user.to_string()).or_default() += count as u64;
        load.acked.fetch_add(count as u64, Ordering::SeqCst);
        n += 1;
    }
    acked
}

const USERS: &[&str] = &["crash-0", "crash-1", "crash-2"];

async fn kill_under_load(
    sync: &str,
    kills: usize,
    coalesce_window_ms: u64,
    users: &'static [&'static str],
) {
    let setup = Setup::new(
        &format!(
            "sync = \"{sync}\"\nsync_interval_ms = 200\ncoalesce_window_ms = {coalesce_window_ms}\n"
        ),
        2_000,
    )
    .await;
    for u in users {
        emu_post(
            &setup.http,
            &setup.emulator,
            "/customers",
            Some(&setup.account),
            json!({"name": u, "external_id": u}),
        )
        .await;
    }
    let mut proxy = Proxy::start(&setup.config()).await;
    let load = Load::new(&proxy.url);
    let clients: Vec<_> = (0..4)
        .map(|t| tokio::spawn(client(t, users, setup.key.clone(), load.clone())))
        .collect();
    for k in 0..kills {
        // Kill at a random moment, but only once this process took some of the load.
        let (min_acks, extra_ms) = {
            let mut rng = rand::thread_rng();
            (rng.gen_range(1..60u64), rng.gen_range(0..400u64))
        };
        let from = load.acked.load(Ordering::SeqCst);
        eventually(
            Duration::from_secs(20),
            &format!("load on incarnation {k}"),
            || {
                let load = load.clone();
                async move { (load.acked.load(Ordering::SeqCst) >= from + min_acks).then_some(()) }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(extra_ms)).await;
        proxy.kill();
        proxy = Proxy::start(&setup.config()).await;
        *load.url.lock().unwrap() = proxy.url.clone();
    }
    // The last incarnation takes load too, then the clients finish their current request.
    let from = load.acked.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(20),
        "load after the last restart",
        || {
            let load = load.clone();
            async move { (load.acked.load(Ordering::SeqCst) > from).then_some(()) }
        },
    )
    .await;
    load.stop.store(true, Ordering::SeqCst);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        for (user, n) in c.await.unwrap() {
            *expected.entry(user).or_default() += n;
        }
    }
    proxy.drained(&setup.http, Duration::from_secs(60)).await;
    if coalesce_window_ms == 0 {
        setup.assert_charged_exactly(&expected).await;
    } else {
        setup.assert_total_exactly(&expected).await;
    }
    eprintln!(
        "crash ({sync}, coalesce {coalesce_window_ms} ms): {kills} kills, {} events acknowledged, {} retries, {} duplicates seen on retry",
        load.acked.load(Ordering::SeqCst),
        load.retries.load(Ordering::SeqCst),
        load.duplicates.load(Ordering::SeqCst),
    );
    drop(proxy);
    setup.emulator.stop().await;
}

/// SIGKILL the proxy 6 times at random moments under load (`sync = "interval"`), restarting
/// it on the same data directory each time: every acknowledged event is charged exactly once.
#[actix_web::test]
async fn sigkill_under_load_loses_and_doubles_nothing_interval() {
    kill_under_load("interval", 6, 0, USERS).await;
}

/// The same with `sync = "always"` (5 kills).
#[actix_web::test]
async fn sigkill_under_load_loses_and_doubles_nothing_always() {
    kill_under_load("always", 5, 0, USERS).await;
}

/// The same with coalescing on (`coalesce_window_ms = 50`): kills land between a batch's
/// durable membership and its delivery; every customer's charged total is exactly its
/// acknowledged events x 0.50 (a batch re-sent with another membership or id would double).
#[actix_web::test]
async fn sigkill_under_load_with_coalescing_charges_exact_totals() {
    kill_under_load("interval", 5, 50, USERS).await;
}

/// SIGTERM while Credyt is slow and requests are in flight: each in-flight request completes
/// with 204 or a clear 503, the process exits 0 within the grace period, and after a restart
/// everything acknowledged is charged exactly once.
#[actix_web::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let grace = Duration::from_secs(5);
    let setup = Setup::new(
        "sync = \"interval\"\nsync_interval_ms = 200\n",
        grace.as_millis() as u64,
    )
    .await;
    let proxy = Proxy::start(&setup.config()).await;
    let http = &setup.http;
    let post = |url: String, b: Value| {
        let key = setup.key.clone();
        // A fresh connection per request: no idle keep-alive connection for the server to
        // close under a request that is just being written.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        async move {
            http.post(format!("{url}/events"))
                .header("X-CREDYT-API-KEY", key)
                .json(&b)
                .send()
                .await
        }
    };
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    // Warm user: identity cached before Credyt slows down.
    let r = post(proxy.url.clone(), body("warm", &["w0".into()]))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    expected.insert("warm".into(), 1);
    proxy.drained(http, Duration::from_secs(10)).await;

    // Credyt slows down: lookups take 3 s, charges 1 s.
    emu_faults(
        http,
        &setup.emulator,
        json!([
            {"path_prefix": "/customers", "method": "GET", "latency_ms": 3000},
            {"path_prefix": "/customers/", "method": "POST", "latency_ms": 1000}
        ]),
    )
    .await;
    // A backlog for the forwarder, whose sends are slow now.
    for i in 0..10 {
        let r = post(proxy.url.clone(), body("warm", &[format!("w{}", i + 1)]))
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    *expected.get_mut("warm").unwrap() += 10;
    // In flight: requests for new end users, each waiting on a 3 s lookup.
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            let user = format!("new-{i}");
            let ids = vec![format!("n{i}-a"), format!("n{i}-b")];
            let f = post(proxy.url.clone(), body(&user, &ids));
            tokio::spawn(async move { (user, ids, f.await) })
        })
        .collect();
    // Let them reach the proxy (they take 3 s there) before the signal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    proxy.sigterm();

    let mut retry = Vec::new();
    let mut answered = 0;
    for f in in_flight {
        let (user, ids, answer) = f.await.unwrap();
        match answer {
            Ok(r) if r.status() == 204 => {
                answered += 1;
                *expected.entry(user).or_default() += ids.len() as u64;
            }
            Ok(r) if r.status() == 503 => {
                answered += 1;
                assert_eq!(r.headers()["content-type"], "application/problem+json");
                assert!(r.headers().contains_key("retry-after"));
                retry.push((user, ids));
            }
            Ok(r) => panic!("in-flight request answered {}", r.status()),
            Err(e) => panic!("in-flight request got no answer: {e}\n{}", proxy.log()),
        }
    }
    assert_eq!(answered, 4);
    let mut proxy = proxy;
    let status = proxy
        .wait_exit(signalled, grace + Duration::from_secs(2))
        .await;
    let exited_after = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", proxy.log());
    assert!(
        proxy.log().contains("credyt-proxy stopped"),
        "{}",
        proxy.log()
    );
    drop(proxy);

    emu_clear_faults(http, &setup.emulator).await;
    let proxy = Proxy::start(&setup.config()).await;
    for (user, ids) in retry.iter() {
        let r = post(proxy.url.clone(), body(user, ids)).await.unwrap();
        assert_eq!(r.status(), 204);
        *expected.entry(user.clone()).or_default() += ids.len() as u64;
    }
    proxy.drained(http, Duration::from_secs(20)).await;
    setup.assert_charged_exactly(&expected).await;
    eprintln!(
        "sigterm: exited after {exited_after:?}, {} in-flight requests answered 503",
        retry.len()
    );
    drop(proxy);
    setup.emulator.stop().await;
}

/// Delivers `user`'s first event, then sends a second one whose charge Credyt applies while
/// its answer never reaches the proxy, SIGKILLs the proxy, lets `reconfigure` edit the config
/// file, restarts, sends a third event for the same customer and asserts exactly 3 charges.
async fn unanswered_charge_then_restart(setup: Setup, user: &str, reconfigure: impl FnOnce(&Path)) {
    let post = |url: String, id: String| {
        let http = setup.http.clone();
        let key = setup.key.clone();
        let body = body(user, &[id]);
        async move {
            http.post(format!("{url}/events"))
                .header("X-CREDYT-API-KEY", key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let proxy = Proxy::start(&setup.config()).await;
    // Identity cached and a first charge delivered, then Credyt's answers stop reaching
    // the proxy.
    assert_eq!(post(proxy.url.clone(), format!("{user}-0")).await, 204);
    proxy.drained(&setup.http, Duration::from_secs(10)).await;
    setup.hold_answers.store(true, Ordering::SeqCst);
    assert_eq!(post(proxy.url.clone(), format!("{user}-1")).await, 204);
    // Credyt charged it; the proxy is still waiting for the answer.
    eventually(
        Duration::from_secs(10),
        "the unanswered charge at Credyt",
        || async { (total_charges(&setup.state().await) == 2).then_some(()) },
    )
    .await;
    proxy.kill();
    setup.hold_answers.store(false, Ordering::SeqCst);
    reconfigure(&setup.config());

    let proxy = Proxy::start(&setup.config()).await;
    // Within the new process's first window: a third record for the same customer.
    assert_eq!(post(proxy.url.clone(), format!("{user}-2")).await, 204);
    proxy.drained(&setup.http, Duration::from_secs(20)).await;
    setup
        .assert_total_exactly(&BTreeMap::from([(user.to_string(), 3)]))
        .await;
    drop(proxy);
    setup.emulator.stop().await;
}

/// Coalescing on; a record alone in its window goes out as a plain charge, Credyt applies it,
/// and the proxy is SIGKILLed before it hears the answer. The next process must re-send that
/// record under the same transaction id, not coalesce it with a newer record of the same
/// customer into a charge under a new id (which Credyt would take as a second charge).
#[actix_web::test]
async fn sigkill_after_an_unanswered_lone_charge_does_not_charge_it_again_coalesced() {
    let setup = Setup::with_relay("coalesce_window_ms = 1000\n", 2_000).await;
    unanswered_charge_then_restart(setup, "lone-user", |_| {}).await;
}

/// A record an earlier process sent alone (coalescing off) and never heard back about must not
/// be coalesced into a batch under another id once coalescing is switched on.
#[actix_web::test]
async fn turning_coalescing_on_never_regroups_a_record_sent_alone_before() {
    let setup = Setup::with_relay("", 2_000).await;
    unanswered_charge_then_restart(setup, "switch-user", |config| {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            text.replace("[outbox]\n", "[outbox]\ncoalesce_window_ms = 1000\n"),
        )
        .unwrap();
    })
    .await;
}

/// Period tiers under SIGKILL: clients send `tokens_used` events (100,000 tokens each, one
/// customer, one month; `tests/golden/pricing/periods`: 1.80 per million up to 1,000,000 a
/// month, then 1.20), each retried with the same id until answered, while the proxy is killed
/// and restarted on the same directory. Afterwards the running total the next event is rated
/// against is exactly the sum of the acknowledged events (no event counted twice, none lost,
/// nothing else), and Credyt charged exactly what rating them one after the other gives.
#[actix_web::test]
async fn sigkill_keeps_running_totals_to_the_acknowledged_events() {
    let setup = Setup::new("sync = \"interval\"\nsync_interval_ms = 200\n", 2_000).await;
    let config = std::fs::read_to_string(setup.config()).unwrap();
    let periods = repo().join("tests/golden/pricing/periods/books");
    std::fs::write(
        setup.config(),
        config.replace(
            &repo().join("pricing").display().to_string(),
            &periods.display().to_string(),
        ),
    )
    .unwrap();
    let customer = emu_post(
        &setup.http,
        &setup.emulator,
        "/customers",
        Some(&setup.account),
        json!({"name": "tiers", "external_id": "tiers"}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // One instant for every event: one window, whenever the test runs.
    let at = ago(5);
    let mut proxy = Proxy::start(&setup.config()).await;
    let load = Load::new(&proxy.url);
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let load = load.clone();
            let key = setup.key.clone();
            let customer = customer.clone();
            let at = at.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut n = 0u64;
                while !load.stop.load(Ordering::SeqCst) {
                    let body = json!({"customer_id": customer, "events": [{
                        "id": format!("k{t}-{n}"), "event_type": "tokens_used",
                        "occurred_at": at, "data": {"tokens": 100000}}]});
                    loop {
                        let url = format!("{}/v1/events", load.url.lock().unwrap());
                        let answer = http
                            .post(url)
                            .header("X-CREDYT-API-KEY", &key)
                            .json(&body)
                            .send()
                            .await;
                        match answer {
                            Ok(r) if r.status() == 200 => {
                                let b: Value = r.json().await.unwrap();
                                let status = b["results"][0]["status"].as_str().unwrap();
                                assert!(status == "accepted" || status == "duplicate", "{b}");
                                break;
                            }
                            Ok(r) if r.status() == 503 => {}
                            Err(_) => {}
                            Ok(r) => {
                                panic!("unexpected answer {}: {:?}", r.status(), r.text().await)
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    load.acked.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                }
                n
            })
        })
        .collect();
    for k in 0..3 {
        let from = load.acked.load(Ordering::SeqCst);
        let min = rand::thread_rng().gen_range(3..8u64);
        eventually(
            Duration::from_secs(20),
            &format!("load on incarnation {k}"),
            || {
                let load = load.clone();
                async move { (load.acked.load(Ordering::SeqCst) >= from + min).then_some(()) }
            },
        )
        .await;
        proxy.kill();
        proxy = Proxy::start(&setup.config()).await;
        *load.url.lock().unwrap() = proxy.url.clone();
    }
    load.stop.store(true, Ordering::SeqCst);
    let mut events = 0u64;
    for c in clients {
        events += c.await.unwrap();
    }
    assert!(events > 10, "the load must cross the tier bound: {events}");
    // One more kill after the last answers, then the total the next event would be rated at.
    proxy.kill();
    let proxy = Proxy::start(&setup.config()).await;
    let q: Value = setup
        .http
        .post(format!("{}/v1/quote?customer_id={customer}", proxy.url))
        .header("X-CREDYT-API-KEY", &setup.key)
        .json(
            &json!({"id": "next", "event_type": "tokens_used", "occurred_at": at,
                      "data": {"tokens": 100000}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = Decimal::from_str_exact(q["running_totals"][0]["total"].as_str().unwrap()).unwrap();
    assert_eq!(total, Decimal::from(events * 100_000), "{q}");
    // 10 events at 0.18 fill the first million; the rest are at 0.12.
    let expected = dec!(1.80) + Decimal::from(events - 10) * dec!(0.12);
    proxy.drained(&setup.http, Duration::from_secs(60)).await;
    let (count, usd) = usd_charges(&setup.state().await, &customer);
    assert_eq!((count, usd), (events, expected));
    drop(proxy);
    setup.emulator.stop().await;
}
