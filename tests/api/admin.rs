//! The admin port's dead-letter endpoints (issue 26 item 6) on the running proxy: Credyt
//! refuses charges for good, the records are dead-lettered, an operator lists them and replays
//! them (one by seq, then all) through `/admin/dead-letters` with the admin token, and each
//! event is charged exactly once. Also: the token is required (401), the endpoints are off
//! without one (403) and there is nothing to list with `ack = "upstream"` (404).

use std::time::Duration;

use reqwest::StatusCode;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{
    ago, emu_clear_faults, emu_customer, emu_faults, emu_get, eventually, metric, total_charges,
    usd_charges, Options, World,
};

const TOKEN: &str = "adm-test-token-0123456789";
const DEAD: &str = "credyt_proxy_outbox_dead_letters";
const DEPTH: &str = "credyt_proxy_outbox_depth";

fn with_token(ack: &'static str, token: Option<&str>) -> Options {
    Options {
        ack,
        extra_config: token.map_or(String::new(), |t| format!("[admin]\ntoken = \"{t}\"\n")),
        ..Default::default()
    }
}

/// `GET` of the admin port's `path` with `Authorization: <auth>` when given.
async fn admin_get(w: &World, path: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = w.http.get(format!("{}{path}", w.admin_url()));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap()
}

/// `POST` of `body` (raw text) to the admin port's `path` with `Authorization: <auth>`.
async fn admin_post(w: &World, path: &str, auth: Option<&str>, body: &str) -> reqwest::Response {
    let mut req = w
        .http
        .post(format!("{}{path}", w.admin_url()))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap()
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Asserts a problem+json answer with `status` and `code`; returns the body.
async fn problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "{resp:?}");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let www = resp.headers().get("www-authenticate").cloned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["type"].as_str().unwrap().ends_with(code), "{body}");
    assert_eq!(www.is_some(), status == 401, "WWW-Authenticate on {status}");
    if let Some(www) = www {
        assert!(www.to_str().unwrap().starts_with("Bearer"), "{www:?}");
    }
    body
}

/// The listing with the token: (dead letters, next_after).
async fn list(w: &World, query: &str) -> (Vec<Value>, Option<u64>) {
    let resp = admin_get(w, &format!("/admin/dead-letters{query}"), Some(&bearer())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = resp.json().await.unwrap();
    let letters = body["dead_letters"].as_array().unwrap().clone();
    (letters, body["next_after"].as_u64())
}

async fn replay(w: &World, body: &str) -> u64 {
    let resp = admin_post(w, "/admin/dead-letters/replay", Some(&bearer()), body).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    let answer: Value = resp.json().await.unwrap();
    answer["replayed"].as_u64().unwrap()
}

/// Charges of `customer` that Credyt holds under `transaction_id`: its amount, if any.
async fn charged(w: &World, customer: &str, transaction_id: &str) -> Option<String> {
    let resp = w
        .http
        .get(format!(
            "{}/customers/{customer}/wallet/transactions/{transaction_id}",
            w.emulator.url()
        ))
        .header("X-CREDYT-API-KEY", super::proxy::PLATFORM_KEY)
        .header("X-CREDYT-ACCOUNT", &w.a.account)
        .send()
        .await
        .unwrap();
    if resp.status() == StatusCode::NOT_FOUND {
        return None;
    }
    let t: Value = resp.json().await.unwrap();
    Some(t["amount"].to_string().trim_matches('"').to_string())
}

#[actix_web::test]
async fn dead_letters_are_listed_and_replayed_through_the_admin_port() {
    let w = World::start_with(with_token("durable", Some(TOKEN))).await;
    let customer = emu_customer(&w.http, &w.emulator, &w.a.account, "adm-user").await;
    emu_faults(
        &w.http,
        &w.emulator,
        json!([{"path_prefix": "/customers/", "method": "POST", "rate_422": 1.0}]),
    )
    .await;
    let sent = ["adm-0", "adm-1", "adm-2"];
    let events: Vec<Value> = sent
        .iter()
        .map(|id| json!({"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}))
        .collect();
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "adm-user", "events": events}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let admin = w.admin_url();
    eventually(Duration::from_secs(10), "3 dead letters", || async {
        (metric(&w.http, &admin, DEAD).await? == 3).then_some(())
    })
    .await;

    // The token is required, and only the right one will do.
    let path = "/admin/dead-letters";
    problem(admin_get(&w, path, None).await, 401, "unauthorized").await;
    let wrong = format!("Bearer {TOKEN}x");
    problem(admin_get(&w, path, Some(&wrong)).await, 401, "unauthorized").await;
    problem(admin_get(&w, path, Some(TOKEN)).await, 401, "unauthorized").await;
    let basic = format!("Basic {TOKEN}");
    problem(admin_get(&w, path, Some(&basic)).await, 401, "unauthorized").await;
    let replay_path = "/admin/dead-letters/replay";
    problem(
        admin_post(&w, replay_path, None, r#"{"all": true}"#).await,
        401,
        "unauthorized",
    )
    .await;
    problem(
        admin_post(&w, replay_path, Some(&wrong), r#"{"all": true}"#).await,
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(
        metric(&w.http, &admin, DEAD).await,
        Some(3),
        "nothing moved"
    );

    // The listing: each dead letter with its delivery, the amount as a decimal string.
    let (letters, next) = list(&w, "").await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(next, None);
    let mut seqs = Vec::new();
    let mut listed_ids = Vec::new();
    for l in &letters {
        let d = &l["delivery"];
        assert_eq!(d["kind"], "charge", "{l}");
        assert_eq!(d["tenant"], "tenant-a", "{l}");
        assert_eq!(d["account"], w.a.account.as_str(), "{l}");
        assert_eq!(d["customer"], customer.as_str(), "{l}");
        assert_eq!(d["amount"], "0.50", "an exact decimal string: {l}");
        assert_eq!(d["asset"], "USD", "{l}");
        assert!(d["transaction_id"].as_str().unwrap().len() == 36, "{l}");
        assert_eq!(l["upstream_status"], 422, "{l}");
        assert!(l["reason"].as_str().unwrap().contains("422"), "{l}");
        assert_eq!(l["code"], "refused", "{l}");
        assert!(l.get("upstream_body").is_some(), "{l}");
        let at: chrono::DateTime<chrono::Utc> = l["at"].as_str().unwrap().parse().unwrap();
        assert!(at <= chrono::Utc::now());
        seqs.push(l["seq"].as_u64().unwrap());
        listed_ids.push(d["event_id"].as_str().unwrap().to_string());
    }
    assert!(
        seqs.windows(2).all(|p| p[0] < p[1]),
        "oldest first: {seqs:?}"
    );
    listed_ids.sort();
    assert_eq!(listed_ids, sent);

    // Paging.
    let (first, next) = list(&w, "?limit=2").await;
    assert_eq!(first, letters[..2]);
    assert_eq!(next, Some(seqs[1]));
    let (rest, next) = list(&w, &format!("?limit=2&after={}", seqs[1])).await;
    assert_eq!(rest, letters[2..]);
    assert_eq!(next, None);
    for bad in ["?limit=0", "?limit=10001", "?after=x", "?offset=1"] {
        let resp = admin_get(&w, &format!("{path}{bad}"), Some(&bearer())).await;
        problem(resp, 400, "invalid_request").await;
    }

    // A replay body is exactly one of the two forms.
    for bad in [
        "",
        "not json",
        "{}",
        r#"{"all": false}"#,
        r#"{"all": true, "seqs": [1]}"#,
        r#"{"seqs": []}"#,
        r#"{"seqs": ["1"]}"#,
    ] {
        let resp = admin_post(&w, replay_path, Some(&bearer()), bad).await;
        problem(resp, 400, "invalid_request").await;
    }
    assert_eq!(
        metric(&w.http, &admin, DEAD).await,
        Some(3),
        "nothing moved"
    );

    // Credyt accepts again: replay the first by its number.
    emu_clear_faults(&w.http, &w.emulator).await;
    let tx = |l: &Value| {
        l["delivery"]["transaction_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(charged(&w, &customer, &tx(&letters[0])).await, None);
    assert_eq!(
        replay(&w, &format!(r#"{{"seqs": [{}]}}"#, seqs[0])).await,
        1
    );
    // The gauge follows the replay at once.
    assert_eq!(metric(&w.http, &admin, DEAD).await, Some(2));
    let (left, _) = list(&w, "").await;
    assert_eq!(left, letters[1..]);
    eventually(Duration::from_secs(10), "the replayed charge", || async {
        charged(&w, &customer, &tx(&letters[0])).await
    })
    .await;
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        (metric(&w.http, &admin, DEPTH).await? == 0).then_some(())
    })
    .await;
    assert_eq!(usd_charges(&w.state().await, &customer), (1, dec!(0.50)));
    // Again, or an unknown number: nothing to move.
    let unknown = seqs[2] + 1000;
    let body = format!(r#"{{"seqs": [{}, {unknown}]}}"#, seqs[0]);
    assert_eq!(replay(&w, &body).await, 0);

    // Then all the others.
    assert_eq!(replay(&w, r#"{"all": true}"#).await, 2);
    assert_eq!(metric(&w.http, &admin, DEAD).await, Some(0));
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        (metric(&w.http, &admin, DEPTH).await? == 0).then_some(())
    })
    .await;
    assert_eq!(list(&w, "").await, (Vec::new(), None));
    assert_eq!(replay(&w, r#"{"all": true}"#).await, 0);

    // Each event charged exactly once, under its own transaction id, nothing else.
    for l in &letters {
        assert_eq!(
            charged(&w, &customer, &tx(l)).await.as_deref(),
            Some("0.50")
        );
    }
    let state = w.state().await;
    assert_eq!(usd_charges(&state, &customer), (3, dec!(1.50)));
    assert_eq!(total_charges(&state), 3);
    let log = emu_get(&w.http, &w.emulator, "/_emulator/requests?limit=10000").await;
    let accepted = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["method"] == "POST"
                && r["path"].as_str().unwrap().ends_with("/charges")
                && r["status"].as_u64().unwrap() / 100 == 2
        })
        .count();
    assert_eq!(accepted, 3, "one accepted charge call per event");
    w.stop().await;
}

#[actix_web::test]
async fn dead_letter_endpoints_are_disabled_without_a_token() {
    let w = World::start_with(with_token("durable", None)).await;
    for auth in [None, Some("Bearer anything-at-all-0123456789")] {
        let resp = admin_get(&w, "/admin/dead-letters", auth).await;
        problem(resp, 403, "admin_disabled").await;
        let resp = admin_post(&w, "/admin/dead-letters/replay", auth, r#"{"all": true}"#).await;
        problem(resp, 403, "admin_disabled").await;
    }
    // The rest of the admin port is unaffected.
    let metrics = admin_get(&w, "/metrics", None).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    assert_eq!(metric(&w.http, &w.admin_url(), DEAD).await, Some(0));
    w.stop().await;
}

#[actix_web::test]
async fn dead_letter_endpoints_answer_no_outbox_with_ack_upstream() {
    let w = World::start_with(with_token("upstream", Some(TOKEN))).await;
    // Authentication comes first: nothing about the proxy is told without the token.
    problem(
        admin_get(&w, "/admin/dead-letters", None).await,
        401,
        "unauthorized",
    )
    .await;
    problem(
        admin_get(&w, "/admin/dead-letters", Some(&bearer())).await,
        404,
        "no_outbox",
    )
    .await;
    let resp = admin_post(
        &w,
        "/admin/dead-letters/replay",
        Some(&bearer()),
        r#"{"all": true}"#,
    )
    .await;
    problem(resp, 404, "no_outbox").await;
    // No webhook relay configured: its dead letters are not there either.
    problem(
        admin_get(&w, "/admin/webhooks/dead-letters", Some(&bearer())).await,
        404,
        "no_webhook_relay",
    )
    .await;
    let resp = admin_post(
        &w,
        "/admin/webhooks/dead-letters/replay",
        Some(&bearer()),
        r#"{"all": true}"#,
    )
    .await;
    problem(resp, 404, "no_webhook_relay").await;
    w.stop().await;
}

#[actix_web::test]
async fn unknown_admin_paths_and_methods_are_problems() {
    let w = World::start_with(with_token("durable", Some(TOKEN))).await;
    problem(admin_get(&w, "/admin/nope", None).await, 404, "not_found").await;
    let resp = admin_get(&w, "/admin/dead-letters/replay", Some(&bearer())).await;
    problem(resp, 405, "method_not_allowed").await;
    let resp = admin_post(&w, "/admin/dead-letters", Some(&bearer()), "{}").await;
    problem(resp, 405, "method_not_allowed").await;
    // The probes keep answering as before.
    assert_eq!(admin_get(&w, "/livez", None).await.status(), StatusCode::OK);
    assert_eq!(
        admin_get(&w, "/readyz", None).await.status(),
        StatusCode::OK
    );
    w.stop().await;
}
