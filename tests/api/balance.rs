//! Balance gating, end to end: the real proxy and emulator, events posted over HTTP, the
//! emulator's wallet read back (and sampled while events race for the last credit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{
    drained, emu_faults, emu_post, eventually, metric, scrape, wallet, Options, World,
};
use super::webhooks::credyt_signature;

const RELAY_SECRET: &str = "whsec_balancetestsecret000000000";

/// Tenant A gated with `gate` (its tenants-file line), `ack`, and `extra` config tables.
async fn gated(ack: &'static str, gate: &str, extra: &str) -> World {
    World::start_with(Options {
        ack,
        tenant_a_extra: gate.to_string(),
        extra_config: extra.to_string(),
        ..Default::default()
    })
    .await
}

fn event(id: &str) -> Value {
    json!({"id": id, "event_type": "video_promoted", "occurred_at": super::proxy::ago(1), "data": {}})
}

fn batch(customer: &str, ids: impl IntoIterator<Item = String>) -> Value {
    let events: Vec<Value> = ids.into_iter().map(|id| event(&id)).collect();
    json!({"customer_id": customer, "events": events})
}

async fn problem(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    (status, resp.json().await.unwrap())
}

fn available(state: &Value, customer: &str) -> Decimal {
    wallet(state, customer, "USD").map_or(Decimal::ZERO, |(a, _, _)| a)
}

/// An adjustment on the emulator (a top-up outside the proxy: no webhook, no gateway).
async fn top_up(w: &World, customer: &str, usd: &str, id: &str) {
    emu_post(
        &w.http,
        &w.emulator,
        &format!("/customers/{customer}/wallet/adjustments"),
        Some(&w.a.account),
        json!({"transaction_id": id, "asset": "USD", "amount": serde_json::from_str::<Value>(usd).unwrap(), "reason": "external_topup"}),
    )
    .await;
}

#[tokio::test]
async fn sixty_four_connections_spend_exactly_the_wallet_and_every_other_event_is_refused() {
    let w = gated("durable", "gate = { mode = \"balance\" }", "").await;
    let cust = w.customer(&w.a.account, "racer", "10.00").await;
    // Sample the emulator's balance all through the run (until the outbox drained): it must
    // never go below zero.
    let running = AtomicBool::new(true);
    let sample = async {
        let mut samples = Vec::new();
        while running.load(Ordering::Relaxed) {
            samples.push(available(&w.state().await, &cust));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples
    };
    let race = async {
        // 64 connections (a client each), 4 single-event requests each: 256 tries at 0.50.
        let url = format!("{}/events", w.proxy_url());
        let mut tasks = Vec::new();
        for c in 0..64 {
            let (url, key, cust) = (url.clone(), w.a.key.clone(), cust.clone());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut answers = Vec::new();
                for i in 0..4 {
                    let resp = http
                        .post(&url)
                        .header("X-CREDYT-API-KEY", &key)
                        .json(&batch(&cust, [format!("race-{c}-{i}")]))
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    let body: Value = if status == 204 {
                        Value::Null
                    } else {
                        resp.json().await.unwrap()
                    };
                    answers.push((status, body));
                }
                answers
            }));
        }
        let (mut accepted, mut refused) = (0, 0);
        for t in tasks {
            for (status, body) in t.await.unwrap() {
                match status {
                    204 => accepted += 1,
                    402 => {
                        assert_eq!(body["code"], "insufficient_balance", "{body}");
                        assert!(body["errors"]["events[0]"].is_array(), "{body}");
                        refused += 1;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }
        drained(&w, Duration::from_secs(20)).await;
        running.store(false, Ordering::Relaxed);
        (accepted, refused)
    };
    let (samples, (accepted, refused)) = tokio::join!(sample, race);
    assert_eq!(accepted, 20, "10.00 buys exactly twenty 0.50 events");
    assert_eq!(refused, 256 - 20);
    assert!(samples.len() > 3, "the balance was sampled during the run");
    assert!(
        samples.iter().all(|a| *a >= Decimal::ZERO),
        "the wallet went negative: {:?}",
        samples.iter().min()
    );
    let state = w.state().await;
    assert_eq!(
        wallet(&state, &cust, "USD"),
        Some((dec!(0.00), 20, dec!(10.00)))
    );
    // 256 requests, one read of the balance: concurrent misses share it, then it is cached.
    let wallet_path = format!("/customers/{cust}/wallet");
    let reads = w
        .requests()
        .await
        .iter()
        .filter(|r| r["method"] == "GET" && r["path"] == wallet_path.as_str())
        .count();
    assert_eq!(reads, 1);
    let text = scrape(&w).await;
    let refused_metric: u64 = text
        .lines()
        .filter(|l| l.starts_with("credyt_proxy_balance_refused_events_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(refused_metric, 236, "{text}");
    w.stop().await;
}

#[tokio::test]
async fn a_batch_that_runs_dry_at_event_37_accepts_36_on_v1_and_nothing_on_events() {
    let w = gated("upstream", "gate = { mode = \"balance\" }", "").await;
    // 18.00 pays for 36 events of 0.50.
    let partial = w.customer(&w.a.account, "partial", "18.00").await;
    let whole = w.customer(&w.a.account, "whole", "18.00").await;

    let ids = |p: &'static str| (0..100).map(move |i| format!("{p}-{i}"));
    let resp = w
        .post("/v1/events", &w.a.key, &batch(&partial, ids("p")))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(36), Some(64))
    );
    for (i, r) in body["results"].as_array().unwrap().iter().enumerate() {
        if i < 36 {
            assert_eq!(r["status"], "accepted", "{r}");
        } else {
            assert_eq!(r["status"], "rejected", "{r}");
            assert_eq!(r["code"], "insufficient_balance", "{r}");
            assert_eq!(r["field"], format!("events[{i}]"), "{r}");
        }
    }
    // Resent whole once the balance is gone: the 36 are duplicates (never refused as
    // unaffordable), the 64 are refused again.
    let again: Value = w
        .post("/v1/events", &w.a.key, &batch(&partial, ids("p")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["duplicates"].as_u64(), again["rejected"].as_u64()),
        (Some(36), Some(64)),
        "{again}"
    );

    let (status, body) = problem(w.post("/events", &w.a.key, &batch(&whole, ids("w"))).await).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "insufficient_balance");
    assert!(body["errors"]["events[36]"].is_array(), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("w-36"), "{body}");

    let state = w.state().await;
    assert_eq!(
        wallet(&state, &partial, "USD"),
        Some((dec!(0.00), 36, dec!(18.00)))
    );
    assert_eq!(
        wallet(&state, &whole, "USD").map(|(a, n, _)| (a, n)),
        Some((dec!(18.00), 0)),
        "a refused /events request charges nothing"
    );
    w.stop().await;
}

#[tokio::test]
async fn after_a_top_up_the_end_user_is_served_at_once_on_a_balance_webhook() {
    // A balance read lives an hour here: only the webhook can make the proxy read it again.
    let w = gated(
        "durable",
        "gate = { mode = \"balance\" }",
        &format!(
            "[balance]\nttl_ms = 3600000\n\
             [webhooks]\ncredyt_secrets = [\"{RELAY_SECRET}\"]\nlisten = \"127.0.0.1:0\"\ndir = \"webhooks\"\n"
        ),
    )
    .await;
    let cust = w.customer(&w.a.account, "topped", "0.50").await;
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["t-1".into()]))
            .await
            .status(),
        204
    );
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["t-2".into()]))
            .await
            .status(),
        402
    );
    drained(&w, Duration::from_secs(10)).await;
    top_up(&w, &cust, "5.00", "topup-1").await;
    // The cached balance does not know of the top-up yet.
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["t-2".into()]))
            .await
            .status(),
        402
    );
    let hook = json!({
        "id": "whe_topup_1",
        "account": w.a.account,
        "event_type": "balance_threshold_hit",
        "occurred_at": super::proxy::ago(0),
        "data": {"customer_id": cust, "account_id": "default:USD",
                 // JSON numbers, as Credyt sends them (written from their exact text).
                 "available": serde_json::from_str::<Value>("5.00").unwrap(),
                 "threshold": serde_json::from_str::<Value>("1.00").unwrap()}
    });
    let bytes = serde_json::to_vec(&hook).unwrap();
    let sig = credyt_signature(RELAY_SECRET, chrono::Utc::now().timestamp(), &bytes);
    let resp = w
        .http
        .post(format!(
            "http://{}/webhooks/credyt",
            w.app.webhook_addr().unwrap()
        ))
        .header("content-type", "application/json")
        .header("Credyt-Signature", sig)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["t-2".into()]))
            .await
            .status(),
        204
    );
    w.stop().await;
}

#[tokio::test]
async fn after_a_top_up_the_end_user_is_served_within_the_ttl_without_a_webhook() {
    let w = gated(
        "durable",
        "gate = { mode = \"balance\" }",
        "[balance]\nttl_ms = 300\n",
    )
    .await;
    let cust = w.customer(&w.a.account, "patient", "0.50").await;
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["p-1".into()]))
            .await
            .status(),
        204
    );
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["p-2".into()]))
            .await
            .status(),
        402
    );
    drained(&w, Duration::from_secs(10)).await;
    top_up(&w, &cust, "1.00", "topup-2").await;
    eventually(Duration::from_secs(5), "the top-up to be seen", || async {
        (w.post("/events", &w.a.key, &batch(&cust, ["p-2".into()]))
            .await
            .status()
            == 204)
            .then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn credyt_down_denies_with_503_or_allows_per_on_unknown_and_counts_both() {
    let w = World::start_with(Options {
        ack: "durable",
        tenant_a_extra: "gate = { mode = \"balance\", on_unknown = \"deny\" }".into(),
        tenant_b_extra: "gate = { mode = \"balance\", on_unknown = \"allow\" }".into(),
        extra_config: "[balance]\nttl_ms = 200\nunknown_ttl_ms = 200\n".into(),
        ..Default::default()
    })
    .await;
    let ca = w.customer(&w.a.account, "down-a", "5.00").await;
    let cb = w.customer(&w.b.account, "down-b", "5.00").await;
    // Warm the identity caches (and read each balance once).
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&ca, ["d-a-0".into()]))
            .await
            .status(),
        204
    );
    assert_eq!(
        w.post("/events", &w.b.key, &batch(&cb, ["d-b-0".into()]))
            .await
            .status(),
        204
    );
    // Credyt stops answering balance reads; the cached ones expire.
    emu_faults(
        &w.http,
        &w.emulator,
        json!([{"path_prefix": "/customers/", "method": "GET", "rate_503": 1.0}]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = problem(
        w.post("/events", &w.a.key, &batch(&ca, ["d-a-1".into()]))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("balance_unavailable")),
        "{body}"
    );
    let resp = w
        .post("/v1/events", &w.a.key, &batch(&ca, ["d-a-1".into()]))
        .await;
    assert_eq!(
        resp.status(),
        503,
        "the whole request: no event can be judged"
    );
    assert_eq!(
        w.post("/events", &w.b.key, &batch(&cb, ["d-b-1".into()]))
            .await
            .status(),
        204
    );
    let admin = w.admin_url();
    assert_eq!(
        metric(
            &w.http,
            &admin,
            "credyt_proxy_balance_unknown_decisions_total{decision=\"deny\"}"
        )
        .await,
        Some(2)
    );
    assert_eq!(
        metric(
            &w.http,
            &admin,
            "credyt_proxy_balance_unknown_decisions_total{decision=\"allow\"}"
        )
        .await,
        Some(1)
    );
    // Nothing of the denied requests was recorded: once Credyt is back, d-a-1 is new.
    w.set_faults(None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body: Value = w
        .post("/v1/events", &w.a.key, &batch(&ca, ["d-a-1".into()]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["accepted"], 1, "{body}");
    w.stop().await;
}

#[tokio::test]
async fn a_balance_check_agrees_with_the_next_event_and_records_nothing() {
    let w = gated(
        "durable",
        "gate = { mode = \"balance\", min_available = \"0.25\" }",
        "",
    )
    .await;
    let cust = w.customer(&w.a.account, "asker", "1.25").await;
    let check = |body: Value| {
        let w = &w;
        async move {
            let resp = w.post("/v1/balance/check", &w.a.key, &body).await;
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let by_amount = check(json!({"customer_id": cust, "amount": "0.50", "asset": "USD"})).await;
    assert_eq!(
        by_amount,
        json!({"allowed": true, "asset": "USD", "available": "1.25", "required": "0.50",
               "min_available": "0.25", "gated": true,
               "assets": [{"asset": "USD", "available": "1.25", "required": "0.50", "allowed": true}]})
    );
    // A prospective event, priced with the tenant's book, by the end user's external id.
    let by_event =
        check(json!({"customer_external_id": "asker", "event": event("never-sent")})).await;
    assert_eq!(
        (by_event["allowed"].as_bool(), by_event["required"].as_str()),
        (Some(true), Some("0.50"))
    );
    // Nothing was recorded or charged by asking.
    assert_eq!(
        w.app
            .state()
            .outbox
            .as_ref()
            .unwrap()
            .pending_deliveries()
            .len(),
        0
    );
    assert_eq!(
        wallet(&w.state().await, &cust, "USD").map(|(a, n, _)| (a, n)),
        Some((dec!(1.25), 0))
    );

    // It agrees with what the events get: two fit (1.25 − 1.00 leaves the 0.25 minimum)...
    for id in ["q-1", "q-2"] {
        assert_eq!(
            w.post("/events", &w.a.key, &batch(&cust, [id.into()]))
                .await
                .status(),
            204
        );
    }
    let now = check(json!({"customer_id": cust, "amount": "0.50", "asset": "USD"})).await;
    assert_eq!(
        (now["allowed"].as_bool(), now["available"].as_str()),
        (Some(false), Some("0.25"))
    );
    // ...and the third does not, as the check said.
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["q-3".into()]))
            .await
            .status(),
        402
    );
    let the_event = check(json!({"customer_id": cust, "event": event("q-3")})).await;
    assert_eq!(the_event["allowed"], false);
    drained(&w, Duration::from_secs(10)).await;
    assert_eq!(
        wallet(&w.state().await, &cust, "USD"),
        Some((dec!(0.25), 2, dec!(1.00)))
    );

    // Bad checks are problems with stable codes.
    for (body, code) in [
        (json!({"customer_id": cust}), "invalid_check"),
        (
            json!({"customer_id": cust, "amount": "-1", "asset": "USD"}),
            "invalid_amount",
        ),
        (json!({"amount": "1", "asset": "USD"}), "invalid_customer"),
        (
            json!({"customer_id": cust, "event": {"id": "x", "event_type": "nope", "occurred_at": super::proxy::ago(1), "data": {}}}),
            "unknown_event_type",
        ),
    ] {
        let (status, p) = problem(w.post("/v1/balance/check", &w.a.key, &body).await).await;
        assert_eq!(status, 422, "{p}");
        assert!(p["errors"].to_string().contains(code), "{code}: {p}");
    }
    let (status, p) = problem(
        w.post(
            "/v1/balance/check",
            &w.a.key,
            &json!({"customer_external_id": "nobody", "amount": "1", "asset": "USD"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("customer_not_found"))
    );
    w.stop().await;
}

#[tokio::test]
async fn held_debits_survive_a_restart_until_credyt_confirms_them() {
    // The forwarder is off: what is accepted stays pending in the outbox across the restart.
    let w = World::start_with(Options {
        ack: "durable",
        tenant_a_extra: "gate = { mode = \"balance\" }".into(),
        outbox_config: "forwarder = false".into(),
        ..Default::default()
    })
    .await;
    let cust = w.customer(&w.a.account, "held", "1.00").await;
    for id in ["h-1", "h-2"] {
        assert_eq!(
            w.post("/events", &w.a.key, &batch(&cust, [id.into()]))
                .await
                .status(),
            204
        );
    }
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["h-3".into()]))
            .await
            .status(),
        402
    );
    // Credyt still has 1.00: only the held debits make h-3 unaffordable, also after a restart.
    let w = w.restart("forwarder = false").await;
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["h-3".into()]))
            .await
            .status(),
        402
    );
    // Delivered, the holds end and the balance read from Credyt says the same.
    let w = w.restart("").await;
    drained(&w, Duration::from_secs(10)).await;
    assert_eq!(
        wallet(&w.state().await, &cust, "USD"),
        Some((dec!(0.00), 2, dec!(1.00)))
    );
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["h-3".into()]))
            .await
            .status(),
        402
    );
    w.stop().await;
}

#[tokio::test]
async fn a_top_up_made_through_the_gateway_serves_the_end_user_at_once() {
    // A balance read lives an hour: only the gateway's own adjustment can refresh it.
    let w = gated(
        "durable",
        "gate = { mode = \"balance\" }\ngateway = { allow = [\"customers.read\", \"wallets.read\", \"wallets.adjust\"] }",
        "[balance]\nttl_ms = 3600000\n",
    )
    .await;
    let cust = w.customer(&w.a.account, "self-served", "0.50").await;
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["g-1".into()]))
            .await
            .status(),
        204
    );
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["g-2".into()]))
            .await
            .status(),
        402
    );
    let resp = w
        .post(
            &format!("/customers/{cust}/wallet/adjustments"),
            &w.a.key,
            &json!({"transaction_id": "gw-topup-1", "asset": "USD", "amount": "2.00", "reason": "external_topup"}),
        )
        .await;
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    assert_eq!(
        w.post("/events", &w.a.key, &batch(&cust, ["g-2".into()]))
            .await
            .status(),
        204
    );
    w.stop().await;
}

#[tokio::test]
async fn a_period_tiered_event_is_judged_at_the_running_total_it_will_be_charged_at() {
    // `calls_lifetime`: over the customer's lifetime the first 2 calls cost 0.10 each, every
    // later one 0.05 (bulk, by the running total). 0.25 pays for three calls, not two.
    let w = World::start_with(Options {
        ack: "durable",
        tenant_a_extra: "gate = { mode = \"balance\" }".into(),
        ingest: super::proxy::Ingest {
            pricing_dir: Some(super::proxy::repo().join("tests/golden/pricing/periods/books")),
            config: String::new(),
        },
        ..Default::default()
    })
    .await;
    let cust = w.customer(&w.a.account, "caller", "0.25").await;
    let call = |id: &str| {
        json!({"customer_id": cust, "events": [
            {"id": id, "event_type": "api_call", "occurred_at": super::proxy::ago(1), "data": {"ms": 1}}
        ]})
    };
    let mut statuses = Vec::new();
    for id in ["c-1", "c-2", "c-3", "c-4"] {
        statuses.push(
            w.post("/events", &w.a.key, &call(id))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [204, 204, 204, 402]);
    drained(&w, Duration::from_secs(10)).await;
    assert_eq!(
        wallet(&w.state().await, &cust, "USD"),
        Some((dec!(0.00), 3, dec!(0.25)))
    );
    w.stop().await;
}
