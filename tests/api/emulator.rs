//! The Credyt emulator over real HTTP on 127.0.0.1:0: the official SDK's quickstart, account
//! partitions and auth, signed C4P webhooks (with retries), fault injection, idempotent and
//! exact wallet movements, lookups/paging, usage events, and the sandbox seed.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use credyt_proxy::emulator::{self, EmulatorConfig, RunningEmulator, Seed};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::Sha256;

const KEY: &str = "key_test_platform";
const OTHER_KEY: &str = "key_other_platform";

struct Emu {
    em: RunningEmulator,
    http: reqwest::Client,
}

async fn spawn_with(config: EmulatorConfig) -> Emu {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let em = emulator::start(config, listener).await.unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Emu { em, http }
}

fn config() -> EmulatorConfig {
    EmulatorConfig {
        platform_keys: vec![KEY.into(), OTHER_KEY.into()],
        webhook_retry_schedule: vec![Duration::from_millis(50), Duration::from_millis(50)],
        webhook_timeout: Duration::from_secs(2),
        ..EmulatorConfig::default()
    }
}

async fn spawn() -> Emu {
    spawn_with(config()).await
}

fn dec(v: &Value) -> Decimal {
    assert!(v.is_number(), "expected a JSON number, got {v}");
    Decimal::from_str(&v.to_string()).unwrap()
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

impl Emu {
    fn request(
        &self,
        method: Method,
        path: &str,
        account: Option<&str>,
    ) -> reqwest::RequestBuilder {
        self.request_as(KEY, method, path, account)
    }

    fn request_as(
        &self,
        key: &str,
        method: Method,
        path: &str,
        account: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.em.url(), path))
            .header("X-CREDYT-API-KEY", key);
        if let Some(acc) = account {
            r = r.header("X-CREDYT-ACCOUNT", acc);
        }
        r
    }

    /// Sends `body` (raw JSON text, so decimals stay exactly as written) and reads a JSON answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        account: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut r = self.request(method, path, account);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let res = r.send().await.unwrap();
        let status = res.status();
        let bytes = res.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value)
    }

    async fn create_account(&self, name: &str) -> String {
        let body = json!({ "name": name, "external_id": format!("ext-{name}") }).to_string();
        let (s, v) = self
            .call(Method::POST, "/accounts", None, Some(&body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn create_customer(&self, account: Option<&str>, external_id: &str) -> String {
        let body = json!({ "name": format!("Customer {external_id}"), "external_id": external_id })
            .to_string();
        let (s, v) = self
            .call(Method::POST, "/customers", account, Some(&body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["subscriptions"], json!([]));
        v["id"].as_str().unwrap().to_owned()
    }

    async fn post_raw(&self, path: &str, account: Option<&str>, body: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, account, Some(body)).await
    }

    async fn state(&self) -> Value {
        let (s, v) = self.call(Method::GET, "/_emulator/state", None, None).await;
        assert_eq!(s, StatusCode::OK);
        v
    }

    async fn available(&self, account: Option<&str>, customer: &str) -> Decimal {
        let (s, v) = self
            .call(
                Method::GET,
                &format!("/customers/{customer}/wallet/default%3AUSD"),
                account,
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        dec(&v["available"])
    }
}

/// The wallet entry of `customer` in `/_emulator/state`.
fn state_wallet<'a>(state: &'a Value, customer: &str, wallet: &str) -> &'a Value {
    state["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["customers"].as_array().unwrap())
        .find(|c| c["id"] == customer)
        .and_then(|c| {
            c["wallet"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["id"] == wallet)
        })
        .unwrap_or_else(|| panic!("no wallet {wallet} for {customer} in {state}"))
}

#[actix_web::test]
async fn sdk_quickstart_against_the_emulator() {
    let emu = spawn().await;
    let base = emu.em.url();
    let out = tokio::task::spawn_blocking(move || {
        crate::sdk::run_script(
            "c4p_quickstart.py",
            &[("CREDYT_BASE_URL", &base), ("CREDYT_API_KEY", KEY)],
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["available"], "19.65");
    let acc = summary["account_id"].as_str().unwrap();
    let cust = summary["customer_id"].as_str().unwrap();

    let state = emu.state().await;
    let account = state["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == acc)
        .unwrap();
    assert_eq!(account["connected"], true);
    let w = state_wallet(&state, cust, "default:USD");
    assert_eq!(dec(&w["available"]), d("19.65"));
    assert_eq!(w["charges"]["count"], 1);
    assert_eq!(dec(&w["charges"]["total"]), d("0.35"));
    assert_eq!(w["adjustments"]["count"], 1);
    assert_eq!(dec(&w["adjustments"]["total"]), d("20"));
    assert_eq!(account["events"], 1);
    emu.em.stop().await;
}

#[actix_web::test]
async fn accounts_are_partitioned_and_authenticated() {
    let emu = spawn().await;
    let a = emu.create_account("alpha").await;
    let b = emu.create_account("beta").await;
    let cust = emu.create_customer(Some(&a), "u-1").await;

    let path = format!("/customers/{cust}");
    let (s, v) = emu.call(Method::GET, &path, Some(&a), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], cust.as_str());
    for other in [Some(b.as_str()), None] {
        let (s, v) = emu.call(Method::GET, &path, other, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{other:?}: {v}");
        assert_eq!(v["status"], 404);
    }
    // The same external id is free in another partition, taken in the same one.
    emu.create_customer(Some(&b), "u-1").await;
    let (s, v) = emu
        .post_raw(
            "/customers",
            Some(&a),
            r#"{"name":"dup","external_id":"u-1"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["status"], 409);

    // Account external ids are unique per platform.
    let (s, v) = emu
        .post_raw(
            "/accounts",
            None,
            r#"{"name":"again","external_id":"ext-alpha"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // /accounts/self describes the connected account under X-CREDYT-ACCOUNT.
    let (_, me) = emu
        .call(Method::GET, "/accounts/self", Some(&a), None)
        .await;
    assert_eq!(me["account_id"], a.as_str());
    let (_, platform) = emu.call(Method::GET, "/accounts/self", None, None).await;
    assert_ne!(platform["account_id"], a.as_str());
    assert_eq!(platform["environment"], "test");

    // Bad or missing key: 401 with an empty body.
    for key in [Some("key_wrong"), None] {
        let mut r = emu
            .http
            .get(format!("{}/customers/{cust}", emu.em.url()))
            .header("X-CREDYT-ACCOUNT", &a);
        if let Some(k) = key {
            r = r.header("X-CREDYT-API-KEY", k);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert!(res.bytes().await.unwrap().is_empty());
    }

    // Unknown account, and an account of another platform: 403 problem+json.
    let (s, other_acc) = {
        let res = emu
            .request_as(OTHER_KEY, Method::POST, "/accounts", None)
            .header("content-type", "application/json")
            .body(r#"{"name":"foreign"}"#)
            .send()
            .await
            .unwrap();
        let s = res.status();
        let v: Value = res.json().await.unwrap();
        (s, v["id"].as_str().unwrap().to_owned())
    };
    assert_eq!(s, StatusCode::CREATED);
    for acc in ["acc_4zzzzzzzzzzzzzzzzzzzzzzzzz", other_acc.as_str()] {
        let res = emu
            .request(Method::GET, "/customers", Some(acc))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        assert!(res.headers().get("retry-after").is_none());
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["status"], 403);
        assert!(v["detail"].as_str().unwrap().contains(acc));
    }
    // C4P: no built-in top-ups on connected accounts.
    let (s, v) = emu
        .post_raw(
            "/top-ups",
            Some(&a),
            r#"{"customer_id":"x","amount":5,"currency":"USD"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["errors"]["X-CREDYT-ACCOUNT"].is_array(), "{v}");

    // The other platform sees none of this platform's accounts.
    let res = emu
        .request_as(OTHER_KEY, Method::GET, &format!("/accounts/{a}"), None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    emu.em.stop().await;
}

// ---- webhooks -------------------------------------------------------------------------------

#[derive(Clone)]
struct Received {
    path: String,
    signature: String,
    body: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Statuses to answer, in order; 200 once exhausted.
    script: Arc<Mutex<VecDeque<u16>>>,
}

async fn receive(rx: web::Data<Receiver>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    rx.got.lock().push(Received {
        path: req.path().to_owned(),
        signature: req
            .headers()
            .get("credyt-signature")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: body.to_vec(),
    });
    let status = rx.script.lock().pop_front().unwrap_or(200);
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).finish()
}

async fn start_receiver(script: &[u16]) -> (Receiver, String, actix_web::dev::ServerHandle) {
    let rx = Receiver::default();
    rx.script.lock().extend(script.iter().copied());
    let data = web::Data::new(rx.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
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
    (rx, url, handle)
}

/// Independent check of `Credyt-Signature: t=<unix>,v0=<hex>` (API.md §8.3).
fn verify_signature(header: &str, secret: &str, body: &[u8]) {
    let mut t = None;
    let mut v0 = Vec::new();
    for part in header.split(',') {
        let (k, v) = part.split_once('=').unwrap();
        match k {
            "t" => t = Some(v.to_owned()),
            "v0" => v0.push(v.to_owned()),
            _ => {}
        }
    }
    let t = t.expect("t in signature");
    let now = chrono::Utc::now().timestamp();
    assert!((now - t.parse::<i64>().unwrap()).abs() < 60, "stale t={t}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert!(v0.contains(&expected), "bad signature {header}");
}

async fn wait_for(rx: &Receiver, count: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = rx.got.lock().clone();
        if got.len() >= count || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn register_webhook(emu: &Emu, url: &str, connect: bool) -> String {
    let body = json!({ "url": url, "connect": connect }).to_string();
    let (s, v) = emu.post_raw("/webhooks", None, &body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("whd_"));
    let id = v["id"].as_str().unwrap();
    let (s, got) = emu
        .call(Method::GET, &format!("/webhooks/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["topics"], json!(["*"]));
    assert_eq!(got["secret"], v["secret"]);
    v["secret"].as_str().unwrap().to_owned()
}

async fn charge(emu: &Emu, acc: &str, cust: &str, tx: &str, amount: &str) {
    let body = format!(r#"{{"transaction_id":"{tx}","asset":"USD","amount":{amount}}}"#);
    let (s, v) = emu
        .post_raw(
            &format!("/customers/{cust}/wallet/charges"),
            Some(acc),
            &body,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn credit(emu: &Emu, acc: Option<&str>, cust: &str, tx: &str, amount: &str) {
    let body = format!(
        r#"{{"transaction_id":"{tx}","asset":"USD","amount":{amount},"reason":"external_topup"}}"#
    );
    let (s, v) = emu
        .post_raw(&format!("/customers/{cust}/wallet/adjustments"), acc, &body)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[actix_web::test]
async fn webhook_fires_once_when_a_charge_crosses_the_threshold() {
    let emu = spawn_with(EmulatorConfig {
        default_threshold: Some(d("5")),
        ..config()
    })
    .await;
    let (rx, url, receiver) = start_receiver(&[]).await;
    let secret = register_webhook(&emu, &format!("{url}/c4p"), true).await;
    // A platform-only destination must not receive connected-account events.
    register_webhook(&emu, &format!("{url}/platform"), false).await;
    let acc = emu.create_account("hooked").await;
    let cust = emu.create_customer(Some(&acc), "hooked-user").await;

    credit(&emu, Some(&acc), &cust, "top-1", "20").await;
    charge(&emu, &acc, &cust, "c-1", "10").await; // 20 -> 10: stays above 5
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.got.lock().is_empty(), "no crossing, no webhook");

    charge(&emu, &acc, &cust, "c-2", "5.5").await; // 10 -> 4.5: crosses
    let got = wait_for(&rx, 1).await;
    assert_eq!(got.len(), 1);
    charge(&emu, &acc, &cust, "c-3", "1").await; // already below: no second event
    charge(&emu, &acc, &cust, "c-2", "5.5").await; // replay: nothing moves
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = rx.got.lock().clone();
    assert_eq!(got.len(), 1, "exactly one delivery");

    let hit = &got[0];
    assert_eq!(hit.path, "/c4p");
    verify_signature(&hit.signature, &secret, &hit.body);
    let v: Value = serde_json::from_slice(&hit.body).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "account", "event_type", "occurred_at", "data"]);
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("whe_4") && id.len() == 30, "{id}");
    assert_eq!(v["account"], acc.as_str());
    assert_eq!(v["event_type"], "balance_threshold_hit");
    assert!(chrono::DateTime::parse_from_rfc3339(v["occurred_at"].as_str().unwrap()).is_ok());
    let data_keys: Vec<&str> = v["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        data_keys,
        ["customer_id", "account_id", "available", "threshold"]
    );
    assert_eq!(v["data"]["customer_id"], cust.as_str());
    assert_eq!(v["data"]["account_id"], "default:USD");
    assert_eq!(dec(&v["data"]["available"]), d("4.5"));
    assert_eq!(dec(&v["data"]["threshold"]), d("5"));
    assert!(std::str::from_utf8(&hit.body)
        .unwrap()
        .contains(r#""available":4.5"#));

    receiver.stop(true).await;
    emu.em.stop().await;
}

#[actix_web::test]
async fn webhook_is_retried_after_a_failing_answer() {
    let emu = spawn().await; // no default threshold: set one per customer
    let (rx, url, receiver) = start_receiver(&[500]).await;
    let secret = register_webhook(&emu, &url, true).await;
    let acc = emu.create_account("retry").await;
    let cust = emu.create_customer(Some(&acc), "retry-user").await;
    credit(&emu, Some(&acc), &cust, "top", "20").await;
    let body = json!({ "customers": [{ "customer_id": cust, "threshold": 15 }] }).to_string();
    let (s, v) = emu
        .call(
            Method::PUT,
            "/_emulator/thresholds",
            Some(&acc),
            Some(&body),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");

    charge(&emu, &acc, &cust, "dip", "6").await; // 20 -> 14 < 15
    let got = wait_for(&rx, 2).await;
    assert_eq!(got.len(), 2, "first answer 500, then retried");
    assert_eq!(got[0].body, got[1].body, "same event redelivered");
    for r in &got {
        verify_signature(&r.signature, &secret, &r.body);
    }
    let v: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(dec(&v["data"]["available"]), d("14"));
    assert_eq!(dec(&v["data"]["threshold"]), d("15"));

    let (_, log) = emu
        .call(Method::GET, "/_emulator/webhooks", None, None)
        .await;
    let outcomes: Vec<&str> = log["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["retrying", "delivered"]);
    receiver.stop(true).await;
    emu.em.stop().await;
}

// ---- faults ---------------------------------------------------------------------------------

async fn set_faults(emu: &Emu, rules: Value) {
    let (s, v) = emu
        .call(
            Method::PUT,
            "/_emulator/faults",
            None,
            Some(&json!({ "rules": rules }).to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[actix_web::test]
async fn faults_are_injected_and_cleared() {
    let emu = spawn().await;

    set_faults(&emu, json!([{ "path_prefix": "/customers", "method": "GET", "rate_429": 1.0, "retry_after_secs": 2 }])).await;
    let res = emu
        .request(Method::GET, "/customers", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "2");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["status"], 429);
    // Another method is not covered by the rule.
    emu.create_customer(None, "fault-free").await;

    set_faults(
        &emu,
        json!([{ "path_prefix": "/customers", "rate_503": 1.0 }]),
    )
    .await;
    let res = emu
        .request(Method::GET, "/customers", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");

    set_faults(&emu, json!([{ "path_prefix": "/", "rate_500": 1.0 }])).await;
    let res = emu
        .request(Method::GET, "/accounts", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(res.headers().get("retry-after").is_none());

    set_faults(
        &emu,
        json!([{ "path_prefix": "/accounts/self", "latency_ms": 250 }]),
    )
    .await;
    let started = Instant::now();
    let res = emu
        .request(Method::GET, "/accounts/self", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    set_faults(
        &emu,
        json!([{ "path_prefix": "/customers", "rate_drop": 1.0 }]),
    )
    .await;
    // A raw client sees the connection closed without a single byte of HTTP answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(emu.em.addr).await.unwrap();
        let request =
            format!("GET /customers HTTP/1.1\r\nHost: emulator\r\nX-CREDYT-API-KEY: {KEY}\r\n\r\n");
        sock.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer))
            .await
            .expect("connection closed promptly");
        assert!(
            read.is_err() || answer.is_empty(),
            "got an HTTP answer: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // reqwest sees a transport error, not a status.
    let fresh = reqwest::Client::new();
    let err = fresh
        .get(format!("{}/customers", emu.em.url()))
        .header("X-CREDYT-API-KEY", KEY)
        .send()
        .await
        .expect_err("dropped connection");
    assert!(err.status().is_none(), "{err}");

    let (s, _) = emu
        .call(Method::DELETE, "/_emulator/faults", None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = emu.call(Method::GET, "/customers", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["total_count"], 1);

    let (_, log) = emu
        .call(Method::GET, "/_emulator/requests", None, None)
        .await;
    let statuses: Vec<u64> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert!(
        statuses.contains(&0),
        "dropped requests are logged with status 0: {statuses:?}"
    );
    assert!(statuses.contains(&429) && statuses.contains(&503));
    emu.em.stop().await;
}

#[actix_web::test]
async fn slow_tail_conflict_unauthorized_and_http_date_faults() {
    let emu = spawn().await;

    // Every call to /accounts/self is in the slow tail; the one worker must go on answering
    // other requests while it sleeps.
    set_faults(
        &emu,
        json!([{ "path_prefix": "/accounts/self", "latency_ms": 0, "slow_rate": 1.0, "slow_latency_ms": 1500 }]),
    )
    .await;
    let (_, v) = emu.call(Method::GET, "/_emulator/faults", None, None).await;
    assert_eq!(v["rules"][0]["slow_rate"], 1.0);
    assert_eq!(v["rules"][0]["slow_latency_ms"], 1500);
    assert_eq!(v["rules"][0]["retry_after_form"], "seconds");
    let started = Instant::now();
    let slow = emu.request(Method::GET, "/accounts/self", None).send();
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fast_started = Instant::now();
    let (s, _) = emu.call(Method::GET, "/customers", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        fast_started.elapsed() < Duration::from_millis(1000),
        "a slow request blocked another one: {:?}",
        fast_started.elapsed()
    );
    assert!(!slow.is_finished(), "the slow request is still sleeping");
    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // 409 Conflict with a problem body.
    set_faults(
        &emu,
        json!([{ "path_prefix": "/customers", "rate_409": 1.0 }]),
    )
    .await;
    let res = emu
        .request(Method::GET, "/customers", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().get("retry-after").is_none());
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["title"].as_str()),
        (Some(409), Some("Conflict"))
    );

    // 401 with an empty body, as for a refused key.
    set_faults(
        &emu,
        json!([{ "path_prefix": "/customers", "rate_401": 1.0 }]),
    )
    .await;
    let res = emu
        .request(Method::GET, "/customers", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.bytes().await.unwrap().is_empty());

    // Retry-After as an HTTP-date (IMF-fixdate), now + retry_after_secs rounded up.
    set_faults(
        &emu,
        json!([{ "path_prefix": "/customers", "rate_429": 1.0, "retry_after_secs": 2,
                 "retry_after_form": "http-date" }]),
    )
    .await;
    let before = chrono::Utc::now();
    let res = emu
        .request(Method::GET, "/customers", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = res.headers()["retry-after"].to_str().unwrap().to_owned();
    assert!(header.ends_with(" GMT") && header.len() == 29, "{header}");
    let at = chrono::DateTime::parse_from_rfc2822(&header).unwrap();
    let ahead = at.signed_duration_since(before).num_milliseconds();
    assert!(
        (1_000..=3_100).contains(&ahead),
        "{header} is {ahead} ms ahead"
    );

    // Validation: the new status rates count in the sum; slow_rate is checked on its own.
    for rules in [
        json!([{ "path_prefix": "/", "rate_409": 0.6, "rate_401": 0.6 }]),
        json!([{ "path_prefix": "/", "slow_rate": 1.5, "slow_latency_ms": 10 }]),
        json!([{ "path_prefix": "/", "slow_rate": 0.5 }]),
        json!([{ "path_prefix": "/", "retry_after_form": "minutes" }]),
    ] {
        let (s, v) = emu
            .call(
                Method::PUT,
                "/_emulator/faults",
                None,
                Some(&json!({ "rules": rules }).to_string()),
            )
            .await;
        assert!(s.is_client_error(), "{rules} was accepted: {v}");
    }
    set_faults(
        &emu,
        json!([{ "path_prefix": "/", "rate_429": 1.0, "slow_rate": 1.0, "slow_latency_ms": 10 }]),
    )
    .await;
    emu.em.stop().await;
}

// ---- wallet ---------------------------------------------------------------------------------

#[actix_web::test]
async fn wallet_movements_are_idempotent_and_exact() {
    let emu = spawn().await;
    let acc = emu.create_account("wallet").await;
    let cust = emu.create_customer(Some(&acc), "w-1").await;
    let adjustments = format!("/customers/{cust}/wallet/adjustments");
    let charges = format!("/customers/{cust}/wallet/charges");

    let (s, first) = emu
        .post_raw(
            &adjustments,
            Some(&acc),
            r#"{"transaction_id":"adj-1","asset":"usd","amount":1.0,"reason":"gift"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(first["id"], "adj-1");
    // Replay with another payload: the original answer, no movement.
    let (s, again) = emu
        .post_raw(
            &adjustments,
            Some(&acc),
            r#"{"transaction_id":"adj-1","asset":"USD","amount":100,"reason":"gift"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(again, first);
    assert_eq!(emu.available(Some(&acc), &cust).await, d("1.0"));

    charge(&emu, &acc, &cust, "c-a", "0.1").await;
    charge(&emu, &acc, &cust, "c-b", "0.2").await;
    let (s, replay) = emu
        .post_raw(
            &charges,
            Some(&acc),
            r#"{"transaction_id":"c-a","asset":"USD","amount":0}"#,
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "replay wins over validation: {replay}"
    );
    assert_eq!(replay["id"], "c-a");
    assert_eq!(emu.available(Some(&acc), &cust).await, d("0.7"));
    let state = emu.state().await;
    let w = state_wallet(&state, &cust, "default:USD");
    assert_eq!(w["charges"]["count"], 2);
    assert_eq!(dec(&w["charges"]["total"]), d("0.3"));

    // The SDK's exponent form is exact; overdraft is allowed.
    charge(&emu, &acc, &cust, "c-exp", "5e-05").await;
    charge(&emu, &acc, &cust, "c-big", "10").await;
    assert_eq!(emu.available(Some(&acc), &cust).await, d("-9.30005"));
    let state = emu.state().await;
    assert_eq!(
        dec(&state_wallet(&state, &cust, "default:USD")["charges"]["total"]),
        d("10.30005")
    );

    // Validation: 422 ValidationProblem keyed by field; bad JSON: 400 problem.
    for (body, field) in [
        (
            r#"{"transaction_id":"z","asset":"USD","amount":0}"#,
            "amount",
        ),
        (
            r#"{"transaction_id":"z","asset":"USD","amount":-1}"#,
            "amount",
        ),
        (r#"{"asset":"USD","amount":1}"#, "transaction_id"),
        (r#"{"transaction_id":"z","amount":1}"#, "asset"),
    ] {
        let res = emu
            .request(Method::POST, &charges, Some(&acc))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert!(res.headers().get("retry-after").is_none());
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["status"], 422);
        assert!(v["errors"][field].is_array(), "{body}: {v}");
    }
    let (s, v) = emu.post_raw(&charges, Some(&acc), "{not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], 400);
    let (s, _) = emu
        .post_raw(
            "/customers/cust_4zzzzzzzzzzzzzzzzzzzzzzzzz/wallet/charges",
            Some(&acc),
            r#"{"transaction_id":"q","asset":"USD","amount":1}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Wallet account ids: `%3A` decoded, case-insensitive, asset upper-cased.
    for raw in ["default%3AUSD", "DEFAULT%3ausd", "default:usd"] {
        let (s, v) = emu
            .call(
                Method::GET,
                &format!("/customers/{cust}/wallet/{raw}"),
                Some(&acc),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{raw}");
        assert_eq!(v["id"], "default:USD");
        assert_eq!(v["asset"], "USD");
        assert_eq!(dec(&v["pending_in"]), Decimal::ZERO);
    }
    let (s, _) = emu
        .call(
            Method::GET,
            &format!("/customers/{cust}/wallet/default%3AEUR"),
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, wallet) = emu
        .call(
            Method::GET,
            &format!("/customers/{cust}/wallet"),
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(wallet["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(dec(&wallet["accounts"][0]["available"]), d("-9.30005"));

    let (s, tx) = emu
        .call(
            Method::GET,
            &format!("/customers/{cust}/wallet/transactions/c-exp"),
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tx["type"], "fee");
    assert_eq!(tx["account_id"], "default:USD");
    assert_eq!(dec(&tx["amount"]), d("0.00005"));
    let (_, tx) = emu
        .call(
            Method::GET,
            &format!("/customers/{cust}/wallet/transactions/adj-1"),
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(tx["type"], "adjustment");
    assert_eq!(dec(&tx["amount"]), d("1"));

    // Transaction ids are unique per account, not global.
    let other = emu.create_account("wallet-2").await;
    let cust2 = emu.create_customer(Some(&other), "w-1").await;
    charge(&emu, &other, &cust2, "c-a", "0.1").await;
    assert_eq!(emu.available(Some(&other), &cust2).await, d("-0.1"));
    emu.em.stop().await;
}

// ---- customers, paging, events, seed --------------------------------------------------------

#[actix_web::test]
async fn customer_lookup_redirects_and_lists_page() {
    let emu = spawn().await;
    let acc = emu.create_account("paging").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(emu.create_customer(Some(&acc), &format!("p-{n}")).await);
    }

    let res = emu
        .request(Method::GET, "/customers?external_id=p-3", Some(&acc))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()["location"],
        format!("/customers/{}", ids[3]).as_str()
    );
    let (s, v) = emu
        .call(Method::GET, "/customers?external_id=nope", Some(&acc), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["status"], 404);
    // Following the redirect (as reqwest does by default) keeps the headers.
    let follow = reqwest::Client::new()
        .get(format!("{}/customers?external_id=p-3", emu.em.url()))
        .header("X-CREDYT-API-KEY", KEY)
        .header("X-CREDYT-ACCOUNT", &acc)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), StatusCode::OK);
    let v: Value = follow.json().await.unwrap();
    assert_eq!(v["id"], ids[3].as_str());
    // With another filter it lists instead.
    let (s, v) = emu
        .call(
            Method::GET,
            "/customers?external_id=p-3&name=Customer%20p-3",
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["total_count"], 1);

    let (s, v) = emu
        .call(Method::GET, "/customers?offset=1&limit=2", Some(&acc), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["total_count"], 5);
    assert_eq!(v["limit"], 2);
    assert_eq!(v["offset"], 1);
    let page: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[1].as_str(), ids[2].as_str()]);
    let (s, v) = emu
        .call(Method::GET, "/customers?limit=0", Some(&acc), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["errors"]["limit"].is_array());

    // PATCH 204, and the new external id is the lookup key.
    let (s, _) = emu
        .call(
            Method::PATCH,
            &format!("/customers/{}", ids[0]),
            Some(&acc),
            Some(r#"{"external_id":"renamed","email":"x@example.com"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = emu
        .call(
            Method::GET,
            &format!("/customers/{}", ids[0]),
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(v["external_id"], "renamed");
    assert_eq!(v["email"], "x@example.com");

    // Accounts page and filter.
    emu.create_account("paging-2").await;
    let (_, v) = emu
        .call(Method::GET, "/accounts?limit=1&offset=1", None, None)
        .await;
    assert_eq!(v["total_count"], 2);
    assert_eq!(v["items"][0]["name"], "paging-2");
    let (_, v) = emu
        .call(Method::GET, "/accounts?external_id=ext-paging", None, None)
        .await;
    assert_eq!(v["total_count"], 1);
    assert_eq!(v["items"][0]["id"], acc.as_str());

    let (_, log) = emu
        .call(Method::GET, "/_emulator/requests", None, None)
        .await;
    assert_eq!(
        log["counters"]["GET /customers?external_id"], 3,
        "{}",
        log["counters"]
    );
    assert_eq!(log["counters"]["POST /customers"], 5);
    emu.em.stop().await;
}

#[actix_web::test]
async fn usage_events_are_validated_stored_and_idempotent() {
    let emu = spawn().await;
    let acc = emu.create_account("events").await;
    let cust = emu.create_customer(Some(&acc), "e-1").await;
    let now = chrono::Utc::now().to_rfc3339();

    let bad = json!({ "customer_id": cust, "events": [
        { "id": "ok", "event_type": "t", "occurred_at": now },
        { "id": "bad", "event_type": "t" },
    ]})
    .to_string();
    let (s, v) = emu.post_raw("/events", Some(&acc), &bad).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["errors"]["events[1].occurred_at"].is_array(), "{v}");
    let (s, _) = emu.call(Method::GET, "/events/ok", Some(&acc), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a rejected batch stores nothing");

    let unknown = json!({ "customer_external_id": "ghost", "events": [
        { "id": "g", "event_type": "t", "occurred_at": now }]})
    .to_string();
    let (s, _) = emu.post_raw("/events", Some(&acc), &unknown).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let good = format!(
        r#"{{"customer_external_id":"e-1","events":[{{"id":"ev-1","event_type":"image_generated","occurred_at":"{now}","data":{{"count":2,"ratio":0.125,"hd":true}}}}]}}"#
    );
    let res = emu
        .request(Method::POST, "/events", Some(&acc))
        .header("content-type", "application/json")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(res.bytes().await.unwrap().is_empty());
    let replay = json!({ "customer_id": cust, "events": [
        { "id": "ev-1", "event_type": "something_else", "occurred_at": now }]})
    .to_string();
    let (s, _) = emu.post_raw("/events", Some(&acc), &replay).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (s, v) = emu
        .call(Method::GET, "/events/ev-1", Some(&acc), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["event_type"], "image_generated", "first write wins");
    assert_eq!(v["customer_id"], cust.as_str());
    assert_eq!(v["fees"], json!([]));
    assert_eq!(dec(&v["data"]["ratio"]), d("0.125"));
    let (s, _) = emu.call(Method::GET, "/events/ev-1", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "events are partitioned too");

    let second = json!({ "customer_id": cust, "events": [
        { "id": "ev-2", "event_type": "video_generated", "occurred_at": now, "subject": "s-2" }]})
    .to_string();
    let (s, _) = emu.post_raw("/events", Some(&acc), &second).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = emu.call(Method::GET, "/events", Some(&acc), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["total_count"], 2);
    assert_eq!(v["items"][0]["id"], "ev-2", "newest first");
    assert_eq!(v["items"][1]["external_id"], "e-1");
    assert_eq!(v["items"][1]["has_fees"], false);
    for (query, count) in [
        ("event_types=image_generated", 1),
        ("subject=s-2", 1),
        ("customer_external_id=e-1", 2),
        ("customer_external_id=ghost", 0),
        ("has_fees=true", 0),
    ] {
        let (_, v) = emu
            .call(Method::GET, &format!("/events?{query}"), Some(&acc), None)
            .await;
        assert_eq!(v["total_count"], count, "{query}");
    }
    emu.em.stop().await;
}

#[actix_web::test]
async fn sandbox_seed_loads_the_demo_tenant_and_survives_reset() {
    let emu = spawn().await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sandbox/seed.json");
    let seed = Seed::from_file(&path).unwrap();
    emu.em.apply_seed(&seed).unwrap();

    let check = |state: Value| {
        assert_eq!(dec(&state["default_threshold"]), d("5"));
        let demo = state["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["external_id"] == "demo-tenant")
            .expect("demo tenant")
            .clone();
        assert_eq!(demo["name"], "Demo Tenant");
        let customers = demo["customers"].as_array().unwrap();
        let externals: Vec<&str> = customers
            .iter()
            .map(|c| c["external_id"].as_str().unwrap())
            .collect();
        assert_eq!(externals, ["demo-user-1", "demo-user-2", "demo-user-3"]);
        for c in customers {
            assert_eq!(dec(&c["wallet"][0]["available"]), d("20"));
        }
        demo["id"].as_str().unwrap().to_owned()
    };
    let acc = check(emu.state().await);
    assert!(acc.starts_with("acc_4"));
    let res = emu
        .request(
            Method::GET,
            "/customers?external_id=demo-user-2",
            Some(&acc),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);

    // Spend, reset: the seeded state comes back.
    let (_, demo) = emu
        .call(
            Method::GET,
            "/customers?customer_id=x&limit=1",
            Some(&acc),
            None,
        )
        .await;
    assert_eq!(demo["total_count"], 0);
    let (s, _) = emu.call(Method::POST, "/_emulator/reset", None, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(check(emu.state().await), acc);
    // Seeding the same ids twice is an error, not a silent merge.
    assert!(emu.em.apply_seed(&seed).is_err());
    emu.em.stop().await;
}
