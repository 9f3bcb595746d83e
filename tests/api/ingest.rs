//! The ingest path end to end: the real proxy in front of the real emulator, driven by reqwest
//! and by the official Python SDK.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{account_of, ago, total_charges, wallet, Options, World};
use super::sdk;

/// Runs `proxy_send_usage.py` in `mode` as tenant A for `user`; asserts it succeeded.
async fn send_usage_with_sdk(w: &World, user: &str, mode: &str) -> std::process::Output {
    let env: Vec<(&'static str, String)> = vec![
        ("PROXY_URL", w.proxy_url()),
        ("TENANT_KEY", w.a.key.clone()),
        ("CUSTOMER_EXTERNAL_ID", user.to_string()),
        ("MODE", mode.to_string()),
        ("RUN", format!("sdk-{mode}")),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        sdk::run_script("proxy_send_usage.py", &env)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "sdk script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dec_of(v: &Value) -> Decimal {
    v.to_string().trim_matches('"').parse().unwrap()
}

#[actix_web::test]
async fn sdk_send_usage_through_the_proxy_debits_the_price_book_amounts() {
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "sdk-user", "20").await;
    send_usage_with_sdk(&w, "sdk-user", "ok").await;
    let state = w.state().await;
    assert_eq!(
        account_of(&state, &cust).as_deref(),
        Some(w.a.account.as_str())
    );
    // video_promoted 0.50 + input 1,000,000 tokens 1.25 + output 500,000 tokens 5.00:
    // three fees, three charges, once each although the first event was sent twice.
    let (available, count, total) = wallet(&state, &cust, "USD").unwrap();
    assert_eq!(count, 3);
    assert_eq!(total, dec!(6.75));
    assert_eq!(available, dec!(13.25));
    w.stop().await;
}

#[actix_web::test]
async fn sdk_batch_with_one_bad_event_gets_422_and_nothing_is_charged() {
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "sdk-bad", "20").await;
    let out = send_usage_with_sdk(&w, "sdk-bad", "bad").await;
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], 422);
    let state = w.state().await;
    let (available, count, _) = wallet(&state, &cust, "USD").unwrap();
    assert_eq!((available, count), (dec!(20), 0));
    w.stop().await;
}

#[actix_web::test]
async fn v1_mixed_batch_gets_one_result_per_event_and_charges_only_the_valid() {
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "mixed-user", "100").await;
    let first = w
        .post(
            "/v1/events",
            &w.a.key,
            &json!({"customer_external_id": "mixed-user", "events": [
                {"id": "early", "event_type": "video_promoted", "occurred_at": ago(60)}
            ]}),
        )
        .await;
    assert_eq!(first.status(), 200);
    let resp = w
        .post(
            "/v1/events",
            &w.a.key,
            &json!({"customer_external_id": "mixed-user", "events": [
                {"id": "e1", "event_type": "video_promoted", "occurred_at": ago(10)},
                {"id": "early", "event_type": "video_promoted", "occurred_at": ago(60)},
                {"id": "e1", "event_type": "video_promoted", "occurred_at": ago(10)},
                {"id": "e3", "event_type": "no_such_event", "occurred_at": ago(10)},
                {"id": "e4", "event_type": "video_promoted", "occurred_at": "yesterday"},
                {"id": "e5", "event_type": "response_completed", "occurred_at": ago(10),
                 "data": {"input_tokens": "lots", "output_tokens": 1}},
                {"id": "e6", "event_type": "response_completed", "occurred_at": ago(10),
                 "data": {"input_tokens": 2000000, "output_tokens": 1000000}}
            ]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    let status: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        status,
        [
            "accepted",
            "duplicate",
            "rejected",
            "rejected",
            "rejected",
            "rejected",
            "accepted"
        ]
    );
    let codes: Vec<&str> = results[2..6]
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes[0], "duplicate_id_in_request");
    assert_eq!(codes[1], "unknown_event_type");
    assert_eq!(codes[2], "invalid_occurred_at");
    assert!(codes[3].contains("volume"), "{codes:?}");
    let mut distinct = codes.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 4);
    assert_eq!(results[4]["field"], "events[4].occurred_at");
    // What the response says was accepted is exactly what is charged.
    let stated: Decimal = [&results[0], &results[6]]
        .iter()
        .flat_map(|r| r["fees"].as_array().unwrap().iter())
        .map(|f| dec_of(&f["amount"]))
        .sum();
    assert_eq!(stated, dec!(13.00)); // 0.50 + 2.50 + 10.00
    let state = w.state().await;
    let (_, count, total) = wallet(&state, &cust, "USD").unwrap();
    assert_eq!(count, 4); // early + e1 + two fees of e6
    assert_eq!(total, dec!(13.50));
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["rejected"], 4);
    w.stop().await;
}

#[actix_web::test]
async fn tenants_cannot_reach_each_others_customers_whatever_they_send() {
    let w = World::start().await;
    let b_cust = w.customer(&w.b.account, "b-user", "20").await;
    let event = |id: &str| json!({"id": id, "event_type": "video_promoted", "occurred_at": ago(5)});

    // A names B's customer id directly: not in A's account -> 404, nothing charged.
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_id": b_cust, "events": [event("x1")]}),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "customer_not_found");

    // A forges B's account header and uses B's end-user id: the header is ignored, the event
    // lands on a customer of A's own account (created on first sight), never on B's.
    let r = w
        .http
        .post(format!("{}/events", w.proxy_url()))
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("X-CREDYT-ACCOUNT", &w.b.account)
        .json(&json!({"customer_external_id": "b-user", "events": [event("x2")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let state = w.state().await;
    let (available, count, _) = wallet(&state, &b_cust, "USD").unwrap();
    assert_eq!(
        (available, count),
        (dec!(20), 0),
        "B's customer must be untouched"
    );
    assert_eq!(total_charges(&state), 1);
    let a_accounts: Vec<&Value> = state["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["id"] == w.a.account.as_str())
        .collect();
    assert!(a_accounts[0]["customers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["external_id"] == "b-user"));

    // Wrong or missing key -> 401, B's own key works for B's customer.
    for key in ["cpk_not_a_key", ""] {
        let r = w
            .post(
                "/events",
                key,
                &json!({"customer_id": b_cust, "events": [event("x3")]}),
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    let r = w
        .post(
            "/events",
            &w.b.key,
            &json!({"customer_id": b_cust, "events": [event("x4")]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let (available, count, _) = wallet(&w.state().await, &b_cust, "USD").unwrap();
    assert_eq!((available, count), (dec!(19.50), 1));
    w.stop().await;
}

#[actix_web::test]
async fn many_concurrent_misses_for_one_new_end_user_make_one_lookup() {
    let w = World::start().await;
    let requests = (0..1000).map(|i| {
        let body = json!({"customer_external_id": "brand-new-user", "events": [
            {"id": format!("c{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}
        ]});
        let http = w.http.clone();
        let url = format!("{}/events", w.proxy_url());
        let key = w.a.key.clone();
        async move {
            http.post(url)
                .header("X-CREDYT-API-KEY", key)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(204))),
        "{:?}",
        &statuses[..5]
    );
    let log = w.requests().await;
    let lookups = log
        .iter()
        .filter(|r| {
            r["method"] == "GET"
                && r["path"] == "/customers"
                && r["query"].as_str().unwrap_or("").contains("brand-new-user")
        })
        .count();
    let creates = log
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/customers")
        .count();
    assert_eq!(lookups, 1);
    assert_eq!(creates, 1);
    assert_eq!(total_charges(&w.state().await), 1000);
    w.stop().await;
}

#[actix_web::test]
async fn over_quota_gets_429_with_headers_and_other_tenants_are_unaffected() {
    let w = World::start_with(Options {
        rate_a: (1, 3),
        ..Default::default()
    })
    .await;
    w.customer(&w.b.account, "b-user", "20").await;
    let post = |key: String, user: &'static str, id: String| {
        let http = w.http.clone();
        let url = format!("{}/events", w.proxy_url());
        async move {
            http.post(url)
                .header("X-CREDYT-API-KEY", key)
                .json(&json!({"customer_external_id": user, "events": [
                    {"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}
                ]}))
                .send()
                .await
                .unwrap()
        }
    };
    for i in 0..3 {
        assert_eq!(
            post(w.a.key.clone(), "a-user", format!("r{i}"))
                .await
                .status(),
            204
        );
    }
    let limited = post(w.a.key.clone(), "a-user", "r3".into()).await;
    assert_eq!(limited.status(), 429);
    let h = limited.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(h["ratelimit-policy"].to_str().unwrap().contains("q=1"));
    assert!(h["ratelimit"].to_str().unwrap().contains("r=0"));
    assert_eq!(h["content-type"], "application/problem+json");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Tenant B, at the same moment, is not limited.
    for i in 0..5 {
        assert_eq!(
            post(w.b.key.clone(), "b-user", format!("b{i}"))
                .await
                .status(),
            204
        );
    }
    w.stop().await;
}

#[actix_web::test]
async fn upstream_failure_is_a_clear_503_and_a_retry_charges_each_fee_once() {
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "flaky-user", "50").await;
    let batch = json!({"customer_external_id": "flaky-user", "events": [
        {"id": "f1", "event_type": "video_promoted", "occurred_at": ago(5)},
        {"id": "f2", "event_type": "response_completed", "occurred_at": ago(5),
         "data": {"input_tokens": 1000000, "output_tokens": 1000000}},
        {"id": "f3", "event_type": "ticket_resolved", "occurred_at": ago(5)}
    ]});
    // Warm the identity cache, then make half of Credyt's wallet answers fail.
    let warm = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "flaky-user", "events": [
            {"id": "warm", "event_type": "video_promoted", "occurred_at": ago(5)}]}),
        )
        .await;
    assert_eq!(warm.status(), 204);
    let faults =
        json!({"rules": [{"path_prefix": "/customers/", "method": "POST", "rate_503": 1.0}]});
    w.set_faults(Some(faults)).await;
    let r = w.post("/events", &w.a.key, &batch).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "upstream_unavailable");

    // Partial outage: some charges of the retry get through, some do not.
    let half =
        json!({"rules": [{"path_prefix": "/customers/", "method": "POST", "rate_503": 0.5}]});
    w.set_faults(Some(half)).await;
    let _ = w.post("/events", &w.a.key, &batch).await;
    w.set_faults(None).await;
    for _ in 0..2 {
        let r = w.post("/events", &w.a.key, &batch).await;
        assert_eq!(r.status(), 204);
    }
    let (available, count, total) = wallet(&w.state().await, &cust, "USD").unwrap();
    // warm 0.50 + f1 0.50 + f2 1.25 + 10.00 + f3 0.99, each exactly once.
    assert_eq!(count, 5);
    assert_eq!(total, dec!(13.24));
    assert_eq!(available, dec!(36.76));
    w.stop().await;
}

#[actix_web::test]
async fn unknown_end_users_get_404_and_the_miss_is_cached() {
    let w = World::start().await;
    // Tenant B does not create end users on first sight.
    for i in 0..3 {
        let r = w
            .post(
                "/events",
                &w.b.key,
                &json!({"customer_external_id": "ghost", "events": [
                    {"id": format!("g{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}]}),
            )
            .await;
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "customer_not_found");
    }
    let log = w.requests().await;
    let lookups = log
        .iter()
        .filter(|r| {
            r["path"] == "/customers" && r["query"].as_str().unwrap_or("").contains("ghost")
        })
        .count();
    assert_eq!(lookups, 1, "the negative answer is cached");
    assert_eq!(total_charges(&w.state().await), 0);
    w.stop().await;
}

#[actix_web::test]
async fn bad_requests_get_precise_problems() {
    let w = World::start().await;
    let url = format!("{}/events", w.proxy_url());
    let r = w
        .http
        .post(&url)
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("Content-Type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = w
        .http
        .post(&url)
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("Content-Type", "application/json")
        .body("{\"events\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let big = format!(
        "{{\"customer_id\":\"cust_x\",\"events\":[],\"pad\":\"{}\"}}",
        "x".repeat(1_100_000)
    );
    let r = w
        .http
        .post(&url)
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");
    // GET /events is Credyt's event list (the gateway, with a key); other methods are 405.
    let r = w.http.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");
    let r = w
        .post(
            "/v1/quote",
            &w.a.key,
            &json!({"id": "q", "event_type": "ticket_resolved", "occurred_at": ago(1)}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let quote: Value = r.json().await.unwrap();
    assert_eq!(quote["fees"][0]["amount"], "0.99");
    // The admin port: alive, ready, and counting.
    let admin = format!("http://{}", w.app.admin_addr());
    assert_eq!(
        w.http
            .get(format!("{admin}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        w.http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = super::proxy::scrape(&w).await;
    assert!(
        metrics.contains("credyt_proxy_events_total{outcome=\"accepted\"} 0"),
        "{metrics}"
    );
    w.stop().await;
}

#[actix_web::test]
async fn forward_events_mode_sends_the_events_to_credyt_on_the_right_account() {
    for ack in ["upstream", "durable"] {
        let w = World::start_with(Options {
            ack,
            forward_b: "events",
            ..Default::default()
        })
        .await;
        let cust = w.customer(&w.b.account, "ev-user", "20").await;
        let r = w
            .post(
                "/v1/events",
                &w.b.key,
                &json!({"customer_external_id": "ev-user", "events": [
                    {"id": "ev-1", "event_type": "anything_at_all", "occurred_at": ago(5),
                     "subject": "s1", "data": {"tokens": 12345678901234567890_u64, "model": "x"}}]}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["results"][0]["status"], "accepted", "{body}");
        // Credyt prices forwarded events itself: nothing is charged by the proxy.
        let stored = super::proxy::eventually(
            Duration::from_secs(10),
            "the event to reach credyt",
            || async {
                let resp = w
                    .http
                    .get(format!("{}/events/ev-1", w.emulator.url()))
                    .header("X-CREDYT-API-KEY", super::proxy::PLATFORM_KEY)
                    .header("X-CREDYT-ACCOUNT", &w.b.account)
                    .send()
                    .await
                    .unwrap();
                if resp.status() != 200 {
                    return None;
                }
                let text = resp.text().await.unwrap();
                Some(serde_json::from_str::<Value>(&text).unwrap())
            },
        )
        .await;
        assert_eq!(stored["customer_id"], cust.as_str());
        assert_eq!(stored["subject"], "s1");
        assert_eq!(stored["data"]["tokens"].to_string(), "12345678901234567890");
        let (available, count, _) = wallet(&w.state().await, &cust, "USD").unwrap();
        assert_eq!((available, count), (dec!(20), 0), "{ack}");
        w.stop().await;
    }
}

/// `credyt_proxy_events_total{outcome="..."}` on the proxy's admin port.
async fn events_total(w: &World, outcome: &str) -> Option<u64> {
    let name = format!("credyt_proxy_events_total{{outcome=\"{outcome}\"}}");
    super::proxy::metric(&w.http, &w.admin_url(), &name).await
}

#[actix_web::test]
async fn a_client_that_gives_up_mid_request_still_has_its_event_charged_and_counted_once() {
    // ack = "upstream": the answer waits for Credyt, which is slow now; the client gives up
    // long before and resets its connection, on which actix drops the request's handler: what
    // was being accepted must still be charged, counted and remembered.
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "impatient", "20").await;
    let warm = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "impatient", "events": [
                {"id": "warm", "event_type": "video_promoted", "occurred_at": ago(5)}]}),
        )
        .await;
    assert_eq!(warm.status(), 204);
    let accepted_before = events_total(&w, "accepted").await.unwrap_or(0);
    let faults = json!({"rules": [
        {"path_prefix": "/customers/", "method": "POST", "latency_ms": 1500}]});
    w.set_faults(Some(faults)).await;

    let event = json!({"customer_external_id": "impatient", "events": [
        {"id": "gave-up", "event_type": "video_promoted", "occurred_at": ago(5)}]});
    // The client gives up after 200 ms and resets the connection (SO_LINGER 0: an RST, as a
    // killed process or a load balancer's idle timeout sends). A plain FIN would not do: actix
    // allows half-closed connections and would finish the request anyway.
    let body = serde_json::to_vec(&event).unwrap();
    let mut conn = tokio::net::TcpStream::connect(w.app.tenant_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {}\r\nx-credyt-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        w.app.tenant_addr(),
        w.a.key,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut answer = [0u8; 64];
    let gave_up = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut answer)).await;
    assert!(gave_up.is_err(), "the proxy answered before Credyt did");
    // A zero linger does not block on close (the deprecation is about non-zero ones).
    #[allow(deprecated)]
    conn.set_linger(Some(Duration::ZERO)).unwrap();
    drop(conn);

    // Without any retry from the client, the charge lands and the event is counted.
    super::proxy::eventually(Duration::from_secs(10), "the abandoned charge", || async {
        let (count, total) = super::proxy::usd_charges(&w.state().await, &cust);
        (count == 2).then_some(total)
    })
    .await;
    super::proxy::eventually(Duration::from_secs(10), "the accepted count", || async {
        (events_total(&w, "accepted").await? == accepted_before + 1).then_some(())
    })
    .await;

    // The client's retry is a duplicate, not a second acceptance.
    w.set_faults(None).await;
    let retry = w.post("/v1/events", &w.a.key, &event).await;
    assert_eq!(retry.status(), 200);
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "duplicate", "{body}");
    let (count, total) = super::proxy::usd_charges(&w.state().await, &cust);
    assert_eq!((count, total), (2, dec!(1.00)));
    assert_eq!(
        events_total(&w, "accepted").await,
        Some(accepted_before + 1)
    );
    assert_eq!(events_total(&w, "duplicate").await, Some(1));
    w.stop().await;
}

#[actix_web::test]
async fn more_events_than_the_burst_is_a_422_never_a_429_to_retry() {
    let w = World::start_with(Options {
        rate_a: (1, 3),
        ..Default::default()
    })
    .await;
    let events: Vec<Value> = (0..4)
        .map(|i| json!({"id": format!("big{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
        .collect();
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "a-user", "events": events}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(
        !r.headers().contains_key("retry-after"),
        "waiting never helps"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "exceeds_burst");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("burst of 3"), "{detail}");
    assert!(detail.contains("4 events"), "{detail}");
    // It took none of the quota: a request within the burst passes at once.
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "a-user", "events": &events[..3]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(total_charges(&w.state().await), 3);
    w.stop().await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// POSTs raw `body` to `/events` as tenant A with `Content-Encoding: encoding`.
async fn post_encoded(w: &World, encoding: &str, body: Vec<u8>) -> reqwest::Response {
    w.http
        .post(format!("{}/events", w.proxy_url()))
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", encoding)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[actix_web::test]
async fn a_gzip_body_is_accepted_and_charged() {
    let w = World::start().await;
    let cust = w.customer(&w.a.account, "gz-user", "200").await;
    // A full batch, gzipped (what an SDK sends for large batches).
    let events: Vec<Value> = (0..100)
        .map(|i| json!({"id": format!("gz{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
        .collect();
    let json =
        serde_json::to_vec(&json!({"customer_external_id": "gz-user", "events": events})).unwrap();
    let r = post_encoded(&w, "gzip", gzip(&json)).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let r = post_encoded(
        &w,
        "identity",
        serde_json::to_vec(&one("gz-plain")).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 204);
    let (count, total) = super::proxy::usd_charges(&w.state().await, &cust);
    assert_eq!((count, total), (101, dec!(50.50)));
    // A body that says gzip and is not: 400, not parsed as JSON anyway.
    let r = post_encoded(&w, "gzip", serde_json::to_vec(&one("gz-liar")).unwrap()).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "invalid_encoding");
    w.stop().await;
}

fn one(id: &str) -> Value {
    json!({"customer_external_id": "gz-user", "events": [
        {"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}]})
}

#[actix_web::test]
async fn a_decompression_bomb_gets_413_and_an_unknown_encoding_415() {
    let w = World::start().await;
    // 64 MiB of JSON whitespace inside a valid batch: ~64 KiB gzipped, 64 times the limit.
    let bomb = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(b"{\"customer_external_id\": \"gz-user\", \"events\": [")
            .unwrap();
        let blanks = vec![b' '; 1 << 20];
        for _ in 0..64 {
            e.write_all(&blanks).unwrap();
        }
        e.write_all(b"]}").unwrap();
        e.finish().unwrap()
    };
    assert!(bomb.len() < 200_000, "{}", bomb.len());
    let r = post_encoded(&w, "gzip", bomb).await;
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");

    // Brotli (or anything but gzip and identity) is refused, never parsed as plain JSON.
    let plain = serde_json::to_vec(&one("br-1")).unwrap();
    let r = post_encoded(&w, "br", plain).await;
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.headers()["accept-encoding"], "gzip, identity");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unsupported_encoding");
    assert!(body["detail"].as_str().unwrap().contains("`br`"), "{body}");
    assert_eq!(total_charges(&w.state().await), 0);
    w.stop().await;
}
