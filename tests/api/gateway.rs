//! The scoped Credyt gateway: tenants call the Credyt API through the proxy with their own key,
//! confined to their own connected account (real proxy, real emulator, the official SDK).

use std::collections::BTreeMap;

use credyt_proxy::domain::{transaction_id, EventId, TenantId};
use serde_json::{json, Value};

use super::proxy::{
    emu_customer, emu_post, emu_requests, emu_state, metric, Options, World, PLATFORM_KEY,
};

/// A request to the proxy's tenant port with tenant `key` (redirects not followed: the tenant
/// sees Credyt's 303).
async fn call(
    w: &World,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut req = http
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", w.proxy_url()),
        )
        .header("X-CREDYT-API-KEY", key);
    if let Some(b) = body {
        req = req.json(b);
    }
    req.send().await.unwrap()
}

/// The requests the emulator has logged so far (oldest first).
async fn logged(w: &World) -> Vec<Value> {
    let mut r = emu_requests(&w.http, &w.emulator, 10_000).await["requests"]
        .as_array()
        .unwrap()
        .clone();
    r.sort_by_key(|v| v["time"].as_str().unwrap_or_default().to_string());
    r
}

/// Everything the emulator knows of one account (its customers, wallets, transactions).
fn account_state(state: &Value, account: &str) -> Value {
    state["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == account)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_official_sdk_reads_through_the_gateway_what_the_platform_reads() {
    let w = World::start().await;
    let foreign = emu_customer(&w.http, &w.emulator, &w.b.account, "b-user").await;
    // The charge the event will make: its transaction id, from the price the quote names.
    let quote: Value = w
        .post(
            "/v1/quote",
            &w.a.key,
            &json!({"id": "q", "event_type": "video_promoted", "occurred_at": chrono::Utc::now().to_rfc3339()}),
        )
        .await
        .json()
        .await
        .unwrap();
    let price_id = quote["fees"][0]["price_id"].as_str().unwrap();
    let event_id = "sdk-gw-1";
    let tx = transaction_id(
        &TenantId::from("tenant-a"),
        &EventId::from(event_id),
        price_id,
    );
    let (proxy, emu) = (w.proxy_url(), w.emulator.url());
    let (key, account) = (w.a.key.clone(), w.a.account.clone());
    let foreign_account = w.b.account.clone();
    let out = tokio::task::spawn_blocking(move || {
        super::sdk::run_script(
            "gateway_parity.py",
            &[
                ("PROXY_URL", &proxy),
                ("TENANT_KEY", &key),
                ("CREDYT_BASE_URL", &emu),
                ("CREDYT_API_KEY", PLATFORM_KEY),
                ("ACCOUNT", &account),
                ("END_USER", "sdk-user-1"),
                ("EVENT_ID", event_id),
                ("TRANSACTION_ID", &tx.to_string()),
                ("FOREIGN_CUSTOMER", &foreign),
                ("FOREIGN_ACCOUNT", &foreign_account),
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every call the gateway made was on tenant A's account.
    w.stop().await;
}

/// What the gateway answers a tenant for a Credyt endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Passed to Credyt on the tenant's account (whatever Credyt answered).
    Passed,
    /// 403 `endpoint_not_allowed`; Credyt never called.
    Denied,
    /// 405 with `Allow`: a method the gateway does not pass on a path it serves.
    Method,
}

#[tokio::test]
async fn every_credyt_endpoint_gets_the_answer_the_gateway_table_gives() {
    use Expect::*;
    let w = World::start().await;
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "table-user").await;
    let body = json!({});
    // Every endpoint of API.md (and of the SDK), as a tenant would call it.
    let table: Vec<(&str, String, Expect)> = vec![
        ("POST", "/accounts".into(), Denied),
        ("GET", "/accounts".into(), Denied),
        ("GET", "/accounts?external_id=tenant-b".into(), Denied),
        ("GET", format!("/accounts/{}", w.b.account), Denied),
        ("GET", "/accounts/self".into(), Denied),
        ("POST", "/customers".into(), Passed),
        ("GET", "/customers".into(), Passed),
        ("GET", "/customers?external_id=table-user".into(), Passed),
        ("GET", "/customers?external_id=nobody".into(), Passed),
        ("GET", format!("/customers/{c}"), Passed),
        ("PATCH", format!("/customers/{c}"), Passed),
        ("DELETE", format!("/customers/{c}"), Method),
        ("GET", "/customers/stats".into(), Denied),
        ("GET", format!("/customers/{c}/stats"), Denied),
        ("GET", format!("/customers/{c}/subscriptions"), Denied),
        ("POST", format!("/customers/{c}/subscriptions"), Denied),
        ("GET", format!("/customers/{c}/subscriptions/sub_1"), Denied),
        ("GET", format!("/customers/{c}/wallet"), Passed),
        ("GET", format!("/customers/{c}/wallet/default:USD"), Passed),
        (
            "GET",
            format!("/customers/{c}/wallet/default%3AUSD/grants"),
            Passed,
        ),
        (
            "GET",
            format!("/customers/{c}/wallet/transactions/t1"),
            Passed,
        ),
        ("POST", format!("/customers/{c}/wallet/adjustments"), Denied),
        ("POST", format!("/customers/{c}/wallet/charges"), Denied),
        ("GET", "/events".into(), Passed),
        ("GET", "/events/e1".into(), Passed),
        ("POST", "/products".into(), Method),
        ("GET", "/products".into(), Passed),
        ("GET", "/products/prod_1".into(), Passed),
        ("POST", "/products/prod_1".into(), Method),
        ("DELETE", "/products/prod_1".into(), Method),
        ("GET", "/products/prod_1/1".into(), Passed),
        ("DELETE", "/products/prod_1/1".into(), Method),
        ("POST", "/products/prod_1/1/simulate-usage".into(), Passed),
        ("GET", "/products/prod_1/subscribers".into(), Denied),
        ("POST", "/webhooks".into(), Denied),
        ("GET", "/webhooks".into(), Denied),
        ("GET", "/webhooks/events".into(), Denied),
        ("GET", "/webhooks/whd_1".into(), Denied),
        ("PATCH", "/webhooks/whd_1".into(), Denied),
        ("DELETE", "/webhooks/whd_1".into(), Denied),
        (
            "POST",
            "/webhooks/whd_1/test/balance_threshold_hit".into(),
            Denied,
        ),
        (
            "POST",
            "/webhooks/test/balance_threshold_hit".into(),
            Denied,
        ),
        ("POST", "/top-ups".into(), Denied),
        ("GET", "/top-ups/top_1".into(), Denied),
        ("POST", "/billing-portal/sessions".into(), Denied),
        ("POST", "/assets".into(), Denied),
        ("GET", "/assets".into(), Denied),
        ("GET", "/assets/USD".into(), Denied),
        ("POST", "/assets/USD/rates".into(), Denied),
        ("POST", "/assets/USD/quote".into(), Denied),
        ("POST", "/vendors".into(), Denied),
        ("GET", "/vendors".into(), Denied),
        ("GET", "/vendors/ven_1".into(), Denied),
        ("GET", "/vendors/ven_1/stats".into(), Denied),
    ];
    let mut seen = logged(&w).await.len();
    for (method, path, expect) in &table {
        let with_body = matches!(*method, "POST" | "PATCH").then_some(&body);
        let resp = call(&w, method, path, &w.a.key, with_body).await;
        let status = resp.status().as_u16();
        let allow = resp.headers().get("allow").cloned();
        let text = resp.text().await.unwrap();
        let now = logged(&w).await;
        let reached: Vec<&Value> = now[seen..].iter().collect();
        seen = now.len();
        match expect {
            Passed => {
                assert_eq!(reached.len(), 1, "{method} {path}: {status} {text}");
                assert_eq!(reached[0]["method"], *method, "{method} {path}");
                assert_eq!(
                    reached[0]["account"],
                    w.a.account.as_str(),
                    "{method} {path}"
                );
                let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                assert_ne!(problem["code"], "endpoint_not_allowed", "{method} {path}");
            }
            Denied => {
                assert_eq!(status, 403, "{method} {path}: {text}");
                let problem: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(problem["code"], "endpoint_not_allowed", "{method} {path}");
                assert!(
                    reached.is_empty(),
                    "{method} {path} reached credyt: {reached:?}"
                );
            }
            Method => {
                assert_eq!(status, 405, "{method} {path}: {text}");
                assert!(allow.is_some(), "{method} {path}");
                assert!(reached.is_empty(), "{method} {path} reached credyt");
            }
        }
    }
    // Without a key, nothing at all.
    let resp = w
        .http
        .get(format!("{}/customers", w.proxy_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        metric(
            &w.http,
            &w.admin_url(),
            "credyt_proxy_gateway_requests_total{operation=\"denied\",status_class=\"4xx\"}"
        )
        .await
        .unwrap_or(0)
            >= 30
    );
    w.stop().await;
}

#[tokio::test]
async fn a_hostile_tenant_never_reads_or_writes_another_account() {
    let w = World::start().await;
    let a_cust = w.customer(&w.a.account, "a-user", "10").await;
    let b_cust = w.customer(&w.b.account, "b-user", "10").await;
    let b_before = account_state(&emu_state(&w.http, &w.emulator).await, &w.b.account);
    assert!(!b_before.is_null());
    let setup = logged(&w).await.len();
    let url = |p: &str| format!("{}{p}", w.proxy_url());
    let key = &w.a.key;
    let mut answers = Vec::new();
    // Forged account and key headers in every spelling, repeated, and in the query string.
    for (name, value) in [
        ("X-CREDYT-ACCOUNT", w.b.account.as_str()),
        ("x-credyt-account", w.b.account.as_str()),
        ("X-Credyt-Account", w.b.account.as_str()),
        ("X-CREDYT-ACCOUNT ", w.b.account.as_str()),
    ] {
        if let Ok(name) = reqwest::header::HeaderName::from_bytes(name.as_bytes()) {
            let r = w
                .http
                .get(url(&format!("/customers/{b_cust}")))
                .header("X-CREDYT-API-KEY", key)
                .header(name.clone(), value)
                .header(name, w.a.account.as_str())
                .send()
                .await
                .unwrap();
            answers.push(r.status().as_u16());
        }
    }
    for q in [
        format!("?X-CREDYT-ACCOUNT={}", w.b.account),
        format!("?x-credyt-account={}&external_id=b-user", w.b.account),
        format!("?x%2Dcredyt%2Daccount={}", w.b.account),
        format!("?X-CREDYT-API-KEY={PLATFORM_KEY}"),
    ] {
        let r = call(&w, "GET", &format!("/customers{q}"), key, None).await;
        answers.push(r.status().as_u16());
        let r = call(&w, "GET", &format!("/customers/{b_cust}{q}"), key, None).await;
        assert_eq!(r.status(), 404, "{q}: another account's customer");
    }
    // The platform key presented as a tenant key is no tenant's key.
    let r = call(&w, "GET", "/customers", PLATFORM_KEY, None).await;
    assert_eq!(r.status(), 401);
    let r = w
        .http
        .get(url("/customers"))
        .header("Authorization", format!("Bearer {key}"))
        .header("X-CREDYT-API-KEY", PLATFORM_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Another account's ids in paths and bodies.
    for (method, path, body) in [
        ("GET", format!("/customers/{b_cust}"), None),
        ("GET", format!("/customers/{b_cust}/wallet"), None),
        (
            "GET",
            format!("/customers/{b_cust}/wallet/default:USD"),
            None,
        ),
        (
            "PATCH",
            format!("/customers/{b_cust}"),
            Some(json!({"name": "owned"})),
        ),
        (
            "PATCH",
            format!("/customers/{b_cust}"),
            Some(json!({"external_id": "stolen"})),
        ),
    ] {
        let r = call(&w, method, &path, key, body.as_ref()).await;
        assert_eq!(r.status(), 404, "{method} {path}");
    }
    let r = call(
        &w,
        "POST",
        "/customers",
        key,
        Some(&json!({"name": "x", "external_id": "b-user", "id": b_cust, "account": w.b.account})),
    )
    .await;
    answers.push(r.status().as_u16());
    // Path tricks toward denied endpoints.
    for path in [
        "/customers/../accounts".to_string(),
        "/customers/%2E%2E/accounts".into(),
        "/customers/..%2Faccounts".into(),
        "//accounts".into(),
        "/Accounts".into(),
        "/ACCOUNTS/self".into(),
        "/%61ccounts".into(),
        format!("/customers/{a_cust}/wallet/..%2F..%2F..%2Fwebhooks"),
        "/webhooks%2Ftest".into(),
        "/customers/%2e%2e%2faccounts".into(),
    ] {
        let r = w
            .http
            .get(format!("{}{path}", w.proxy_url()))
            .header("X-CREDYT-API-KEY", key)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert!([403, 404].contains(&status), "{path}: {status}");
    }
    // A method override header is not a method.
    let r = w
        .http
        .post(url("/customers"))
        .header("X-CREDYT-API-KEY", key)
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X-Method-Override", "PATCH")
        .json(&json!({"name": "o", "external_id": "override-user"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Oversized and malformed bodies.
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(1_100_000));
    let r = w
        .http
        .post(url("/customers"))
        .header("X-CREDYT-API-KEY", key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = w
        .http
        .post(url("/customers"))
        .header("X-CREDYT-API-KEY", key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = w
        .http
        .post(url("/customers"))
        .header("X-CREDYT-API-KEY", key)
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(answers.iter().all(|s| *s < 500), "{answers:?}");

    // Every request that reached Credyt from the gateway was on tenant A's account, with the
    // method the tenant used; tenant B's account is exactly as it was.
    let reached = logged(&w).await;
    assert!(reached.len() > setup + 10, "the gateway passed calls on");
    for r in &reached[setup..] {
        assert_eq!(r["account"], w.a.account.as_str(), "{r}");
        assert!(
            ["GET", "POST", "PATCH"].contains(&r["method"].as_str().unwrap()),
            "{r}"
        );
    }
    let b_after = account_state(&emu_state(&w.http, &w.emulator).await, &w.b.account);
    assert_eq!(b_before, b_after, "tenant b's account changed");
    w.stop().await;
}

#[tokio::test]
async fn an_external_id_changed_through_the_gateway_charges_that_end_user() {
    let w = World::start().await;
    let key = &w.a.key;
    // The tenant's end user, funded; its first usage maps "old-id" in the identity cache.
    let created: Value = call(
        &w,
        "POST",
        "/customers",
        key,
        Some(&json!({"name": "u", "external_id": "old-id"})),
    )
    .await
    .json()
    .await
    .unwrap();
    let cust = created["id"].as_str().unwrap().to_string();
    emu_post(
        &w.http,
        &w.emulator,
        &format!("/customers/{cust}/wallet/adjustments"),
        Some(&w.a.account),
        json!({"transaction_id": "fund-1", "asset": "USD", "amount": 10, "reason": "gift"}),
    )
    .await;
    let event = |id: &str, user: &str| json!({"customer_external_id": user, "events": [{"id": id, "event_type": "video_promoted", "occurred_at": chrono::Utc::now().to_rfc3339()}]});
    assert_eq!(
        w.post("/events", key, &event("e1", "old-id"))
            .await
            .status(),
        204
    );
    // Renamed through the gateway.
    let r = call(
        &w,
        "PATCH",
        &format!("/customers/{cust}"),
        key,
        Some(&json!({"external_id": "new-id"})),
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    // Usage by the new external id is that end user's.
    assert_eq!(
        w.post("/events", key, &event("e2", "new-id"))
            .await
            .status(),
        204
    );
    // The old external id is no longer that end user (tenant A creates end users on first
    // sight: it is a new one).
    assert_eq!(
        w.post("/events", key, &event("e3", "old-id"))
            .await
            .status(),
        204
    );
    let state = emu_state(&w.http, &w.emulator).await;
    let (available, charges, _) = super::proxy::wallet(&state, &cust, "USD").unwrap();
    assert_eq!(charges, 2, "e1 and e2 only");
    assert_eq!(available, rust_decimal_macros::dec!(9.00));
    w.stop().await;
}

#[tokio::test]
async fn money_moves_only_when_allowed_and_gateway_calls_have_their_own_quota() {
    let w = World::start_with(Options::default()).await;
    let a_cust = w.customer(&w.a.account, "money-user", "10").await;
    let charge = json!({"transaction_id": "7d6a3b5e-0f2e-4d5c-9f61-3b1f0b6a2c11", "asset": "USD", "amount": 1, "description": "x"});
    let path = format!("/customers/{a_cust}/wallet/charges");
    let r = call(&w, "POST", &path, &w.a.key, Some(&charge)).await;
    assert_eq!(r.status(), 403, "money is off by default");
    // The platform allows tenant A to charge, with a small gateway quota of its own.
    w.edit_tenants(|t| {
        t.replacen(
            "create_customers = true\n",
            "create_customers = true\ngateway = { allow = [\"customers.read\", \"wallets.charge\"], rate_limit = { per_second = 1, burst = 3 } }\n",
            1,
        )
    })
    .await;
    let r = call(&w, "POST", &path, &w.a.key, Some(&charge)).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = call(
        &w,
        "POST",
        "/customers",
        &w.a.key,
        Some(&json!({"name": "n"})),
    )
    .await;
    assert_eq!(r.status(), 403, "customers.write is no longer in its list");
    let money = metric(
        &w.http,
        &w.admin_url(),
        "credyt_proxy_gateway_money_calls_total{operation=\"wallet.charge\"}",
    )
    .await;
    assert_eq!(money, Some(1));
    // The quota: 3 at once, then 429 with the rate-limit headers; events are not affected.
    let mut statuses = BTreeMap::new();
    for _ in 0..5 {
        let r = call(&w, "GET", "/customers", &w.a.key, None).await;
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            assert!(r.headers().contains_key("ratelimit-policy"));
        }
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 1,
        "{statuses:?}"
    );
    let r = w
        .post(
            "/v1/events",
            &w.a.key,
            &json!({"customer_external_id": "money-user", "events": [{"id": "m1", "event_type": "video_promoted", "occurred_at": chrono::Utc::now().to_rfc3339()}]}),
        )
        .await;
    assert_eq!(r.status(), 200, "events have their own quota");
    w.stop().await;
}

#[tokio::test]
async fn the_external_id_lookup_keeps_its_303_with_a_location_on_the_proxy() {
    let w = World::start().await;
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "lookup-user").await;
    let r = call(
        &w,
        "GET",
        "/customers?external_id=lookup-user",
        &w.a.key,
        None,
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/customers/{c}").as_str());
    // Only that call reached Credyt: the proxy did not follow it.
    let last = logged(&w).await;
    assert_eq!(last.last().unwrap()["query"], "external_id=lookup-user");
    // Another account's end user is not found by its external id.
    emu_customer(&w.http, &w.emulator, &w.b.account, "b-only").await;
    let r = call(&w, "GET", "/customers?external_id=b-only", &w.a.key, None).await;
    assert_eq!(r.status(), 404);
    w.stop().await;
}
