//! Coalescing: a hot customer's fees go upstream as few charges, totals exact.

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::json;

use std::time::Duration;

use super::proxy::{ago, eventually, wallet, Options, World};

#[actix_web::test]
async fn a_hot_customers_fees_are_coalesced_with_exact_totals() {
    let w = World::start_with(Options {
        ack: "durable",
        outbox_config: "coalesce_window_ms = 200\nforwarder_concurrency = 8".into(),
        ..Default::default()
    })
    .await;
    run(&w).await;
    w.stop().await;
}

async fn run(w: &World) {
    let cust = w.customer(&w.a.account, "hot-user", "1000").await;
    let cold = w.customer(&w.a.account, "cold-user", "10").await;
    // 1,000 events for the hot customer in 100 requests of 10, 10 requests in flight at once.
    for wave in 0..10 {
        let requests = (0..10).map(|r| {
            let events: Vec<_> = (0..10)
                .map(|e| json!({"id": format!("hot-{wave}-{r}-{e}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
                .collect();
            let body = json!({"customer_external_id": "hot-user", "events": events});
            async move { w.post("/events", &w.a.key, &body).await.status().as_u16() }
        });
        let statuses = futures_util::future::join_all(requests).await;
        assert!(statuses.iter().all(|s| *s == 204), "{statuses:?}");
    }
    // One lone event for another customer goes out on its own.
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "cold-user", "events": [
            {"id": "cold-1", "event_type": "ticket_resolved", "occurred_at": ago(5)}]}),
        )
        .await;
    assert_eq!(r.status(), 204);

    let (cust, cold) = (&cust, &cold);
    let charged = eventually(
        Duration::from_secs(30),
        "the backlog to drain",
        || async move {
            let state = w.state().await;
            let hot = wallet(&state, cust, "USD")?;
            let cold = wallet(&state, cold, "USD")?;
            (hot.2 == dec!(500.00) && cold.1 == 1).then_some((hot, cold))
        },
    )
    .await;
    let ((available, count, total), (cold_available, _, _)) = charged;
    assert_eq!(total, dec!(500.00));
    assert_eq!(available, dec!(500.00));
    assert_eq!(cold_available, dec!(9.01));
    let per_event = Decimal::from(count) / Decimal::from(1000);
    assert!(
        per_event <= dec!(0.1),
        "{count} upstream charges for 1000 events"
    );
    // Nothing more arrives later (no double charge), and the outbox is empty.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, count_after, total_after) = wallet(&w.state().await, cust, "USD").unwrap();
    assert_eq!((count_after, total_after), (count, total));
    assert_eq!(w.app.outbox().unwrap().depth(), 0);
    // The emulator saw exactly these charge calls (no retries were needed).
    let log = w.requests().await;
    let charge_calls = log
        .iter()
        .filter(|r| {
            r["method"] == "POST" && r["path"].as_str().unwrap().ends_with("/wallet/charges")
        })
        .count() as u64;
    assert_eq!(charge_calls, count + 1);
}

/// An event priced to zero is accepted and remembered (a resend is a duplicate) but nothing is
/// charged: Credyt refuses charges of 0.
#[actix_web::test]
async fn a_zero_priced_event_is_accepted_remembered_and_not_charged() {
    let w = World::start_with(Options {
        ack: "durable",
        ..Default::default()
    })
    .await;
    let cust = w.customer(&w.a.account, "zero-user", "5").await;
    let body = json!({"customer_external_id": "zero-user", "events": [
        {"id": "z1", "event_type": "response_completed", "occurred_at": ago(5),
         "data": {"input_tokens": 0, "output_tokens": 0}},
        {"id": "z2", "event_type": "video_promoted", "occurred_at": ago(5)}]});
    let first: serde_json::Value = w
        .post("/v1/events", &w.a.key, &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["accepted"], 2, "{first}");
    assert_eq!(first["results"][0]["fees"][0]["amount"], "0");
    let again: serde_json::Value = w
        .post("/v1/events", &w.a.key, &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["duplicates"], 2, "{again}");
    eventually(Duration::from_secs(10), "the one real fee", || async {
        let (_, count, total) = wallet(&w.state().await, &cust, "USD")?;
        (count == 1 && total == dec!(0.50)).then_some(())
    })
    .await;
    // The record leaves the outbox once the forwarder has read Credyt's 201, which comes after
    // the emulator shows the charge: wait for it rather than race it.
    eventually(Duration::from_secs(10), "an empty outbox", || async {
        (w.app.outbox()?.depth() == 0).then_some(())
    })
    .await;
    w.stop().await;
}

/// A coalesced charge that waits for its retry (Credyt answered 429) while later windows take
/// new records is neither dissolved nor sent twice: once Credyt takes it, every fee is charged
/// exactly once and the outbox drains.
#[actix_web::test]
async fn a_coalesced_charge_waiting_for_its_retry_is_kept_whole() {
    let w = World::start_with(Options {
        ack: "durable",
        outbox_config: "coalesce_window_ms = 100".into(),
        ..Default::default()
    })
    .await;
    let cust = w.customer(&w.a.account, "waiting-user", "100").await;
    w.set_faults(Some(json!({"rules": [{
        "path_prefix": format!("/customers/{cust}/wallet/charges"),
        "rate_429": 1.0,
        "retry_after_secs": 2
    }]})))
    .await;
    let post = |wave: usize| {
        let events: Vec<_> = (0..10)
            .map(|e| json!({"id": format!("wait-{wave}-{e}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
            .collect();
        let body = json!({"customer_external_id": "waiting-user", "events": events});
        let w = &w;
        async move { w.post("/events", &w.a.key, &body).await.status().as_u16() }
    };
    assert_eq!(post(0).await, 204);
    // Several windows pass while the first batch waits for its Retry-After.
    eventually(Duration::from_secs(5), "the first 429", || async {
        w.requests()
            .await
            .iter()
            .any(|r| r["status"] == 429)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(post(1).await, 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.set_faults(None).await;
    let admin = w.admin_url();
    eventually(Duration::from_secs(20), "the outbox to drain", || async {
        (super::proxy::metric(&w.http, &admin, "credyt_proxy_outbox_depth").await? == 0)
            .then_some(())
    })
    .await;
    let state = w.state().await;
    let (_, count, total) = wallet(&state, &cust, "USD").unwrap();
    assert_eq!(total, dec!(10.00), "20 fees of 0.50, each once");
    assert!(
        count <= 4,
        "{count} charges for two waves of coalesced fees"
    );
    assert_eq!(
        super::proxy::metric(&w.http, &admin, "credyt_proxy_outbox_dead_letters").await,
        Some(0)
    );
    w.stop().await;
}
