//! The webhook relay, end to end: Credyt's signed webhooks (signed here, independently of the
//! proxy's verifier) posted to the real relay listener, relayed to real tenant receivers on
//! 127.0.0.1:0, verified here against the Standard Webhooks specification.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use credyt_proxy::app::Application;
use credyt_proxy::config::Settings;
use credyt_proxy::emulator::RunningEmulator;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::proxy::{
    emu_account, emu_post, eventually, metric, proxy_config, start_emulator, PLATFORM_KEY,
};

const CREDYT_SECRET: &str = "whsec_relaytestsecret0000000000";
/// The Python side of these tests: the official SDK, the Standard Webhooks library, and a
/// JSON Schema validator for the documented payload.
const QUICKSTART_VENV: &str =
    "credyt-api==0.2.0 standardwebhooks==1.3.0 jsonschema==4.26.0 rfc3339-validator==0.1.4";

/// Validates `body` against `docs/webhook-payload.schema.json` with Python's `jsonschema`
/// (formats checked).
fn assert_valid_payload(body: &[u8]) {
    let python = super::venv::python("quickstart-venv", QUICKSTART_VENV);
    let schema = super::proxy::repo().join("docs/webhook-payload.schema.json");
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             jsonschema.Draft202012Validator.check_schema(schema)\n\
             jsonschema.validate(json.load(sys.stdin), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)",
        ])
        .arg(schema)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} does not validate: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&out.stderr)
    );
}

const ADMIN_TOKEN: &str = "relay-admin-token-0123456789";

/// How a receiver answers.
const OK: u8 = 0;
const UNAVAILABLE: u8 = 1;
/// Holds the request until the mode changes.
const HANG: u8 = 2;

/// One webhook a receiver acknowledged.
#[derive(Clone, Debug)]
pub(super) struct Got {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A tenant's webhook endpoint.
pub(super) struct Receiver {
    pub url: String,
    pub secret: String,
    mode: Arc<AtomicU8>,
    attempts: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Got>>>,
    _server: actix_web::dev::ServerHandle,
}

#[derive(Clone)]
struct ReceiverState {
    mode: Arc<AtomicU8>,
    attempts: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Got>>>,
}

async fn receive(req: HttpRequest, body: web::Bytes, s: web::Data<ReceiverState>) -> HttpResponse {
    s.attempts.fetch_add(1, Ordering::SeqCst);
    match s.mode.load(Ordering::SeqCst) {
        HANG => {
            while s.mode.load(Ordering::SeqCst) == HANG {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The proxy gave this attempt up long ago (it timed out): not an acknowledgement.
            return HttpResponse::ServiceUnavailable().body("too late");
        }
        UNAVAILABLE => return HttpResponse::ServiceUnavailable().body("down for maintenance"),
        _ => {}
    }
    let h = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    s.got.lock().unwrap().push(Got {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
    });
    HttpResponse::NoContent().finish()
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = ReceiverState {
            mode: Arc::new(AtomicU8::new(OK)),
            attempts: Arc::new(AtomicUsize::new(0)),
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            url: format!("http://{addr}/hooks"),
            secret: credyt_proxy::identity::tenants::WebhookSecret::generate(),
            mode: state.mode,
            attempts: state.attempts,
            got: state.got,
            _server: handle,
        }
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Waits until `n` webhooks were acknowledged.
    pub async fn wait_for(&self, n: usize) -> Vec<Got> {
        eventually(Duration::from_secs(20), "webhooks to arrive", || async {
            let got = self.got();
            (got.len() >= n).then_some(got)
        })
        .await
    }

    /// Verifies a delivery as the Standard Webhooks specification says (written here from the
    /// specification, not with the proxy's signer).
    pub fn verify(&self, got: &Got) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = b64
            .decode(self.secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.", got.id, got.timestamp).as_bytes());
        mac.update(&got.body);
        let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
        assert!(
            got.signature.split(' ').any(|s| s == expected),
            "signature {} does not verify",
            got.signature
        );
        let ts: i64 = got.timestamp.parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 300);
    }
}

/// `Credyt-Signature` for `body` at unix time `t`, as API.md §8.3 specifies.
pub(super) fn credyt_signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// The emulator, two tenants with webhook endpoints, and the proxy with its relay.
struct Relayed {
    emulator: RunningEmulator,
    app: Application,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    acc_a: String,
    acc_b: String,
    a: Receiver,
    b: Receiver,
}

const FAST_RETRIES: &str = "retry_schedule_ms = [100, 100, 100, 100, 100, 100, 100, 100]";

impl Relayed {
    async fn start(webhook_config: &str) -> Relayed {
        let emulator = start_emulator().await;
        let http = reqwest::Client::new();
        let dir = tempfile::tempdir().unwrap();
        let acc_a = emu_account(&http, &emulator, "tenant-a", "tenant-a").await;
        let acc_b = emu_account(&http, &emulator, "tenant-b", "tenant-b").await;
        let (a, b) = (Receiver::start().await, Receiver::start().await);
        let (_, hash_a) = credyt_proxy::identity::tenants::generate_key();
        let (_, hash_b) = credyt_proxy::identity::tenants::generate_key();
        // Tenant A by account id, tenant B by external id: both are routed.
        let tenants = format!(
            "[[tenants]]\nid = \"tenant-a\"\nkey_hashes = [\"{hash_a}\"]\naccount = \"{acc_a}\"\n\
             webhook = {{ url = \"{}\", secrets = [\"{}\"] }}\n\n\
             [[tenants]]\nid = \"tenant-b\"\nkey_hashes = [\"{hash_b}\"]\naccount_external_id = \"tenant-b\"\n\
             webhook = {{ url = \"{}\", secrets = [\"{}\"] }}\n",
            a.url, a.secret, b.url, b.secret
        );
        std::fs::write(dir.path().join("tenants.toml"), tenants).unwrap();
        let app = Self::app(&emulator, dir.path(), webhook_config).await;
        Relayed {
            emulator,
            app,
            http,
            dir,
            acc_a,
            acc_b,
            a,
            b,
        }
    }

    async fn app(
        emulator: &RunningEmulator,
        dir: &std::path::Path,
        webhook_config: &str,
    ) -> Application {
        let config = proxy_config(
            emulator,
            "durable",
            "",
            &format!("api_key = \"{PLATFORM_KEY}\""),
            &format!(
                "[webhooks]\ncredyt_secrets = [\"whsec_retired0000000000000000000\", \"{CREDYT_SECRET}\"]\n\
                 listen = \"127.0.0.1:0\"\ndir = \"webhooks\"\n{}{webhook_config}\n\
                 [admin]\ntoken = \"{ADMIN_TOKEN}\"\n",
                if webhook_config.contains("attempt_timeout_ms") { "" } else { "attempt_timeout_ms = 500\n" }
            ),
        )
        .replace("[tenants]\n", "[tenants]\nreload_interval_ms = 100\n");
        let settings = Settings::from_toml(&config, dir, Some(Default::default())).unwrap();
        Application::build(settings).await.unwrap()
    }

    fn relay_url(&self) -> String {
        format!(
            "http://{}/webhooks/credyt",
            self.app.webhook_addr().unwrap()
        )
    }

    /// Posts `body` to the relay as Credyt would, signed now.
    async fn post_signed(&self, body: &Value) -> reqwest::Response {
        let bytes = serde_json::to_vec(body).unwrap();
        let sig = credyt_signature(CREDYT_SECRET, chrono::Utc::now().timestamp(), &bytes);
        self.post(bytes, Some(sig)).await
    }

    /// Posts `body` signed and checks that the relay recorded it for its tenant.
    async fn accept(&self, body: &Value) {
        assert_eq!(
            outcome(self.post_signed(body).await).await,
            "accepted",
            "{body}"
        );
    }

    async fn post(&self, body: Vec<u8>, signature: Option<String>) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.relay_url())
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("Credyt-Signature", sig);
        }
        req.send().await.unwrap()
    }

    async fn customer(&self, account: &str, external_id: &str) -> String {
        emu_post(
            &self.http,
            &self.emulator,
            "/customers",
            Some(account),
            json!({"name": external_id, "external_id": external_id}),
        )
        .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn metric(&self, name: &str) -> u64 {
        metric(
            &self.http,
            &format!("http://{}", self.app.admin_addr()),
            name,
        )
        .await
        .unwrap_or(0)
    }
}

fn threshold_hit(id: &str, account: &str, customer: &str) -> Value {
    json!({
        "id": id,
        "account": account,
        "event_type": "balance_threshold_hit",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"customer_id": customer, "account_id": "default:USD", "available": 4.5, "threshold": 5.0}
    })
}

async fn outcome(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["outcome"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_webhook_reaches_its_own_tenant_once_signed_and_enriched() {
    let w = Relayed::start(FAST_RETRIES).await;
    let cust_a = w.customer(&w.acc_a, "user-a1").await;
    let cust_b = w.customer(&w.acc_b, "user-b1").await;
    let hit = threshold_hit("whe_a1", &w.acc_a, &cust_a);
    w.accept(&hit).await;
    // Credyt redelivers it (re-signed, later): recorded once, delivered once.
    assert_eq!(outcome(w.post_signed(&hit).await).await, "duplicate");
    // Tenant B's webhook (B is configured by external id) goes to B only.
    let hit_b = threshold_hit("whe_b1", &w.acc_b, &cust_b);
    w.accept(&hit_b).await;

    let got_b = w.b.wait_for(1).await;
    let got_a = w.a.wait_for(1).await;
    // A marker after the redelivery: once it arrives, anything the redelivery caused has too.
    let marker = threshold_hit("whe_a2", &w.acc_a, &cust_a);
    w.accept(&marker).await;
    let got_a = {
        let _ = got_a;
        w.a.wait_for(2).await
    };
    assert_eq!(
        got_a.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["whe_a1", "whe_a2"]
    );
    assert_eq!(got_b.len(), 1);
    assert_eq!(w.b.got().len(), 1, "tenant b got only its own webhook");
    assert_eq!(got_b[0].id, "whe_b1");
    w.a.verify(&got_a[0]);
    w.b.verify(&got_b[0]);
    let body = got_a[0].json();
    assert_eq!(body["type"], "balance_threshold_hit");
    assert_eq!(body["tenant"], "tenant-a");
    assert_eq!(body["account"], w.acc_a.as_str());
    assert_eq!(body["timestamp"], hit["occurred_at"]);
    assert_eq!(
        body["customer"],
        json!({"id": cust_a, "external_id": "user-a1"})
    );
    assert_eq!(body["data"], hit["data"]);
    assert_eq!(got_b[0].json()["customer"]["external_id"], "user-b1");
    // What tenants get is what the documented schema says.
    assert_valid_payload(&got_a[0].body);
    assert_valid_payload(&got_b[0].body);
    assert_eq!(
        w.metric("credyt_proxy_webhooks_received_total{outcome=\"duplicate\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn refused_webhooks_answer_problems_and_nothing_is_delivered() {
    let w = Relayed::start(&format!("{FAST_RETRIES}\nmax_body_bytes = 4096")).await;
    let cust = w.customer(&w.acc_a, "user-1").await;
    let now = chrono::Utc::now().timestamp();
    let good = serde_json::to_vec(&threshold_hit("whe_bad", &w.acc_a, &cust)).unwrap();
    let mut changed = good.clone();
    let at = changed.iter().position(|&b| b == b'4').unwrap();
    changed[at] = b'9';
    let big = serde_json::to_vec(&json!({
        "id": "whe_big", "account": w.acc_a, "event_type": "x",
        "occurred_at": chrono::Utc::now().to_rfc3339(), "data": {"pad": "x".repeat(5000)}
    }))
    .unwrap();
    let not_json = b"{not json".to_vec();
    // (what, body, Credyt-Signature, status, code)
    type Case<'a> = (&'a str, Vec<u8>, Option<String>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no header", good.clone(), None, 401, "missing_signature"),
        (
            "wrong secret",
            good.clone(),
            Some(credyt_signature("whsec_other", now, &good)),
            401,
            "invalid_signature",
        ),
        (
            "stale",
            good.clone(),
            Some(credyt_signature(CREDYT_SECRET, now - 301, &good)),
            401,
            "stale_signature",
        ),
        (
            "from the future",
            good.clone(),
            Some(credyt_signature(CREDYT_SECRET, now + 301, &good)),
            401,
            "stale_signature",
        ),
        (
            "changed after signing",
            changed,
            Some(credyt_signature(CREDYT_SECRET, now, &good)),
            401,
            "invalid_signature",
        ),
        (
            "malformed header",
            good.clone(),
            Some("v0=abc".into()),
            400,
            "malformed_signature",
        ),
        (
            "oversized",
            big.clone(),
            Some(credyt_signature(CREDYT_SECRET, now, &big)),
            413,
            "payload_too_large",
        ),
        (
            "not an envelope",
            not_json.clone(),
            Some(credyt_signature(CREDYT_SECRET, now, &not_json)),
            400,
            "invalid_webhook",
        ),
    ];
    for (what, body, sig, status, code) in cases {
        let resp = w.post(body, sig).await;
        assert_eq!(resp.status(), status, "{what}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["code"], code, "{what}");
    }
    // Other methods and paths of the relay listener.
    let get = w.http.get(w.relay_url()).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    // Nothing refused was recorded: the same id, now properly signed, is new, and it is the
    // only webhook tenant A receives.
    let resp = w
        .post(
            good.clone(),
            Some(credyt_signature(CREDYT_SECRET, now, &good)),
        )
        .await;
    assert_eq!(outcome(resp).await, "accepted");
    let got = w.a.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, "whe_bad");
    assert_eq!(
        w.metric("credyt_proxy_webhooks_received_total{outcome=\"refused\"}")
            .await,
        8
    );
}

#[tokio::test]
async fn an_endpoint_down_for_a_while_gets_the_webhook_once_it_recovers() {
    let w = Relayed::start(FAST_RETRIES).await;
    let cust = w.customer(&w.acc_a, "user-1").await;
    // 503 first.
    w.a.set(UNAVAILABLE);
    w.accept(&threshold_hit("whe_down", &w.acc_a, &cust)).await;
    eventually(Duration::from_secs(10), "a 503 attempt", || async {
        (w.a.attempts() >= 1).then_some(())
    })
    .await;
    assert_eq!(w.metric("credyt_proxy_webhooks_pending").await, 1);
    // Then connection refused: the tenant's URL points at a closed port for a while.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let tenants = w.dir.path().join("tenants.toml");
    let original = std::fs::read_to_string(&tenants).unwrap();
    std::fs::write(
        &tenants,
        original.replace(&w.a.url, &format!("http://{closed}/hooks")),
    )
    .unwrap();
    let failed_before = w
        .metric("credyt_proxy_webhook_attempts_total{result=\"failed\"}")
        .await;
    eventually(Duration::from_secs(10), "refused attempts", || async {
        let failed = w
            .metric("credyt_proxy_webhook_attempts_total{result=\"failed\"}")
            .await;
        (failed >= failed_before + 2).then_some(())
    })
    .await;
    // Then a timeout: the endpoint is back but hangs past the attempt timeout.
    w.a.set(HANG);
    let attempts = w.a.attempts();
    std::fs::write(&tenants, &original).unwrap();
    eventually(Duration::from_secs(10), "a hanging attempt", || async {
        (w.a.attempts() > attempts).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(w.a.got().is_empty());
    // Recovered: delivered, once.
    w.a.set(OK);
    let got = w.a.wait_for(1).await;
    assert_eq!(got[0].id, "whe_down");
    w.a.verify(&got[0]);
    // A later webhook arrives after it; the first is never sent again.
    w.accept(&threshold_hit("whe_after", &w.acc_a, &cust)).await;
    let got = w.a.wait_for(2).await;
    let ids: Vec<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(
        ids.iter().filter(|i| **i == "whe_down").count(),
        1,
        "{ids:?}"
    );
}

#[tokio::test]
async fn a_hanging_tenant_does_not_delay_another_tenants_delivery() {
    // Long attempts: tenant A's endpoint holds every one of its slots for 30 s.
    let w = Relayed::start(
        "attempt_timeout_ms = 30000\nper_tenant_concurrency = 2\nretry_schedule_ms = [100]",
    )
    .await;
    let cust_a = w.customer(&w.acc_a, "user-a").await;
    let cust_b = w.customer(&w.acc_b, "user-b").await;
    w.a.set(HANG);
    for i in 0..6 {
        let hit = threshold_hit(&format!("whe_a{i}"), &w.acc_a, &cust_a);
        w.accept(&hit).await;
    }
    eventually(
        Duration::from_secs(10),
        "tenant a's slots to fill",
        || async { (w.a.attempts() >= 2).then_some(()) },
    )
    .await;
    let sent = std::time::Instant::now();
    w.accept(&threshold_hit("whe_b", &w.acc_b, &cust_b)).await;
    let got = w.b.wait_for(1).await;
    let latency = sent.elapsed();
    // Tenant B's webhook was delivered while every attempt to tenant A was still hanging.
    assert!(w.a.got().is_empty());
    assert_eq!(
        w.a.attempts(),
        2,
        "tenant a never had more than its 2 slots"
    );
    eprintln!("tenant b delivered in {latency:?} while tenant a hangs");
    assert_eq!(got[0].id, "whe_b");
    // Once A recovers, all six arrive, once each.
    w.a.set(OK);
    let got = w.a.wait_for(6).await;
    let mut ids: Vec<String> = got.iter().map(|g| g.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
}

#[tokio::test]
async fn unroutable_and_never_delivered_webhooks_become_dead_letters_and_replay_once() {
    let w = Relayed::start("retry_schedule_ms = [50, 50]").await;
    let cust = w.customer(&w.acc_a, "user-1").await;
    // An account no tenant owns: answered 200 (Credyt stops retrying), kept as a dead letter.
    let stranger = emu_account(&w.http, &w.emulator, "x", "x").await;
    let stranger = stranger.as_str();
    assert_eq!(
        outcome(
            w.post_signed(&threshold_hit("whe_stranger", stranger, "cust_x"))
                .await
        )
        .await,
        "unroutable"
    );
    // An endpoint that never recovers: three attempts, then a dead letter with the reason.
    w.a.set(UNAVAILABLE);
    w.accept(&threshold_hit("whe_never", &w.acc_a, &cust)).await;
    let outbox = w.app.webhook_outbox().unwrap().clone();
    let dead = eventually(Duration::from_secs(10), "two dead letters", || async {
        let dead = outbox.dead_letters().unwrap();
        (dead.len() == 2).then_some(dead)
    })
    .await;
    let code_of = |id: &str| {
        dead.iter()
            .find(|d| d.delivery.event_id().as_str() == id)
            .unwrap()
            .clone()
    };
    let unroutable = code_of("whe_stranger");
    assert_eq!(unroutable.code.as_str(), "unroutable");
    assert!(
        unroutable.reason.contains(stranger),
        "{}",
        unroutable.reason
    );
    let never = code_of("whe_never");
    assert_eq!(never.code.as_str(), "retries_exhausted");
    assert!(never.reason.contains("503"), "{}", never.reason);
    assert_eq!(never.upstream_status, Some(503));
    assert_eq!(w.a.attempts(), 3);
    assert_eq!(
        w.metric("credyt_proxy_webhook_dead_letters_total{code=\"unroutable\"}")
            .await,
        1
    );
    assert_eq!(w.metric("credyt_proxy_webhooks_dead_letters").await, 2);
    assert_eq!(w.metric("credyt_proxy_webhooks_pending").await, 0);
    drop(outbox);
    // The admin port lists them while the proxy runs.
    let page: Value = w
        .http
        .get(format!(
            "http://{}/admin/webhooks/dead-letters",
            w.app.admin_addr()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = page["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{page}");
    let stranger_view = listed.iter().find(|l| l["code"] == "unroutable").unwrap();
    assert_eq!(stranger_view["delivery"]["kind"], "webhook");
    assert_eq!(stranger_view["delivery"]["event_id"], "whe_stranger");
    assert_eq!(
        stranger_view["delivery"]["event_type"],
        "balance_threshold_hit"
    );
    assert_eq!(stranger_view["delivery"]["tenant"], "");
    // The operator's tools, with the proxy stopped: list, then replay, then start again.
    let Relayed {
        emulator,
        app,
        dir,
        a,
        ..
    } = w;
    app.stop().await;
    let data_dir = dir.path().join("webhooks");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credyt-proxy"))
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Vec<Value> = cli(&["webhooks", "dlq", "list"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut codes: Vec<&str> = listed.iter().map(|l| l["code"].as_str().unwrap()).collect();
    codes.sort();
    assert_eq!(codes, ["retries_exhausted", "unroutable"]);
    let never_seq = listed
        .iter()
        .find(|l| l["delivery"]["event_id"] == "whe_never")
        .unwrap()["seq"]
        .as_u64()
        .unwrap()
        .to_string();
    // The endpoint is back: replay the one that failed; it is delivered once.
    a.set(OK);
    assert!(cli(&["webhooks", "dlq", "replay", "--seq", &never_seq]).starts_with("1 dead letter"));
    let app = Relayed::app(&emulator, dir.path(), "retry_schedule_ms = [50, 50]").await;
    let got = a.wait_for(1).await;
    assert_eq!(got[0].id, "whe_never");
    a.verify(&got[0]);
    let outbox = app.webhook_outbox().unwrap();
    assert_eq!(
        outbox.dead_letters().unwrap().len(),
        1,
        "the unroutable one stays"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.got().len(), 1);
}

#[tokio::test]
async fn a_webhook_acknowledged_to_credyt_survives_sigkill_and_is_delivered_once() {
    use super::crash::Proxy;
    let emulator = start_emulator().await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let acc = emu_account(&http, &emulator, "a", "a").await;
    let receiver = Receiver::start().await;
    let (_, hash) = credyt_proxy::identity::tenants::generate_key();
    std::fs::write(
        dir.path().join("tenants.toml"),
        format!(
            "[[tenants]]\nid = \"tenant-a\"\nkey_hashes = [\"{hash}\"]\naccount = \"{acc}\"\n\
             webhook = {{ url = \"{}\", secrets = [\"{}\"] }}\n",
            receiver.url, receiver.secret
        ),
    )
    .unwrap();
    let relay_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [log]\nformat = \"json\"\nfilter = \"info\"\n\
             [credyt]\nbase_url = \"{}\"\napi_key = \"{PLATFORM_KEY}\"\n\
             [tenants]\nfile = \"tenants.toml\"\n\
             [pricing]\ndir = \"{}\"\n\
             [outbox]\ndir = \"outbox\"\n\
             [webhooks]\ncredyt_secrets = [\"{CREDYT_SECRET}\"]\nlisten = \"127.0.0.1:{relay_port}\"\n\
             dir = \"webhooks\"\nretry_schedule_ms = [600000]\n",
            emulator.url(),
            super::proxy::repo().join("pricing").display(),
        ),
    )
    .unwrap();
    let relay = format!("http://127.0.0.1:{relay_port}/webhooks/credyt");
    let post = |id: &str| {
        let body = serde_json::to_vec(&threshold_hit(id, &acc, "cust_1")).unwrap();
        let sig = credyt_signature(CREDYT_SECRET, chrono::Utc::now().timestamp(), &body);
        http.post(&relay)
            .header("Credyt-Signature", sig)
            .body(body)
            .send()
    };

    receiver.set(UNAVAILABLE);
    let mut proxy = Proxy::start(&config).await;
    let resp = post("whe_killed").await.unwrap();
    assert_eq!(resp.status(), 200, "credyt got its 2xx");
    eventually(Duration::from_secs(10), "a failed attempt", || async {
        (receiver.attempts() >= 1).then_some(())
    })
    .await;
    proxy.child.kill().unwrap(); // SIGKILL
    proxy.child.wait().unwrap();
    assert!(receiver.got().is_empty());

    receiver.set(OK);
    let _proxy = Proxy::start(&config).await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].id, "whe_killed");
    receiver.verify(&got[0]);
    // Credyt redelivers it after the restart: still only once at the tenant.
    assert_eq!(post("whe_killed").await.unwrap().status(), 200);
    assert_eq!(post("whe_marker").await.unwrap().status(), 200);
    let got = receiver.wait_for(2).await;
    let ids: Vec<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["whe_killed", "whe_marker"]);
}

/// A free port on 127.0.0.1 (bound, then released for a process to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines a child process writes to stdout, collected as they come.
fn collect_lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Kills a child process when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The C4P quickstart with the real binaries, the official SDK and the Python Standard
/// Webhooks library: register the platform's connect destination, onboard a tenant (twice:
/// nothing new the second time), the platform funds an end user, the tenant spends through the
/// proxy with its own key until the balance crosses the threshold, and the tenant's receiver
/// (`examples/webhooks/receiver.py`) gets exactly one verified `balance_threshold_hit` for its
/// own end user.
#[tokio::test]
async fn the_c4p_quickstart_closes_the_loop_with_the_official_sdk() {
    let python = super::venv::python("quickstart-venv", QUICKSTART_VENV);
    let bin = env!("CARGO_BIN_EXE_credyt-proxy");
    let (emu_port, relay_port, recv_port) = (free_port(), free_port(), free_port());
    let emu_url = format!("http://127.0.0.1:{emu_port}");
    let _emulator = Kill(
        std::process::Command::new(bin)
            .args([
                "emulator",
                "--listen",
                &format!("127.0.0.1:{emu_port}"),
                "--platform-key",
                PLATFORM_KEY,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), "the emulator", || async {
        http.get(format!("{emu_url}/accounts"))
            .header("X-CREDYT-API-KEY", PLATFORM_KEY)
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let base_config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [log]\nformat = \"json\"\nfilter = \"info\"\n\
         [credyt]\nbase_url = \"{emu_url}\"\napi_key = \"{PLATFORM_KEY}\"\n\
         [tenants]\nfile = \"tenants.toml\"\n\
         [pricing]\ndir = \"{}\"\n\
         [outbox]\ndir = \"outbox\"\n",
        super::proxy::repo().join("pricing").display()
    );
    std::fs::write(&config, &base_config).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let line_after = |text: &str, prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
            .trim()
            .to_string()
    };
    let cfg = config.to_str().unwrap();

    // 1. The platform registers its connect destination: the relay.
    let relay_url = format!("http://127.0.0.1:{relay_port}/webhooks/credyt");
    let (ok, out, err) = run(&["webhooks", "register", "--config", cfg, "--url", &relay_url]);
    assert!(ok, "{out}{err}");
    let credyt_secret = line_after(&out, "signing secret:");
    std::fs::write(
        &config,
        format!(
            "{base_config}[webhooks]\ncredyt_secrets = [\"{credyt_secret}\"]\n\
             listen = \"127.0.0.1:{relay_port}\"\ndir = \"webhooks\"\n"
        ),
    )
    .unwrap();

    // 2. Onboard the tenant; a second run creates nothing and changes nothing.
    let receiver_url = format!("http://127.0.0.1:{recv_port}/");
    let create = [
        "tenant",
        "create",
        "--config",
        cfg,
        "--id",
        "acme",
        "--name",
        "Acme",
        "--webhook-url",
        &receiver_url,
    ];
    let (ok, out, err) = run(&create);
    assert!(ok, "{out}{err}");
    let tenant_key = line_after(&out, "key:");
    let webhook_secret = line_after(&out, "webhook secret:");
    let tenants = std::fs::read(dir.path().join("tenants.toml")).unwrap();
    let (ok, out, err) = run(&create);
    assert!(!ok, "a second create must refuse: {out}{err}");
    assert_eq!(
        std::fs::read(dir.path().join("tenants.toml")).unwrap(),
        tenants
    );
    let accounts: Value = http
        .get(format!("{emu_url}/accounts?external_id=acme"))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(accounts["total_count"], 1, "{accounts}");
    let account = accounts["items"][0]["id"].as_str().unwrap().to_string();
    // A threshold-hit fires when a wallet goes below 5.
    let resp = http
        .put(format!("{emu_url}/_emulator/thresholds"))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .json(&json!({"default_threshold": 5}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    // 3. The tenant's receiver, verifying with the `standardwebhooks` package.
    let mut receiver = std::process::Command::new(&python)
        .arg(super::proxy::repo().join("examples/webhooks/receiver.py"))
        .args([
            "--port",
            &recv_port.to_string(),
            "--secret",
            &webhook_secret,
        ])
        .env("PYTHONUNBUFFERED", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let received = collect_lines(&mut receiver);
    let _receiver = Kill(receiver);
    let _proxy = super::crash::Proxy::start(&config).await;
    let proxy_url = _proxy.url.clone();

    // 4. The platform funds the end user; the tenant spends through the proxy with its SDK.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(super::proxy::repo().join("tests/sdk/c4p_loop.py"))
            .envs([
                ("CREDYT_BASE_URL", emu_url.as_str()),
                ("CREDYT_API_KEY", PLATFORM_KEY),
                ("ACCOUNT", account.as_str()),
                ("PROXY_URL", proxy_url.as_str()),
                ("TENANT_KEY", tenant_key.as_str()),
                ("END_USER", "acme-user-1"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 5. Exactly one verified balance_threshold_hit, for the tenant's own end user.
    let hits = || {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("balance_threshold_hit"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let first = eventually(
        Duration::from_secs(30),
        "the relayed threshold hit",
        || async { hits().first().cloned() },
    )
    .await;
    assert!(first.contains("tenant=acme"), "{first}");
    assert!(first.contains("customer=acme-user-1"), "{first}");
    assert!(first.contains("available=4.5"), "{first}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hits().len(), 1, "{:?}", received.lock().unwrap());
}

/// The sandbox closes the loop by itself, and the auto top-up example does what it says: the
/// demo end user spends below the threshold, the sandbox's emulator sends
/// `balance_threshold_hit` to the sandbox's relay, the relay relays it to the demo tenant's
/// endpoint where `examples/webhooks/auto_topup.py` runs, and the wallet is credited once.
#[tokio::test]
async fn the_sandbox_relays_the_threshold_hit_and_the_auto_top_up_example_credits_once() {
    let python = super::venv::python("quickstart-venv", QUICKSTART_VENV);
    let repo = super::proxy::repo();
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = std::fs::read_to_string(repo.join("examples/sandbox/config.toml"))
        .unwrap()
        .replace(
            "\"../../pricing\"",
            &format!("\"{}\"", repo.join("pricing").display()),
        );
    std::fs::write(files.path().join("config.toml"), config).unwrap();
    std::fs::copy(
        repo.join("examples/sandbox/seed.json"),
        files.path().join("seed.json"),
    )
    .unwrap();
    let tenants = std::fs::read_to_string(repo.join("examples/sandbox/tenants.toml"))
        .unwrap()
        .replace(
            "http://127.0.0.1:8090/",
            &format!("http://127.0.0.1:{port}/"),
        );
    std::fs::write(files.path().join("tenants.toml"), tenants).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut sandbox = std::process::Command::new(env!("CARGO_BIN_EXE_credyt-proxy"))
        .arg("sandbox")
        .arg("--dir")
        .arg(files.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args([
            "--emulator-listen",
            "127.0.0.1:0",
            "--webhooks-listen",
            "127.0.0.1:0",
        ])
        .env("CREDYT_PROXY_SANDBOX_DATA_DIR", data.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let banner = collect_lines(&mut sandbox);
    let _sandbox = Kill(sandbox);
    let field = |name: &str| {
        let banner = banner.clone();
        let name = name.to_string();
        async move {
            eventually(Duration::from_secs(30), "the sandbox banner", || async {
                banner.lock().unwrap().iter().find_map(|l| {
                    l.trim()
                        .strip_prefix(&name)
                        .and_then(|r| r.split_whitespace().next())
                        .map(str::to_string)
                })
            })
            .await
        }
    };
    let proxy = field("proxy (tenant API):").await;
    let emulator = field("credyt emulator:").await;
    let secret = field("python3 examples/webhooks/receiver.py --port 8090 --secret").await;
    assert!(secret.starts_with("whsec_"), "{secret}");

    let mut topup = std::process::Command::new(&python)
        .arg(repo.join("examples/webhooks/auto_topup.py"))
        .args(["--port", &port.to_string(), "--secret", &secret])
        .args([
            "--credyt-url",
            &emulator,
            "--platform-key",
            "sandbox-platform-key",
        ])
        .args(["--amount", "10.00"])
        .env("PYTHONUNBUFFERED", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let topups = collect_lines(&mut topup);
    let _topup = Kill(topup);
    eventually(
        Duration::from_secs(30),
        "the auto top-up to listen",
        || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    )
    .await;

    // 31 events of 0.50 USD take demo-user-1 from 20.00 to 4.50: below the threshold of 5.
    let http = reqwest::Client::new();
    let now = chrono::Utc::now().to_rfc3339();
    for i in 0..31 {
        let resp = http
            .post(format!("{proxy}/v1/events"))
            .header("X-CREDYT-API-KEY", "cpk_DEMO_sandbox_only_not_a_secret")
            .json(&json!({"customer_external_id": "demo-user-1",
                "events": [{"id": format!("loop-{i}"), "event_type": "video_promoted", "occurred_at": now}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let available = || async {
        let state: Value = http
            .get(format!("{emulator}/_emulator/state"))
            .header("X-CREDYT-API-KEY", "sandbox-platform-key")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        super::proxy::wallet(&state, "cust_4dem0000000000000000000001", "USD").map(|w| w.0)
    };
    eventually(Duration::from_secs(30), "the automatic top-up", || async {
        (available().await == Some(rust_decimal_macros::dec!(14.50))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        available().await,
        Some(rust_decimal_macros::dec!(14.50)),
        "credited once"
    );
    assert_eq!(
        topups
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("cust_4dem0000000000000000000001") || l.contains("demo-user-1"))
            .count(),
        1,
        "{:?}",
        topups.lock().unwrap()
    );
}

/// A tenant takes only the topics it lists; the generic envelope is relayed like the C4P one.
#[tokio::test]
async fn a_tenant_receives_only_its_topics_in_either_envelope() {
    let w = Relayed::start(FAST_RETRIES).await;
    let tenants = w.dir.path().join("tenants.toml");
    let text = std::fs::read_to_string(&tenants).unwrap().replacen(
        "secrets = [",
        "topics = [\"subscription.activated\"], secrets = [",
        1,
    );
    std::fs::write(&tenants, text).unwrap();
    eventually(
        Duration::from_secs(10),
        "the tenants file reload",
        || async {
            let hit = threshold_hit(
                &format!("whe_probe{}", uuid::Uuid::new_v4().simple()),
                &w.acc_a,
                "cust_1",
            );
            (outcome(w.post_signed(&hit).await).await == "filtered").then_some(())
        },
    )
    .await;
    let cust = w.customer(&w.acc_a, "user-sub").await;
    let generic = json!({
        "id": "evt_sub1", "type": "subscription.activated", "account": w.acc_a,
        "created": chrono::Utc::now().to_rfc3339(), "live_mode": false,
        "data": {"customer_id": cust, "subscription_id": "sub_1", "occurred_at": chrono::Utc::now().to_rfc3339()}
    });
    w.accept(&generic).await;
    let got = w.a.wait_for(1).await;
    assert_eq!(got.len(), 1, "filtered webhooks are not relayed");
    let body = got[0].json();
    assert_eq!(body["type"], "subscription.activated");
    assert_eq!(body["timestamp"], generic["created"]);
    assert_eq!(body["customer"]["external_id"], "user-sub");
    assert_valid_payload(&got[0].body);
    w.a.verify(&got[0]);
}
